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
//   Autograd: the same forward below autograd, then, when an input needs a gradient, a backward node
//     of our own (a torch::autograd::Node, as torch's generated code writes them: saved tensors and
//     scalars as members) whose apply calls the gradient kernel. The kernel ops it calls have fake
//     kernels (fusedloss/ops/), so torch.compile traces through it as through ATen's own formulas.
//     torch::autograd::Function is kept only for the double-backward refusals, a rare path.
// Every op returns, after its loss, what its backward needs (stats, coef, the mean's denominator
// "mass"), without autograd history; the Triton twins (fusedloss/ops/, Python autograd) return the
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
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>

namespace fusedloss {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
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

// How a node is owned: torch up to 2.12 holds nodes in std::shared_ptr, 2.13 on in c10::intrusive_ptr
// (Edge::function has the type). Both branches are templates, so only the one in use is compiled.
template <bool Intrusive>
struct NodeOwner;
template <>
struct NodeOwner<false> {
  // With torch's deleter, which frees a long chain of nodes without recursing once per node.
  template <class T>
  static std::shared_ptr<T> make() {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });  // by argument-dependent lookup
  }
  template <class N>
  static std::shared_ptr<N> from_this(N* node) {
    return node->shared_from_this();
  }
};
template <>
struct NodeOwner<true> {
  template <class T>
  static c10::intrusive_ptr<T> make() {
    return c10::make_intrusive<T>();
  }
  template <class N>
  static c10::intrusive_ptr<N> from_this(N* node) {
    return c10::intrusive_ptr<N>::unsafe_reclaim_from_nonowning(node);
  }
};
using Owner = NodeOwner<!std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<Node>>>;

// What the backward nodes below share. Derived names itself (kName), lists its SavedVariables
// (saved(): released after a backward without retain_graph, so a second backward fails in
// SavedVariable::unpack with torch's own message) and fills one gradient per tensor input of the
// forward in backward(grads, result) (undefined where there is none). The node's lock is held around
// both, as in torch's generated nodes.
template <class Derived>
struct BackwardNode : public Node {
  std::string name() const override { return Derived::kName; }

  bool released_ = false;  // the engine freed the saved tensors (a backward without retain_graph)

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    released_ = true;
    std::apply([](auto&... saved) { (saved.reset_data(), ...); }, static_cast<Derived*>(this)->saved());
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(num_outputs());
    static_cast<Derived*>(this)->backward(grads, result);
    return result;
  }

  // The node itself, for SavedVariable::unpack of its own outputs: an output is saved without its
  // grad_fn (is_output=true: no reference cycle node -> output -> node) and gets it back from here.
  auto self() { return Owner::from_this(static_cast<Node*>(this)); }
};

// The node of a call whose inputs need gradients, with one edge per tensor input in argument order
// (only the first gets a gradient; the others' are undefined, as a Function's), or null. Forward-mode
// AD has no formula here: refused, not silently dropped.
template <class NodeT, class... Inputs>
auto make_node(const char* op, const Inputs&... inputs) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(torch::autograd::isFwGradDefined(inputs) || ...),
                              "fusedloss.", op, " has no forward-mode AD formula (forward AD / jvp)");
  if (!torch::autograd::compute_requires_grad(inputs...)) return decltype(Owner::make<NodeT>()){};
  auto node = Owner::make<NodeT>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

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

// Its backward node, written as torch's generated autograd code writes one (a Node with its saved
// tensors and scalars as members) rather than as a torch::autograd::Function: at the sizes where a
// call costs microseconds, Function's generic machinery (a string-keyed hash map for the scalars,
// per-output bookkeeping, the node's name demangled on every backward) costs a fair share of the call
// (README, "Per-call cost at tiny sizes").
struct CrossEntropyBackward final : public BackwardNode<CrossEntropyBackward> {
  static constexpr const char* kName = "CrossEntropyBackward";
  SavedVariable logits_, target_, weight_, stats_, mass_, token_weight_;
  int64_t ignore_index_ = 0, reduction_ = 0;
  double label_smoothing_ = 0, z_loss_ = 0, softcap_ = 0, temperature_ = 1;

