// The public-level ops (fusedloss::cross_entropy, focal_loss, gap_loss, linear_cross_entropy), and InfoNCE's
// kernel op info_nce_lse_fwd (at the end). The first four: each is one
// row kernel (for linear_cross_entropy the chunk loop), the reduction (reduce_rows) and, in the backward,
// one gradient kernel. Their autograd lives here, in
// C++, so that a call from Python reaches the kernels with nothing in Python between the user's
// call and the kernel but the argument checks of fusedloss.functional (a torch.library Python
// autograd formula costs tens of microseconds a call, more than the kernels at small sizes).
//
// Two kernels per op:
//   CompositeExplicitAutograd: the forward alone (inference, no_grad, tensors without autograd):
//     row kernel, then reduce_rows, through the dispatcher, so the CPU or CUDA kernels run.
//   Autograd: a torch::autograd::Function whose forward is the same below autograd and whose backward
//     calls the gradient kernel. The kernel ops it calls have fake kernels (fusedloss/ops/), so
//     torch.compile traces through this Function as it does through ATen's own formulas.
// Every op returns, after its loss, what its backward needs (stats, coef, the mean's denominator
// "mass"), marked non-differentiable; the Triton twins (fusedloss/ops/, Python autograd) return the
// same outputs, so both share one fake. "mass" is 0-dim for mean and sum, (0,) for none.
//
// The gradient of the reduced loss, g the incoming gradient: none  d/dl_i = g_i;  sum  d/dl_i = g;
// mean  d/dl_i = g / mass (the weights w_{y_i} inside l_i carry the rest of torch's weighted mean);
// each times u_i with token weights u (the reduced loss is sum_i u_i l_i, or the rows u_i l_i).
#include "fusedloss/reduce_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/where.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fusedloss {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

const auto& reduce_rows_op() {
  static const auto op =
      kernel_op<Tensor2(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, bool)>(
          "fusedloss::reduce_rows");
  return op;
}
const auto& ce_fwd_op() {
  static const auto op = kernel_op<Tensor3(const Tensor&, const Tensor&, const OptTensor&, int64_t, double, double,
                                           double, double, bool)>("fusedloss::cross_entropy_fwd");
  return op;
}
const auto& ce_bwd_op() {
  static const auto op =
      kernel_op<Tensor(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                       int64_t, double, double, double, double, const OptTensor&, const OptTensor&)>(
          "fusedloss::cross_entropy_bwd");
  return op;
}
const auto& focal_fwd_op() {
  static const auto op = kernel_op<Tensor3(const Tensor&, const Tensor&, const OptTensor&, int64_t, double)>(
      "fusedloss::focal_loss_fwd");
  return op;
}
const auto& gap_fwd_op() {
  static const auto op = kernel_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, double, int64_t, int64_t,
                                          bool, bool)>("fusedloss::gap_loss_fwd");
  return op;
}
const auto& gap_bwd_op() {
  static const auto op = kernel_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                                          int64_t, int64_t, bool, bool)>("fusedloss::gap_loss_bwd");
  return op;
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == reduce::kNone || reduction == reduce::kMean || reduction == reduce::kSum,
              "fusedloss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// (reduced loss, mass) of per-row losses, each weighted by its token weight when there are some.
Tensor2 reduce(const Tensor& loss, const Tensor& target, const OptTensor& mass_weight, const OptTensor& token_weight,
               int64_t ignore_index, int64_t reduction) {
  check_reduction(reduction);
  if (reduction == reduce::kNone)
    return {token_weight.has_value() ? at::mul(loss, *token_weight) : loss, at::empty({0}, loss.options())};
  return reduce_rows_op().call(loss, target, mass_weight, token_weight, ignore_index, reduction == reduce::kMean);
}

// The per-row factor of the backward: coef (focal loss's) times the token weights, either when absent.
Tensor times_token_weight(const Tensor& coef, const Tensor& token_weight) {
  if (!token_weight.defined()) return coef;
  return coef.defined() ? at::mul(coef, token_weight) : token_weight;
}

