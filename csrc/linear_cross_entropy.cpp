// The chunk loop of linear cross-entropy, cross_entropy(input @ linear_weight.T + linear_bias, target)
// without the (N, V) logits: fusedloss::linear_cross_entropy_chunks, for CPU and CUDA tensors alike
// (BLAS / cuBLAS GEMMs through ATen, the fused row kernels through the dispatcher). In C++ so that a
// call costs no Python between the public function and the GEMMs (the public-level op and its autograd
// are in csrc/autograd.cpp). fusedloss/ops/linear_cross_entropy.py has the math (its module docstring),
// the chunk-size rule (auto_chunk_size: the caller passes the size) and the Python twin of this loop
// (chunked), which the triton backend's float64 path runs with the Triton row kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace fusedloss {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// CPU chunks of at least this many logits take the class-major loop (the same constant as
// fusedloss/ops/linear_cross_entropy.py's CLASS_MAJOR_MIN_LOGITS, which says why).
constexpr int64_t kClassMajorMinLogits = int64_t(1) << 20;

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const auto& ce_fwd_op() {
  static const auto op = kernel_op<Tensor3(const Tensor&, const Tensor&, const OptTensor&, int64_t, double, double,
                                           double, double, bool)>("fusedloss::cross_entropy_fwd");
  return op;
}
using FwdGradSig = Tensor2(Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, double, double, double,
                           double);
const auto& fwd_grad_op() {
  static const auto op = kernel_op<FwdGradSig>("fusedloss::cross_entropy_fwd_grad_");
  return op;
}
const auto& ce_bwd_op() {
  static const auto op =
      kernel_op<Tensor(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                       int64_t, double, double, double, double, const OptTensor&, const OptTensor&)>(
          "fusedloss::cross_entropy_bwd");
  return op;
}
const auto& fwd_grad_cols_op() {
  static const auto op = kernel_op<FwdGradSig>("fusedloss::cross_entropy_fwd_grad_cols_");
  return op;
}

// t in dtype; t itself when it has it, without a call of aten::to (a dispatcher op, a microsecond).
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// CUDA bf16/fp16 operands with fp32 results straight from cuBLAS (the out_dtype overloads aten::mm.dtype,
// addmm.dtype and their out= forms, CUDA-only). Elsewhere the operands are cast to the accumulation
// dtype: CPU bf16/fp16 GEMMs are emulated (slower than fp32). The overloads are looked up at run time,
// not called through ATen's headers, so that the extension also builds against a torch without them
// (mixed_precision() is then false).
std::optional<c10::OperatorHandle> aten_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findOp({name, overload});
}

bool mixed_precision(const Tensor& input) {
  if (!input.is_cuda() || (input.scalar_type() != at::kHalf && input.scalar_type() != at::kBFloat16)) return false;
  static const bool has = [] {
    for (const char* overload : {"dtype", "dtype_out"}) {
      for (const char* name : {"aten::mm", "aten::addmm"}) {
        auto op = aten_op(name, overload);
        if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return false;
      }
    }
    return true;
  }();
  return has;
}

Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  static const auto op = aten_op("aten::mm", "dtype")->typed<Tensor(const Tensor&, const Tensor&, at::ScalarType)>();
  return op.call(a, b, acc);
}
Tensor addmm_acc(const Tensor& bias, const Tensor& a, const Tensor& b, at::ScalarType acc) {
  static const auto op =
      aten_op("aten::addmm", "dtype")
          ->typed<Tensor(const Tensor&, const Tensor&, const Tensor&, at::ScalarType, const at::Scalar&,
                         const at::Scalar&)>();
  return op.call(bias, a, b, acc, 1, 1);
}
void mm_acc_out(Tensor& out, const Tensor& a, const Tensor& b, at::ScalarType acc) {
  static const auto op =
      aten_op("aten::mm", "dtype_out")->typed<Tensor&(const Tensor&, const Tensor&, at::ScalarType, Tensor&)>();
  op.call(a, b, acc, out);
}
void addmm_acc_out(Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b, at::ScalarType acc) {
  static const auto op =
      aten_op("aten::addmm", "dtype_out")
          ->typed<Tensor&(const Tensor&, const Tensor&, const Tensor&, at::ScalarType, const at::Scalar&,
                          const at::Scalar&, Tensor&)>();
  op.call(bias, a, b, acc, 1, 1, out);
}

// out = a @ b (+ bias), with fp32 results from 16-bit operands when mixed.
void mm_into(Tensor& out, const OptTensor& bias, const Tensor& a, const Tensor& b, bool mixed, at::ScalarType acc) {
  if (bias.has_value()) {
    if (mixed) {
      addmm_acc_out(out, *bias, a, b, acc);
    } else {
      at::addmm_out(out, *bias, a, b);
    }
  } else if (mixed) {
    mm_acc_out(out, a, b, acc);
  } else {
    at::mm_out(out, a, b);
  }
}