  auto saved() { return std::tie(logits_, target_, weight_, stats_, mass_, token_weight_); }

  // grads: of (loss, lse), then of (logprob, entropy) when the forward had the extras.
  void backward(const variable_list& grads, variable_list& result) {
    if (!should_compute_output(0)) return;
    const auto me = self();
    const Tensor logits = logits_.unpack(), stats = stats_.unpack(me);
    const Tensor g = row_grad(grads[0], mass_.unpack(me), reduction_, logits.size(0), stats.options(),
                              token_weight_.unpack());
    const bool extras = grads.size() == 4;
    MaybeBelowAutograd below;
    result[0] = ce_bwd_op().call(g, optional(grads[1]), logits, target_.unpack(), optional(weight_.unpack()),
                                 stats, ignore_index_, label_smoothing_, z_loss_, softcap_, temperature_,
                                 extras ? optional(grads[2]) : std::nullopt,
                                 extras ? optional(grads[3]) : std::nullopt);
  }
};

Tensor6 cross_entropy_autograd(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                               const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                               double label_smoothing, double z_loss, double softcap, double temperature,
                               bool extras) {
  auto node = make_node<CrossEntropyBackward>("cross_entropy", logits, target, weight, token_weight);
  Tensor6 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = cross_entropy_impl(logits, target, weight, token_weight, ignore_index, reduction, label_smoothing, z_loss,
                           softcap, temperature, extras);
  }
  if (!node) return r;
  const auto& [out, lse, stats, mass, logprob, entropy] = r;
  // Without extras, logprob and entropy are (0,) placeholders the caller drops: no history.
  torch::autograd::set_history(extras ? std::vector<Tensor>{out, lse, logprob, entropy} : std::vector<Tensor>{out, lse},
                               node);
  node->logits_ = SavedVariable(logits, false);
  node->target_ = SavedVariable(target, false);
  node->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  node->stats_ = SavedVariable(stats, true);
  node->mass_ = SavedVariable(mass, true);
  node->token_weight_ = SavedVariable(token_weight.value_or(Tensor()), false);
  node->ignore_index_ = ignore_index;
  node->reduction_ = reduction;
  node->label_smoothing_ = label_smoothing;
  node->z_loss_ = z_loss;
  node->softcap_ = softcap;
  node->temperature_ = temperature;
  return r;
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

struct FocalLossBackward final : public BackwardNode<FocalLossBackward> {
  static constexpr const char* kName = "FocalLossBackward";
  SavedVariable logits_, target_, stats_, coef_, mass_, token_weight_;
  int64_t ignore_index_ = 0, reduction_ = 0;

  auto saved() { return std::tie(logits_, target_, stats_, coef_, mass_, token_weight_); }

  void backward(const variable_list& grads, variable_list& result) {
    if (!should_compute_output(0)) return;
    const auto me = self();
    const Tensor logits = logits_.unpack(), stats = stats_.unpack(me);
    const Tensor g = row_grad(grads[0], mass_.unpack(me), reduction_, logits.size(0), stats.options(),
                              times_token_weight(coef_.unpack(me), token_weight_.unpack()));
    MaybeBelowAutograd below;
    result[0] = ce_bwd_op().call(g, std::nullopt, logits, target_.unpack(), std::nullopt, stats, ignore_index_,
                                 0.0, 0.0, 0.0, 1.0, std::nullopt, std::nullopt);
  }
};

Tensor4 focal_loss_autograd(const Tensor& logits, const Tensor& target, const OptTensor& factor,
                            const OptTensor& weight, const OptTensor& token_weight, int64_t ignore_index,
                            int64_t reduction, double gamma) {
  auto node = make_node<FocalLossBackward>("focal_loss", logits, target, factor, weight, token_weight);
  Tensor4 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = focal_loss_impl(logits, target, factor, weight, token_weight, ignore_index, reduction, gamma);
  }
  if (!node) return r;
  const auto& [out, stats, coef, mass] = r;
  torch::autograd::set_history(out, node);
  node->logits_ = SavedVariable(logits, false);
  node->target_ = SavedVariable(target, false);
  node->stats_ = SavedVariable(stats, true);
  node->coef_ = SavedVariable(coef, true);
  node->mass_ = SavedVariable(mass, true);
  node->token_weight_ = SavedVariable(token_weight.value_or(Tensor()), false);
  node->ignore_index_ = ignore_index;
  node->reduction_ = reduction;
  return r;
}