// A plain CPU tensor whose data the host may read: not a FakeTensor or functional tensor of a
// torch.compile trace, nor a functorch wrapper.
bool host_readable(const Tensor& t) {
  return t.is_cpu() && t.layout() == at::kStrided &&
         !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                                   c10::DispatchKey::FuncTorchBatched,
                                                   c10::DispatchKey::FuncTorchGradWrapper}));
}

// The per-row scale of the backward written by the host for CPU tensors in eager mode without
// create_graph: the div, expand and mul below are two or three dispatcher ops with TensorIterator
// set-ups, several microseconds a call at sizes where the gradient kernel takes a few. The same
// products in the same dtype, so the same bits.
bool host_row_grad(const Tensor& grad, const Tensor& mass, int64_t reduction, int64_t n,
                   const at::TensorOptions& options, const Tensor& coef, Tensor& out) {
  if (at::GradMode::is_enabled() || !host_readable(grad) || !host_readable(mass)) return false;
  const auto dtype = grad.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || mass.scalar_type() != dtype ||
      c10::typeMetaToScalarType(options.dtype()) != dtype)
    return false;
  if (coef.defined() && (!host_readable(coef) || coef.scalar_type() != dtype || coef.dim() != 1 || coef.size(0) != n))
    return false;
  if (reduction == reduce::kNone ? (grad.dim() != 1 || grad.size(0) != n) : grad.numel() != 1) return false;
  out = at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fusedloss_row_grad", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* c = coef.defined() ? coef.const_data_ptr<scalar_t>() : nullptr;
    const int64_t cs = coef.defined() ? coef.stride(0) : 0;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (reduction == reduce::kNone) {
      const int64_t gs = grad.stride(0);
      for (int64_t i = 0; i < n; ++i) o[i] = c ? g[i * gs] * c[i * cs] : g[i * gs];
      return;
    }
    scalar_t v = g[0];
    if (reduction == reduce::kMean) v = v / mass.const_data_ptr<scalar_t>()[0];
    for (int64_t i = 0; i < n; ++i) o[i] = c ? v * c[i * cs] : v;
  });
  return true;
}