// The loop below with one chunk: every output straight from its kernel, no buffers to fill and copy
// (at small sizes, what a call costs is its count of ops).
Tensor5 one_chunk(const Tensor& input, const Tensor& w_op, const Tensor& target, const OptTensor& b_acc,
                  const OptTensor& weight, const OptTensor& grad_scale, int64_t ignore_index, double label_smoothing,
                  double z_loss, double softcap, bool input_grad, bool weight_grad, bool bias_grad, bool mixed,
                  at::ScalarType acc) {
  const auto opts = input.options().dtype(acc);
  const Tensor x = as_dtype(input, w_op.scalar_type());
  Tensor logits = b_acc.has_value() ? (mixed ? addmm_acc(*b_acc, x, w_op.t(), acc) : at::addmm(*b_acc, x, w_op.t()))
                                    : (mixed ? mm_acc(x, w_op.t(), acc) : at::mm(x, w_op.t()));
  if (!(input_grad || weight_grad || bias_grad)) {
    auto [loss, lse, stats] =
        ce_fwd_op().call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, 1.0, false);
    const Tensor none = at::empty({0}, opts);
    return {loss, lse, none, none, none};
  }
  auto [loss, lse] =
      fwd_grad_op().call(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, 1.0);
  Tensor g = mixed ? logits.to(input.scalar_type()) : logits;  // G, in the operands' dtype for cuBLAS
  Tensor gi = input_grad ? (mixed ? mm_acc(g, w_op, acc) : at::mm(g, w_op)) : at::empty({0}, opts);
  Tensor gw = weight_grad ? (mixed ? mm_acc(g.t(), x, acc) : at::mm(g.t(), x)) : at::empty({0}, opts);
  Tensor gb = bias_grad ? logits.sum(0) : at::empty({0}, opts);
  return {loss, lse, gi, gw, gb};
}