// ---------------------------------------------------------------------------------------------------
// gap_loss(input, target, weight, ...) -> (loss, mass). Its mean counts the kept rows (no weights).

Tensor2 gap_loss_impl(const Tensor& input, const Tensor& target, const OptTensor& weight, double margin, int64_t p,
                      int64_t ignore_index, bool class_normalize, bool max_mode, int64_t reduction) {
  Tensor loss = gap_fwd_op().call(input, target, weight, margin, p, ignore_index, class_normalize, max_mode);
  return reduce(loss, target, std::nullopt, std::nullopt, ignore_index, reduction);
}

struct GapLossBackward final : public BackwardNode<GapLossBackward> {
  static constexpr const char* kName = "GapLossBackward";
  SavedVariable input_, target_, weight_, mass_;
  double margin_ = 0;
  int64_t p_ = 1, ignore_index_ = 0, reduction_ = 0;
  bool class_normalize_ = false, max_mode_ = false;

  auto saved() { return std::tie(input_, target_, weight_, mass_); }

  void backward(const variable_list& grads, variable_list& result) {
    if (!should_compute_output(0)) return;
    const Tensor input = input_.unpack(), mass = mass_.unpack(self());
    const Tensor g = row_grad(grads[0], mass, reduction_, input.size(0), mass.options());
    MaybeBelowAutograd below;
    result[0] = gap_bwd_op().call(g, input, target_.unpack(), optional(weight_.unpack()), margin_, p_,
                                  ignore_index_, class_normalize_, max_mode_);
  }
};

Tensor2 gap_loss_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight, double margin,
                          int64_t p, int64_t ignore_index, bool class_normalize, bool max_mode, int64_t reduction) {
  auto node = make_node<GapLossBackward>("gap_loss", input, target, weight);
  Tensor2 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = gap_loss_impl(input, target, weight, margin, p, ignore_index, class_normalize, max_mode, reduction);
  }
  if (!node) return r;
  const auto& [out, mass] = r;
  torch::autograd::set_history(out, node);
  node->input_ = SavedVariable(input, false);
  node->target_ = SavedVariable(target, false);
  node->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  node->mass_ = SavedVariable(mass, true);
  node->margin_ = margin;
  node->p_ = p;
  node->ignore_index_ = ignore_index;
  node->class_normalize_ = class_normalize;
  node->max_mode_ = max_mode;
  node->reduction_ = reduction;
  return r;
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

struct LinearCrossEntropyBackward final : public BackwardNode<LinearCrossEntropyBackward> {
  static constexpr const char* kName = "LinearCrossEntropyBackward";
  // in_forward: the gradients made by the forward (gi, gw, gb) and mass; else what the recompute needs.
  SavedVariable input_, linear_weight_, target_, bias_, weight_, mass_, token_weight_, stats_, gi_, gw_, gb_;
  int64_t ignore_index_ = 0, reduction_ = 0, chunk_size_ = 0;
  double label_smoothing_ = 0, z_loss_ = 0, softcap_ = 0;
  bool in_forward_ = false, extras_ = false, need_gi_ = false, need_gw_ = false, need_gb_ = false;
  at::ScalarType input_dtype_ = at::kFloat, weight_dtype_ = at::kFloat, bias_dtype_ = at::kFloat;

  auto saved() {
    return std::tie(input_, linear_weight_, target_, bias_, weight_, mass_, token_weight_, stats_, gi_, gw_, gb_);
  }