// d loss / d l_i for every row, from the incoming gradient of the reduced loss (see the top), times
// coef_i when coef is defined (focal loss).
Tensor row_grad(const Tensor& grad, const Tensor& mass, int64_t reduction, int64_t n, const at::TensorOptions& options,
                const Tensor& coef = Tensor()) {
  Tensor g;
  if (grad.defined() && (reduction != reduce::kNone || coef.defined()) &&
      host_row_grad(grad, mass, reduction, n, options, coef, g))
    return g;
  if (!grad.defined()) {
    g = at::zeros({n}, options);
  } else if (reduction == reduce::kNone) {
    g = grad;
  } else if (reduction == reduce::kSum) {
    g = grad.expand({n});
  } else {
    g = at::div(grad, mass).expand({n});
  }
  return coef.defined() ? at::mul(g, coef) : g;
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A backward with create_graph=True runs in grad mode: then the gradient kernels are called with
// autograd, whose formula (fusedloss/ops/) says that there is no double backward when one is asked
// for. Otherwise they are called below autograd, at no cost.
struct MaybeBelowAutograd {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  MaybeBelowAutograd() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
};

// ---------------------------------------------------------------------------------------------------
// cross_entropy(logits, target, weight, ...) -> (loss, lse, stats, mass, logprob, entropy)

// Column `col` of the (N, 4) stats as a tensor of its own (an output may not alias another one).
Tensor stats_column(const Tensor& stats, int64_t col) {
  return stats.select(1, col).clone(at::MemoryFormat::Contiguous);
}

Tensor6 cross_entropy_impl(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                           const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                           double label_smoothing, double z_loss, double softcap, double temperature, bool extras) {
  auto [loss, lse, stats] =
      ce_fwd_op().call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, temperature, extras);
  auto [out, mass] = reduce(loss, target, weight, token_weight, ignore_index, reduction);
  if (!extras) return {out, lse, stats, mass, at::empty({0}, loss.options()), at::empty({0}, loss.options())};
  return {out, lse, stats, mass, stats_column(stats, 2), stats_column(stats, 3)};
}

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, const OptTensor& token_weight, int64_t ignore_index,
                               int64_t reduction, double label_smoothing, double z_loss, double softcap,
                               double temperature, bool extras) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // the unused outputs need no zero gradients; backward handles undefined ones
    auto [out, lse, stats, mass, logprob, entropy] =
        cross_entropy_impl(logits, target, weight, token_weight, ignore_index, reduction, label_smoothing, z_loss,
                           softcap, temperature, extras);
    ctx->save_for_backward(
        {logits, target, weight.value_or(Tensor()), stats, mass, token_weight.value_or(Tensor())});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["temperature"] = temperature;
    // Without extras, logprob and entropy are (0,) placeholders the caller drops: no autograd metadata.
    if (extras) {
      ctx->mark_non_differentiable({stats, mass});
    } else {
      ctx->mark_non_differentiable({stats, mass, logprob, entropy});
    }
    return {out, lse, stats, mass, logprob, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &target = saved[1], &weight = saved[2], &stats = saved[3], &mass = saved[4];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const Tensor g = row_grad(grads[0], mass, reduction, logits.size(0), stats.options(), saved[5]);
    MaybeBelowAutograd below;
    Tensor grad = ce_bwd_op().call(g, optional(grads[1]), logits, target, optional(weight), stats,
                                   ctx->saved_data["ignore_index"].toInt(),
                                   ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
                                   ctx->saved_data["softcap"].toDouble(), ctx->saved_data["temperature"].toDouble(),
                                   optional(grads[4]), optional(grads[5]));
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor6 cross_entropy_autograd(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                               const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                               double label_smoothing, double z_loss, double softcap, double temperature,
                               bool extras) {
  auto r = CrossEntropyFunction::apply(logits, target, weight, token_weight, ignore_index, reduction, label_smoothing,
                                       z_loss, softcap, temperature, extras);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// ---------------------------------------------------------------------------------------------------
// focal_loss(logits, target, factor, weight, ...) -> (loss, stats, coef, mass). factor a_y is the row
// loss's per-class factor (weight * alpha), weight alone the mean's denominator; the gradient is the
// cross-entropy gradient with grad_loss * coef and no weights (cross_entropy_math.h (6)).

Tensor4 focal_loss_impl(const Tensor& logits, const Tensor& target, const OptTensor& factor, const OptTensor& weight,
                        const OptTensor& token_weight, int64_t ignore_index, int64_t reduction, double gamma) {
  auto [loss, stats, coef] = focal_fwd_op().call(logits, target, factor, ignore_index, gamma);
  auto [out, mass] = reduce(loss, target, weight, token_weight, ignore_index, reduction);
  return {out, stats, coef, mass};
}

struct FocalLossFunction : public torch::autograd::Function<FocalLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const OptTensor& factor, const OptTensor& weight, const OptTensor& token_weight,
                               int64_t ignore_index, int64_t reduction, double gamma) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // the unused outputs need no zero gradients; backward handles undefined ones
    auto [out, stats, coef, mass] =
        focal_loss_impl(logits, target, factor, weight, token_weight, ignore_index, reduction, gamma);
    ctx->save_for_backward({logits, target, stats, coef, mass, token_weight.value_or(Tensor())});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({stats, coef, mass});
    return {out, stats, coef, mass};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &target = saved[1], &stats = saved[2], &coef = saved[3], &mass = saved[4];
    const Tensor g = row_grad(grads[0], mass, ctx->saved_data["reduction"].toInt(), logits.size(0), stats.options(),
                              times_token_weight(coef, saved[5]));
    MaybeBelowAutograd below;
    Tensor grad = ce_bwd_op().call(g, std::nullopt, logits, target, std::nullopt, stats,
                                   ctx->saved_data["ignore_index"].toInt(), 0.0, 0.0, 0.0, 1.0, std::nullopt,
                                   std::nullopt);
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor4 focal_loss_autograd(const Tensor& logits, const Tensor& target, const OptTensor& factor,
                            const OptTensor& weight, const OptTensor& token_weight, int64_t ignore_index,
                            int64_t reduction, double gamma) {
  auto r = FocalLossFunction::apply(logits, target, factor, weight, token_weight, ignore_index, reduction, gamma);
  return {r[0], r[1], r[2], r[3]};
}

// ---------------------------------------------------------------------------------------------------
// gap_loss(input, target, weight, ...) -> (loss, mass). Its mean counts the kept rows (no weights).

Tensor2 gap_loss_impl(const Tensor& input, const Tensor& target, const OptTensor& weight, double margin, int64_t p,
                      int64_t ignore_index, bool class_normalize, bool max_mode, int64_t reduction) {
  Tensor loss = gap_fwd_op().call(input, target, weight, margin, p, ignore_index, class_normalize, max_mode);
  return reduce(loss, target, std::nullopt, std::nullopt, ignore_index, reduction);
}

struct GapLossFunction : public torch::autograd::Function<GapLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                               const OptTensor& weight, double margin, int64_t p, int64_t ignore_index,
                               bool class_normalize, bool max_mode, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // the unused outputs need no zero gradients; backward handles undefined ones
    auto [out, mass] =
        gap_loss_impl(input, target, weight, margin, p, ignore_index, class_normalize, max_mode, reduction);
    ctx->save_for_backward({input, target, weight.value_or(Tensor()), mass});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["p"] = p;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["class_normalize"] = class_normalize;
    ctx->saved_data["max_mode"] = max_mode;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({mass});
    return {out, mass};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &target = saved[1], &weight = saved[2], &mass = saved[3];
    const Tensor g = row_grad(grads[0], mass, ctx->saved_data["reduction"].toInt(), input.size(0), mass.options());
    MaybeBelowAutograd below;
    Tensor grad = gap_bwd_op().call(g, input, target, optional(weight), ctx->saved_data["margin"].toDouble(),
                                    ctx->saved_data["p"].toInt(), ctx->saved_data["ignore_index"].toInt(),
                                    ctx->saved_data["class_normalize"].toBool(), ctx->saved_data["max_mode"].toBool());
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor2 gap_loss_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight, double margin,
                          int64_t p, int64_t ignore_index, bool class_normalize, bool max_mode, int64_t reduction) {
  auto r = GapLossFunction::apply(input, target, weight, margin, p, ignore_index, class_normalize, max_mode, reduction);
  return {r[0], r[1]};
}