// input (N, D), linear_weight (V, D), target (N,) int64 contiguous, weight (V,) contiguous in the
// accumulation dtype, grad_scale (N,) (None: 1) scaling the rows' gradients. Returns per-row loss and lse
// (N,), the gradients asked for, in the accumulation dtype ((0,) where not asked for), and the extras'
// stats ((0,) unless asked for).
// The extras (logprob, entropy; cross_entropy_math.h (7)) take two calls, as their gradients are only
// known in the backward: extras=True (no gradients) returns the (N, 4) stats of cross_entropy_fwd's
// extras; the backward's call passes them back as `stats` with grad_logprob / grad_entropy (N,) (either
// may be None) and recomputes each chunk's logits for cross_entropy_bwd, whose G_c then takes the GEMMs
// as below (loss and lse are then (0,): the forward has them).
Tensor6 linear_cross_entropy_chunks(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                    const OptTensor& linear_bias, const OptTensor& weight,
                                    const OptTensor& grad_scale, int64_t ignore_index, double label_smoothing,
                                    double z_loss, double softcap, int64_t chunk_size, bool input_grad,
                                    bool weight_grad, bool bias_grad, const OptTensor& stats,
                                    const OptTensor& grad_logprob, const OptTensor& grad_entropy, bool extras) {
  TORCH_CHECK(input.dim() == 2 && linear_weight.dim() == 2 && input.size(1) == linear_weight.size(1),
              "fusedloss: linear_cross_entropy_chunks takes input (N, D) and linear_weight (V, D), got ",
              input.sizes(), " and ", linear_weight.sizes());
  TORCH_CHECK(chunk_size > 0, "fusedloss: chunk_size must be positive, got ", chunk_size);
  const int64_t n = input.size(0), d = input.size(1), v = linear_weight.size(0);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool mixed = mixed_precision(input);
  const auto op_dtype = mixed ? input.scalar_type() : acc;
  bias_grad = bias_grad && linear_bias.has_value();
  const bool grads = input_grad || weight_grad || bias_grad;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, n));
  const auto opts = input.options().dtype(acc);

  // A bf16/fp16 head is cast once per call on the cast path; fp32/fp64 heads are used as they are.
  const Tensor w_op = as_dtype(linear_weight, op_dtype);
  const OptTensor b_acc = linear_bias.has_value() ? OptTensor(as_dtype(*linear_bias, acc)) : std::nullopt;
  TORCH_CHECK(!(extras && grads), "fusedloss: linear_cross_entropy_chunks makes no gradients with extras=True "
              "(the extras' gradients come in the backward's call, with their stats)");
  // The backward of the extras: cross_entropy_bwd on recomputed logits, row-major.
  const bool extras_bwd = grads && stats.has_value();
  const bool class_major = grads && !extras_bwd && input.is_cpu() && chunk * v >= kClassMajorMinLogits;
  // One chunk: its outputs are the call's, so none of the buffers below (a zero-filled (V, D) one
  // among them) is made.
  if (n > 0 && chunk >= n && !class_major && !extras && !extras_bwd) {
    auto [l, s, gi, gw, gb] = one_chunk(input, w_op, target, b_acc, weight, grad_scale, ignore_index,
                                        label_smoothing, z_loss, softcap, input_grad, weight_grad, bias_grad, mixed,
                                        acc);
    return {l, s, gi, gw, gb, at::empty({0}, opts)};
  }
  Tensor loss = at::empty({extras_bwd ? 0 : n}, opts), lse = at::empty({extras_bwd ? 0 : n}, opts);
  Tensor gi = input_grad ? at::empty({n, d}, opts) : at::empty({0}, opts);
  Tensor gw = weight_grad ? at::zeros({v, d}, opts) : at::empty({0}, opts);
  Tensor gb = bias_grad ? at::zeros({v}, opts) : at::empty({0}, opts);
  Tensor stats_out = extras ? at::empty({n, 4}, opts) : at::empty({0}, opts);
  if (n == 0) return {loss, lse, gi, gw, gb, stats_out};

  if (class_major) {
    // Class-major chunks, (V, rows) = W X_c^T (csrc/cpu/linear_cross_entropy.cpp says why), and the
    // gradients from that layout as BLAS operands: dX_c = (G_c^T)^T W, dW += G_c^T X_c.
    Tensor buf = at::empty({chunk * v}, opts);
    const OptTensor b_col = b_acc.has_value() ? OptTensor(b_acc->unsqueeze(1)) : std::nullopt;
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      const Tensor x = input.narrow(0, start, rows).to(op_dtype);
      Tensor logits_t = buf.narrow(0, 0, v * rows).view({v, rows});
      mm_into(logits_t, b_col, w_op, x.t(), false, acc);
      const OptTensor scale = grad_scale.has_value() ? OptTensor(grad_scale->narrow(0, start, rows)) : std::nullopt;
      auto [l, s] = fwd_grad_cols_op().call(logits_t, target.narrow(0, start, rows), weight, scale, ignore_index,
                                            label_smoothing, z_loss, softcap, 1.0);
      loss.narrow(0, start, rows).copy_(l);
      lse.narrow(0, start, rows).copy_(s);
      if (bias_grad) gb.add_(logits_t.sum(1));
      if (input_grad) {
        Tensor out = gi.narrow(0, start, rows);
        at::mm_out(out, logits_t.t(), w_op);
      }
      if (weight_grad) at::addmm_out(gw, gw, logits_t, x);
    }
    return {loss, lse, gi, gw, gb, stats_out};
  }

  // One logits buffer for every chunk (the last uses its first rows): a fresh one per chunk would pay
  // its first-touch page faults on CPU each time.
  Tensor logits_buf = at::empty({chunk, v}, opts);
  Tensor dl_buf = mixed && (input_grad || weight_grad) ? at::empty({chunk, v}, input.options()) : Tensor();
  const Tensor w_t = w_op.t();
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const Tensor x = input.narrow(0, start, rows).to(op_dtype);
    const Tensor t = target.narrow(0, start, rows);
    Tensor logits = logits_buf.narrow(0, 0, rows);
    mm_into(logits, b_acc, x, w_t, mixed, acc);
    if (!grads) {
      auto [l, s, st] =
          ce_fwd_op().call(logits, t, weight, ignore_index, label_smoothing, z_loss, softcap, 1.0, extras);
      loss.narrow(0, start, rows).copy_(l);
      lse.narrow(0, start, rows).copy_(s);
      if (extras) stats_out.narrow(0, start, rows).copy_(st);
      continue;
    }
    const OptTensor scale = grad_scale.has_value() ? OptTensor(grad_scale->narrow(0, start, rows)) : std::nullopt;
    Tensor g;  // G_c, the gradient of the chunk's logits
    if (extras_bwd) {
      const auto part = [&](const OptTensor& a) {
        return a.has_value() ? OptTensor(a->narrow(0, start, rows)) : std::nullopt;
      };
      const Tensor gl = scale.has_value() ? *scale : at::ones({1}, opts).expand({rows});
      g = ce_bwd_op().call(gl, std::nullopt, logits, t, weight, stats->narrow(0, start, rows), ignore_index,
                           label_smoothing, z_loss, softcap, 1.0, part(grad_logprob), part(grad_entropy));
    } else {
      auto [l, s] =
          fwd_grad_op().call(logits, t, weight, scale, ignore_index, label_smoothing, z_loss, softcap, 1.0);
      loss.narrow(0, start, rows).copy_(l);
      lse.narrow(0, start, rows).copy_(s);
      g = logits;  // overwritten in place
    }
    if (bias_grad) gb.add_(g.sum(0));
    if (dl_buf.defined()) {
      // cuBLAS takes one operand dtype: G_c rounded to bf16/fp16, products accumulated in fp32.
      g = dl_buf.narrow(0, 0, rows).copy_(g);
    }
    if (input_grad) {
      Tensor out = gi.narrow(0, start, rows);
      if (mixed) {
        mm_acc_out(out, g, w_op, acc);
      } else {
        at::mm_out(out, g, w_op);
      }
    }
    if (weight_grad) {
      if (mixed) {
        addmm_acc_out(gw, gw, g.t(), x, acc);
      } else {
        at::addmm_out(gw, gw, g.t(), x);
      }
    }
  }
  return {loss, lse, gi, gw, gb, stats_out};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy_chunks", &fusedloss::linear_cross_entropy_chunks);
}