  // grads: of the loss, then of (logprob, entropy) when the forward had the extras.
  void backward(const variable_list& grads, variable_list& result) {
    const Tensor none;
    const Tensor& grad_logprob = extras_ ? grads[1] : none;
    const Tensor& grad_entropy = extras_ ? grads[2] : none;
    if (!grads[0].defined() && !grad_logprob.defined() && !grad_entropy.defined()) return;
    Tensor gi, gw, gb;
    if (!in_forward_) {
      const Tensor input = input_.unpack(), mass = mass_.unpack(self());
      const Tensor g = row_grad(grads[0], mass, reduction_, input.size(0), mass.options(), token_weight_.unpack());
      LceRecompute::Args args{optional(bias_.unpack()),
                              optional(weight_.unpack()),
                              extras_ ? optional(stats_.unpack(self())) : std::nullopt,
                              optional(grad_logprob),
                              optional(grad_entropy),
                              ignore_index_,
                              label_smoothing_,
                              z_loss_,
                              softcap_,
                              chunk_size_,
                              need_gi_,
                              need_gw_,
                              need_gb_};
      const Tensor linear_weight = linear_weight_.unpack(), target = target_.unpack();
      // With create_graph=True (grad mode on) through a Function whose backward refuses a second order.
      const auto r = at::GradMode::is_enabled() ? LceRecompute::apply(g, input, linear_weight, target, args)
                                                : LceRecompute::run(g, input, linear_weight, target, args);
      gi = r[0];
      gw = r[1];
      gb = r[2];
    } else {
      // backward(create_graph=True): the gradients were made in the forward and would enter the new graph
      // as constants, so a gradient of them would silently miss this loss's curvature. Refused here.
      TORCH_CHECK(!at::GradMode::is_enabled(),
                  "fusedloss: linear_cross_entropy has no double backward (the gradient of its gradient): with "
                  "reduction='",
                  reduction_ == reduce::kMean ? "mean" : "sum",
                  "' its gradients are computed in the forward, so backward with create_graph=True is refused");
      Tensor saved_gi, saved_gw, saved_gb, mass;
      try {
        saved_gi = gi_.unpack();
        saved_gw = gw_.unpack();
        saved_gb = gb_.unpack();
        mass = mass_.unpack(self());
      } catch (const c10::Error&) {
        // Without retain_graph the engine freed them: torch's own message says so.
        if (released_) throw;
        TORCH_CHECK(false,
                    "fusedloss.linear_cross_entropy: backward ran twice through one graph (retain_graph=True); "
                    "the gradients computed in the forward are consumed by the first backward. Recompute the "
                    "loss, or pass reduction='none' and reduce it yourself.");
      }
      // mean: grad / mass, but 0 when every row is ignored (its gradients are 0, not 0 * inf), as torch.
      const Tensor& grad = grads[0];
      if (host_readable(grad) && host_readable(mass) && grad.numel() == 1 && grad.scalar_type() == at::kFloat &&
          mass.scalar_type() == at::kFloat) {
        // CPU, eager, fp32 sums (the chunk loop's): the scale by the host, the same float product
        // as the 0-dim tensor below, without its three TensorIterator ops.
        float s = *grad.const_data_ptr<float>();
        if (reduction_ == reduce::kMean) {
          const float m = *mass.const_data_ptr<float>();
          s = m != 0 ? s / m : 0.0f;
        }
        if (need_gi_) gi = scaled(saved_gi, s, input_dtype_);
        if (need_gw_) gw = scaled(saved_gw, s, weight_dtype_);
        if (need_gb_) gb = scaled(saved_gb, s, bias_dtype_);
      } else {
        const Tensor scale = reduction_ == reduce::kMean ? at::where(mass.ne(0), at::div(grad, mass), 0) : grad;
        if (need_gi_) gi = scaled(saved_gi, scale, input_dtype_);
        if (need_gw_) gw = scaled(saved_gw, scale, weight_dtype_);
        if (need_gb_) gb = scaled(saved_gb, scale, bias_dtype_);
      }
    }
    if (need_gi_) result[0] = gi;
    if (need_gw_) result[1] = gw;
    if (need_gb_) result[3] = gb;
  }
};