// ---------------------------------------------------------------------------------------------------
// linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ...) -> (loss, lse, mass, stats,
// logprob, entropy).
// mean/sum with gradients wanted: the chunk loop computes them in the forward with unit row scales, as
// fp32 sums (fusedloss/ops/linear_cross_entropy.py's docstring), and the backward scales them once by
// grad / mass (mean) or grad (sum). none: the backward reruns the chunk loop with grad_scale = grad.
// extras (logprob, entropy): their gradients are only known in the backward, so the forward makes none
// and keeps the (N, 4) stats; the backward reruns the chunk loop with them (cross_entropy_bwd per chunk).

using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

const auto& lce_chunks_op() {
  static const auto op =
      kernel_op<Tensor6(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, int64_t, double, double, double, int64_t, bool, bool, bool,
                        const OptTensor&, const OptTensor&, const OptTensor&, bool)>(
          "fusedloss::linear_cross_entropy_chunks");
  return op;
}

Tensor6 linear_cross_entropy_impl(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                  const OptTensor& linear_bias, const OptTensor& weight, const OptTensor& token_weight,
                                  int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
                                  double softcap, int64_t chunk_size, bool extras) {
  auto [rows, lse, gi, gw, gb, stats] =
      lce_chunks_op().call(input, linear_weight, target, linear_bias, weight, std::nullopt, ignore_index,
                           label_smoothing, z_loss, softcap, chunk_size, false, false, false, std::nullopt,
                           std::nullopt, std::nullopt, extras);
  auto [out, mass] = reduce(rows, target, weight, token_weight, ignore_index, reduction);
  if (!extras) {
    const Tensor none = at::empty({0}, rows.options());
    return {out, lse, mass, stats, none, none.clone()};
  }
  return {out, lse, mass, stats, stats_column(stats, 2), stats_column(stats, 3)};
}

// t in dtype; t itself when it has it, without a call of aten::to (a dispatcher op, a microsecond).
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// saved * scale in `dtype`. In eager mode the saved fp32 sums are scaled in place (no second (V, D)
// buffer: the peak stays one weight gradient), so a second backward through the graph fails the saved
// tensors' version check (reported below). While traced (torch.compile: functional or fake tensors)
// the product is out of place: the saved buffers belong to the graph.
Tensor scaled(Tensor saved, const Tensor& scale, at::ScalarType dtype) {
  const bool traced = saved.key_set().has_any(
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
  return as_dtype(traced ? at::mul(saved, scale) : saved.mul_(scale), dtype);
}
// The same with a scale the host read (eager CPU only, so in place).
Tensor scaled(Tensor saved, float scale, at::ScalarType dtype) {
  saved.mul_(scale);
  return as_dtype(saved, dtype);
}

// The recompute backward (reduction none, or mean/sum when the forward made no gradients): the chunk loop
// with grad_scale = d loss / d l_i. Gradients in the parameters' dtypes, undefined where not needed.
struct LceRecompute : public torch::autograd::Function<LceRecompute> {
  struct Args {
    OptTensor bias, weight;
    OptTensor stats, grad_logprob, grad_entropy;  // the extras' backward (stats defined), else none
    int64_t ignore_index;
    double label_smoothing, z_loss, softcap;
    int64_t chunk_size;
    bool need_gi, need_gw, need_gb;
  };

  static variable_list run(const Tensor& g, const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                           const Args& a) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, lse, gi, gw, gb, stats] =
        lce_chunks_op().call(input, linear_weight, target, a.bias, a.weight, g, a.ignore_index, a.label_smoothing,
                             a.z_loss, a.softcap, a.chunk_size, a.need_gi, a.need_gw, a.need_gb, a.stats,
                             a.grad_logprob, a.grad_entropy, false);
    return {a.need_gi ? as_dtype(gi, input.scalar_type()) : Tensor(),
            a.need_gw ? as_dtype(gw, linear_weight.scalar_type()) : Tensor(),
            a.need_gb && a.bias.has_value() ? as_dtype(gb, a.bias->scalar_type()) : Tensor()};
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& g, const Tensor& input,
                               const Tensor& linear_weight, const Tensor& target, Args a) {
    auto r = run(g, input, linear_weight, target, a);
    for (auto& t : r) {
      if (!t.defined()) t = at::empty({0}, g.options());  // a Function's outputs must be defined
    }
    return r;
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fusedloss: linear_cross_entropy has no double backward (the gradient of its gradient)");
    return {};
  }
};

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& linear_weight,
                               const Tensor& target, const OptTensor& linear_bias, const OptTensor& weight,
                               const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                               double label_smoothing, double z_loss, double softcap, int64_t chunk_size,
                               bool extras, bool need_gi, bool need_gw, bool need_gb) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_reduction(reduction);
    ctx->set_materialize_grads(false);
    const bool in_forward = !extras && reduction != reduce::kNone && (need_gi || need_gw || need_gb);
    // The gradients made in the forward are those of sum_i u_i l_i: the token weights are the row scales.
    auto [rows, lse, gi, gw, gb, stats] =
        lce_chunks_op().call(input, linear_weight, target, linear_bias, weight,
                             in_forward ? token_weight : std::nullopt, ignore_index, label_smoothing, z_loss,
                             softcap, chunk_size, in_forward && need_gi, in_forward && need_gw,
                             in_forward && need_gb, std::nullopt, std::nullopt, std::nullopt, extras);
    auto [out, mass] = reduce(rows, target, weight, token_weight, ignore_index, reduction);
    const Tensor bias = linear_bias.value_or(Tensor());
    Tensor logprob = at::empty({0}, rows.options()), entropy = at::empty({0}, rows.options());
    if (extras) {
      logprob = stats_column(stats, 2);
      entropy = stats_column(stats, 3);
    }
    if (in_forward) {
      ctx->save_for_backward({gi, gw, gb, mass});
    } else {
      ctx->save_for_backward({input, linear_weight, target, bias, weight.value_or(Tensor()), mass,
                              token_weight.value_or(Tensor()), extras ? stats : Tensor()});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["softcap"] = softcap;
      ctx->saved_data["chunk_size"] = chunk_size;
    }
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["in_forward"] = in_forward;
    ctx->saved_data["need_gi"] = need_gi;
    ctx->saved_data["need_gw"] = need_gw;
    ctx->saved_data["need_gb"] = need_gb;
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(linear_weight.scalar_type());
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.defined() ? bias.scalar_type() : input.scalar_type());
    ctx->mark_non_differentiable({lse, mass, stats});
    return {out, lse, mass, stats, logprob, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(16);
    if (!grads[0].defined() && !grads[4].defined() && !grads[5].defined()) return result;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_gi = ctx->saved_data["need_gi"].toBool(), need_gw = ctx->saved_data["need_gw"].toBool(),
               need_gb = ctx->saved_data["need_gb"].toBool();
    const auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    Tensor gi, gw, gb;
    if (!ctx->saved_data["in_forward"].toBool()) {
      const auto saved = ctx->get_saved_variables();
      const Tensor &input = saved[0], &target = saved[2], &bias = saved[3], &mass = saved[5];
      const Tensor g = row_grad(grads[0], mass, reduction, input.size(0), mass.options(), saved[6]);
      const bool extras = saved[7].defined();
      LceRecompute::Args args{optional(bias),
                              optional(saved[4]),
                              optional(saved[7]),
                              extras ? optional(grads[4]) : std::nullopt,
                              extras ? optional(grads[5]) : std::nullopt,
                              ctx->saved_data["ignore_index"].toInt(),
                              ctx->saved_data["label_smoothing"].toDouble(),
                              ctx->saved_data["z_loss"].toDouble(),
                              ctx->saved_data["softcap"].toDouble(),
                              ctx->saved_data["chunk_size"].toInt(),
                              need_gi,
                              need_gw,
                              need_gb};
      // With create_graph=True (grad mode on) through a Function whose backward refuses a second order.
      const auto r = at::GradMode::is_enabled() ? LceRecompute::apply(g, input, saved[1], target, args)
                                                : LceRecompute::run(g, input, saved[1], target, args);
      gi = r[0];
      gw = r[1];
      gb = r[2];
    } else {
      // backward(create_graph=True): the gradients were made in the forward and would enter the new graph
      // as constants, so a gradient of them would silently miss this loss's curvature. Refused here.
      TORCH_CHECK(!at::GradMode::is_enabled(),
                  "fusedloss: linear_cross_entropy has no double backward (the gradient of its gradient): with "
                  "reduction='",
                  reduction == reduce::kMean ? "mean" : "sum",
                  "' its gradients are computed in the forward, so backward with create_graph=True is refused");
      variable_list saved;
      try {
        saved = ctx->get_saved_variables();
      } catch (const c10::Error&) {
        TORCH_CHECK(false,
                    "fusedloss.linear_cross_entropy: backward ran twice through one graph (retain_graph=True); "
                    "the gradients computed in the forward are consumed by the first backward. Recompute the "
                    "loss, or pass reduction='none' and reduce it yourself.");
      }
      const Tensor& mass = saved[3];
      // mean: grad / mass, but 0 when every row is ignored (its gradients are 0, not 0 * inf), as torch.
      const Tensor& grad = grads[0];
      if (host_readable(grad) && host_readable(mass) && grad.numel() == 1 && grad.scalar_type() == at::kFloat &&
          mass.scalar_type() == at::kFloat) {
        // CPU, eager, fp32 sums (the chunk loop's): the scale by the host, the same float product
        // as the 0-dim tensor below, without its three TensorIterator ops.
        float s = *grad.const_data_ptr<float>();
        if (reduction == reduce::kMean) {
          const float m = *mass.const_data_ptr<float>();
          s = m != 0 ? s / m : 0.0f;
        }
        if (need_gi) gi = scaled(saved[0], s, dtype("input_dtype"));
        if (need_gw) gw = scaled(saved[1], s, dtype("weight_dtype"));
        if (need_gb) gb = scaled(saved[2], s, dtype("bias_dtype"));
      } else {
        const Tensor scale =
            reduction == reduce::kMean ? at::where(mass.ne(0), at::div(grad, mass), 0) : grad;
        if (need_gi) gi = scaled(saved[0], scale, dtype("input_dtype"));
        if (need_gw) gw = scaled(saved[1], scale, dtype("weight_dtype"));
        if (need_gb) gb = scaled(saved[2], scale, dtype("bias_dtype"));
      }
    }
    if (need_gi) result[0] = gi;
    if (need_gw) result[1] = gw;
    if (need_gb) result[3] = gb;
    return result;
  }
};