Tensor6 linear_cross_entropy_autograd(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                      const OptTensor& linear_bias, const OptTensor& weight,
                                      const OptTensor& token_weight, int64_t ignore_index, int64_t reduction,
                                      double label_smoothing, double z_loss, double softcap, int64_t chunk_size,
                                      bool extras) {
  check_reduction(reduction);
  auto node = make_node<LinearCrossEntropyBackward>("linear_cross_entropy", input, linear_weight, target, linear_bias,
                                                    weight, token_weight);
  const bool need_gi = node && input.requires_grad();
  const bool need_gw = node && linear_weight.requires_grad();
  const bool need_gb = node && linear_bias.has_value() && linear_bias->requires_grad();
  const bool in_forward = !extras && reduction != reduce::kNone && (need_gi || need_gw || need_gb);
  Tensor rows, lse, gi, gw, gb, stats, out, mass, logprob, entropy;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The gradients made in the forward are those of sum_i u_i l_i: the token weights are the row scales.
    std::tie(rows, lse, gi, gw, gb, stats) =
        lce_chunks_op().call(input, linear_weight, target, linear_bias, weight,
                             in_forward ? token_weight : std::nullopt, ignore_index, label_smoothing, z_loss,
                             softcap, chunk_size, in_forward && need_gi, in_forward && need_gw,
                             in_forward && need_gb, std::nullopt, std::nullopt, std::nullopt, extras);
    std::tie(out, mass) = reduce(rows, target, weight, token_weight, ignore_index, reduction);
    if (extras) {
      logprob = stats_column(stats, 2);
      entropy = stats_column(stats, 3);
    } else {
      logprob = at::empty({0}, rows.options());
      entropy = at::empty({0}, rows.options());
    }
  }
  if (!node) return {out, lse, mass, stats, logprob, entropy};
  torch::autograd::set_history(extras ? std::vector<Tensor>{out, logprob, entropy} : std::vector<Tensor>{out}, node);
  node->mass_ = SavedVariable(mass, true);
  if (in_forward) {
    node->gi_ = SavedVariable(gi, false);
    node->gw_ = SavedVariable(gw, false);
    node->gb_ = SavedVariable(gb, false);
  } else {
    node->input_ = SavedVariable(input, false);
    node->linear_weight_ = SavedVariable(linear_weight, false);
    node->target_ = SavedVariable(target, false);
    node->bias_ = SavedVariable(linear_bias.value_or(Tensor()), false);
    node->weight_ = SavedVariable(weight.value_or(Tensor()), false);
    node->token_weight_ = SavedVariable(token_weight.value_or(Tensor()), false);
    if (extras) node->stats_ = SavedVariable(stats, true);
  }
  node->ignore_index_ = ignore_index;
  node->reduction_ = reduction;
  node->label_smoothing_ = label_smoothing;
  node->z_loss_ = z_loss;
  node->softcap_ = softcap;
  node->chunk_size_ = chunk_size;
  node->in_forward_ = in_forward;
  node->extras_ = extras;
  node->need_gi_ = need_gi;
  node->need_gw_ = need_gw;
  node->need_gb_ = need_gb;
  node->input_dtype_ = input.scalar_type();
  node->weight_dtype_ = linear_weight.scalar_type();
  node->bias_dtype_ = linear_bias.has_value() ? linear_bias->scalar_type() : input.scalar_type();
  return {out, lse, mass, stats, logprob, entropy};
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

struct InfoNCELseBackward final : public BackwardNode<InfoNCELseBackward> {
  static constexpr const char* kName = "InfoNCELseBackward";
  SavedVariable query_, key_, scale_, lse_rows_, lse_cols_, pos_, npos_, labels_, key_groups_;
  bool cols_ = false;

  auto saved() { return std::tie(query_, key_, scale_, lse_rows_, lse_cols_, pos_, npos_, labels_, key_groups_); }

  // grads: of (lse_rows, lse_cols, pos).
  void backward(const variable_list& grads, variable_list& result) {
    const auto me = self();
    const Tensor lse_rows = lse_rows_.unpack(me);
    const Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(lse_rows);  // only lse_cols or pos was used
    const OptTensor h = cols_ ? optional(grads[1]) : std::nullopt;
    MaybeBelowAutograd below;
    auto [grad_query, grad_key, grad_scale] =
        nce_bwd_op().call(g, h, optional(grads[2]), query_.unpack(), key_.unpack(), scale_.unpack(), lse_rows,
                          h ? OptTensor(lse_cols_.unpack(me)) : std::nullopt, pos_.unpack(me), npos_.unpack(me),
                          optional(labels_.unpack()), optional(key_groups_.unpack()));
    result[0] = grad_query;
    result[1] = grad_key;
    result[2] = grad_scale;
  }
};