Tensor6 linear_cross_entropy_autograd(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                      const OptTensor& linear_bias, const OptTensor& weight,
                                      const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                                      double label_smoothing, double z_loss, double softcap, int64_t chunk_size,
                                      bool extras) {
  const bool grad = at::GradMode::is_enabled();
  const bool need_gi = grad && input.requires_grad();
  const bool need_gw = grad && linear_weight.requires_grad();
  const bool need_gb = grad && linear_bias.has_value() && linear_bias->requires_grad();
  auto r = LinearCrossEntropyFunction::apply(input, linear_weight, target, linear_bias, weight, token_weight,
                                             ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, extras,
                                             need_gi, need_gw, need_gb);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// ---------------------------------------------------------------------------------------------------
// info_nce_lse_fwd(query, key, scale, cols, labels, key_groups) -> (lse_rows, lse_cols, pos, npos): InfoNCE's
// kernel op carries its own autograd (fusedloss/info_nce_math.h: the backward op is the gradient of
// g . lse_rows + h . lse_cols + u . pos; npos is an integer count). Its Triton twin keeps torch.library's
// Python formula (fusedloss/ops/info_nce.py), which this mirrors.

const auto& nce_fwd_op() {
  static const auto op = kernel_op<Tensor4(const Tensor&, const Tensor&, const Tensor&, bool, const OptTensor&,
                                           const OptTensor&)>("fusedloss::info_nce_lse_fwd");
  return op;
}

const auto& nce_bwd_op() {
  static const auto op =
      kernel_op<Tensor3(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
                        const OptTensor&)>("fusedloss::info_nce_lse_bwd");
  return op;
}

struct InfoNCELseFunction : public torch::autograd::Function<InfoNCELseFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& scale,
                               bool cols, const OptTensor& labels, const OptTensor& key_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // the unused outputs need no zero gradients; backward handles undefined ones
    auto [lse_rows, lse_cols, pos, npos] = nce_fwd_op().call(query, key, scale, cols, labels, key_groups);
    ctx->save_for_backward({query, key, scale, lse_rows, lse_cols, pos, npos, labels.value_or(Tensor()),
                            key_groups.value_or(Tensor())});
    ctx->saved_data["cols"] = cols;
    ctx->mark_non_differentiable({npos});
    return {lse_rows, lse_cols, pos, npos};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &query = saved[0], &key = saved[1], &scale = saved[2], &lse_rows = saved[3], &lse_cols = saved[4],
                 &pos = saved[5], &npos = saved[6];
    const Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(lse_rows);  // only lse_cols or pos was used
    const OptTensor h = ctx->saved_data["cols"].toBool() ? optional(grads[1]) : std::nullopt;
    MaybeBelowAutograd below;
    auto [grad_query, grad_key, grad_scale] =
        nce_bwd_op().call(g, h, optional(grads[2]), query, key, scale, lse_rows, h ? OptTensor(lse_cols) : std::nullopt,
                          pos, npos, optional(saved[7]), optional(saved[8]));
    return {grad_query, grad_key, grad_scale, Tensor(), Tensor(), Tensor()};
  }
};

Tensor4 info_nce_lse_autograd(const Tensor& query, const Tensor& key, const Tensor& scale, bool cols,
                              const OptTensor& labels, const OptTensor& key_groups) {
  auto r = InfoNCELseFunction::apply(query, key, scale, cols, labels, key_groups);
  return {r[0], r[1], r[2], r[3]};
}

// info_nce_fwd_grad(query, key, scale, labels, key_groups, query_grad, key_grad, scale_grad) -> (total, npos,
// grad_query, grad_key, grad_scale): the kernel makes the gradients of total in the forward (csrc/cpu/
// info_nce.cpp says why); the backward multiplies them by the upstream gradient of total. The saved
// gradients are kept, so a second backward through a retained graph scales them again.

const auto& nce_fwd_grad_op() {
  static const auto op = kernel_op<Tensor5(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const OptTensor&, bool, bool, bool)>("fusedloss::info_nce_fwd_grad");
  return op;
}

// backward(create_graph=True) of the fused forward: its gradients were made in the forward and would
// enter the new graph as constants, missing the loss's curvature; any gradient through them is refused.
struct InfoNCEFwdGradSecondOrder : public torch::autograd::Function<InfoNCEFwdGradSecondOrder> {
  static variable_list forward(AutogradContext*, const Tensor& query, const Tensor& key, const Tensor& scale,
                               const Tensor& gq, const Tensor& gk, const Tensor& gs) {
    return {gq, gk, gs};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fusedloss: info_nce has no double backward (the gradient of its gradient)");
    return {};
  }
};