Tensor4 info_nce_lse_autograd(const Tensor& query, const Tensor& key, const Tensor& scale, bool cols,
                              const OptTensor& labels, const OptTensor& key_groups) {
  auto node = make_node<InfoNCELseBackward>("info_nce", query, key, scale, labels, key_groups);
  Tensor4 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = nce_fwd_op().call(query, key, scale, cols, labels, key_groups);
  }
  if (!node) return r;
  const auto& [lse_rows, lse_cols, pos, npos] = r;
  torch::autograd::set_history({lse_rows, lse_cols, pos}, node);
  node->query_ = SavedVariable(query, false);
  node->key_ = SavedVariable(key, false);
  node->scale_ = SavedVariable(scale, false);
  node->lse_rows_ = SavedVariable(lse_rows, true);
  node->lse_cols_ = SavedVariable(lse_cols, true);
  node->pos_ = SavedVariable(pos, true);
  node->npos_ = SavedVariable(npos, true);
  node->labels_ = SavedVariable(labels.value_or(Tensor()), false);
  node->key_groups_ = SavedVariable(key_groups.value_or(Tensor()), false);
  node->cols_ = cols;
  return r;
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

struct InfoNCEFwdGradBackward final : public BackwardNode<InfoNCEFwdGradBackward> {
  static constexpr const char* kName = "InfoNCEFwdGradBackward";
  SavedVariable query_, key_, scale_, gq_, gk_, gs_;
  bool query_grad_ = false, key_grad_ = false, scale_grad_ = false;

  auto saved() { return std::tie(query_, key_, scale_, gq_, gk_, gs_); }

  void backward(const variable_list& grads, variable_list& result) {
    if (!grads[0].defined()) return;
    const Tensor& g = grads[0];
    // The gradients times the upstream scalar, in each gradient's dtype (float64 for a learnable
    // temperature's scale: rounded once more, here, as the two-pass path's float64 sum is).
    const auto times = [&](const SavedVariable& t, bool wanted) {
      if (!wanted) return Tensor();
      const Tensor made = t.unpack(self());
      return at::mul(made, g.to(made.scalar_type()));
    };
    Tensor gq = times(gq_, query_grad_);
    Tensor gk = times(gk_, key_grad_);
    Tensor gs = times(gs_, scale_grad_);
    if (at::GradMode::is_enabled()) {
      const auto undef_to_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, g.options()); };
      auto r = InfoNCEFwdGradSecondOrder::apply(query_.unpack(), key_.unpack(), scale_.unpack(), undef_to_empty(gq),
                                                undef_to_empty(gk), undef_to_empty(gs));
      gq = gq.defined() ? r[0] : Tensor();
      gk = gk.defined() ? r[1] : Tensor();
      gs = gs.defined() ? r[2] : Tensor();
    }
    result[0] = gq;
    result[1] = gk;
    result[2] = gs;
  }
};

Tensor5 info_nce_fwd_grad_autograd(const Tensor& query, const Tensor& key, const Tensor& scale,
                                   const OptTensor& labels, const OptTensor& key_groups, bool query_grad,
                                   bool key_grad, bool scale_grad) {
  auto node = make_node<InfoNCEFwdGradBackward>("info_nce", query, key, scale, labels, key_groups);
  Tensor5 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = nce_fwd_grad_op().call(query, key, scale, labels, key_groups, query_grad, key_grad, scale_grad);
  }
  if (!node) return r;
  const auto& [total, npos, gq, gk, gs] = r;
  torch::autograd::set_history(total, node);
  node->query_ = SavedVariable(query, false);
  node->key_ = SavedVariable(key, false);
  node->scale_ = SavedVariable(scale, false);
  node->gq_ = SavedVariable(gq, true);
  node->gk_ = SavedVariable(gk, true);
  node->gs_ = SavedVariable(gs, true);
  node->query_grad_ = query_grad;
  node->key_grad_ = key_grad;
  node->scale_grad_ = scale_grad;
  return r;
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