struct InfoNCEFwdGradFunction : public torch::autograd::Function<InfoNCEFwdGradFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& scale,
                               const OptTensor& labels, const OptTensor& key_groups, bool query_grad, bool key_grad,
                               bool scale_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    auto [total, npos, gq, gk, gs] =
        nce_fwd_grad_op().call(query, key, scale, labels, key_groups, query_grad, key_grad, scale_grad);
    ctx->save_for_backward({query, key, scale, gq, gk, gs});
    ctx->saved_data["query_grad"] = query_grad;
    ctx->saved_data["key_grad"] = key_grad;
    ctx->saved_data["scale_grad"] = scale_grad;
    ctx->mark_non_differentiable({npos, gq, gk, gs});
    return {total, npos, gq, gk, gs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(8);
    if (!grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor &query = saved[0], &key = saved[1], &scale = saved[2];
    const Tensor& g = grads[0];
    // The gradients times the upstream scalar, in each gradient's dtype (float64 for a learnable
    // temperature's scale: rounded once more, here, as the two-pass path's float64 sum is).
    const auto times = [&](const Tensor& t, bool wanted) {
      return wanted ? at::mul(t, g.to(t.scalar_type())) : Tensor();
    };
    Tensor gq = times(saved[3], ctx->saved_data["query_grad"].toBool());
    Tensor gk = times(saved[4], ctx->saved_data["key_grad"].toBool());
    Tensor gs = times(saved[5], ctx->saved_data["scale_grad"].toBool());
    if (at::GradMode::is_enabled()) {
      const auto undef_to_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, g.options()); };
      auto r = InfoNCEFwdGradSecondOrder::apply(query, key, scale, undef_to_empty(gq), undef_to_empty(gk),
                                                undef_to_empty(gs));
      gq = gq.defined() ? r[0] : Tensor();
      gk = gk.defined() ? r[1] : Tensor();
      gs = gs.defined() ? r[2] : Tensor();
    }
    result[0] = gq;
    result[1] = gk;
    result[2] = gs;
    return result;
  }
};

Tensor5 info_nce_fwd_grad_autograd(const Tensor& query, const Tensor& key, const Tensor& scale,
                                   const OptTensor& labels, const OptTensor& key_groups, bool query_grad,
                                   bool key_grad, bool scale_grad) {
  auto r = InfoNCEFwdGradFunction::apply(query, key, scale, labels, key_groups, query_grad, key_grad, scale_grad);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &fusedloss::cross_entropy_impl);
  m.impl("focal_loss", &fusedloss::focal_loss_impl);
  m.impl("gap_loss", &fusedloss::gap_loss_impl);
  m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy_impl);
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("cross_entropy", &fusedloss::cross_entropy_autograd);
  m.impl("focal_loss", &fusedloss::focal_loss_autograd);
  m.impl("gap_loss", &fusedloss::gap_loss_autograd);
  m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy_autograd);
  m.impl("info_nce_lse_fwd", &fusedloss::info_nce_lse_autograd);
  m.impl("info_nce_fwd_grad", &fusedloss::info_nce_fwd_grad_autograd);
}
