#pragma once
// Argument checks of soft_cross_entropy_fwd / soft_cross_entropy_bwd, shared by the CPU and CUDA
// backends (csrc/{cpu,cuda}/soft_cross_entropy.*). The Python layer (fusedloss.functional) checks user
// input first with friendlier messages; these guard the ops when they are called through torch.ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fusedloss {

inline at::ScalarType soft_ce_acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// logits (N, C) with unit class stride; target of logits' shape and class stride, in logits' dtype or
// the accumulation dtype (float32 targets for 16-bit logits read at full precision); weight (C,) in
// the accumulation dtype, contiguous; all on one device.
inline void check_soft_ce_args(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double label_smoothing, double z_loss,
                               double softcap, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "fusedloss: logits must be 2-D (N, C), got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fusedloss: logits must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "fusedloss: logits must have unit stride along the class dimension");
  TORCH_CHECK(target.sizes() == logits.sizes(), "fusedloss: target must have logits' shape ", logits.sizes(),
              ", got ", target.sizes());
  const auto acc = soft_ce_acc_type(logits);
  TORCH_CHECK(target.scalar_type() == dt || target.scalar_type() == acc, "fusedloss: target must be ", dt,
              " or ", acc, " for ", dt, " logits, got ", target.scalar_type());
  TORCH_CHECK(target.size(1) <= 1 || target.stride(1) == 1,
              "fusedloss: target must have unit stride along the class dimension");
  TORCH_CHECK(target.device() == logits.device(), "fusedloss: target is on ", target.device(), " but logits are on ",
              logits.device());
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(1), "fusedloss: weight must have shape (C,) = (",
                logits.size(1), ",), got ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), "fusedloss: weight must be contiguous");
    TORCH_CHECK(w.scalar_type() == acc, "fusedloss: weight must be ", acc, " for ", dt, " logits, got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), "fusedloss: weight is on ", w.device(), " but logits are on ",
                logits.device());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fusedloss: label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, "fusedloss: z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0, "fusedloss: softcap must be >= 0 (0: off), got ", softcap);
  TORCH_CHECK(temperature > 0.0, "fusedloss: temperature must be > 0, got ", temperature);
}

// grad_loss, grad_lse and grad_entropy: (N,) in the accumulation dtype, any stride; stats the forward's
// (N, 3), or its (N, 4) with the entropy, which grad_entropy needs (the entropy is read from it).
inline void check_soft_ce_bwd_args(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                   const at::Tensor& logits, const at::Tensor& stats,
                                   const std::optional<at::Tensor>& grad_entropy) {
  const auto acc = soft_ce_acc_type(logits);
  const int64_t n = logits.size(0);
  const at::Tensor* grads[] = {&grad_loss, grad_lse.has_value() ? &*grad_lse : nullptr,
                               grad_entropy.has_value() ? &*grad_entropy : nullptr};
  const char* names[] = {"grad_loss", "grad_lse", "grad_entropy"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor* g = grads[i];
    if (g == nullptr) continue;
    const char* name = names[i];
    TORCH_CHECK(g->dim() == 1 && g->size(0) == n, "fusedloss: ", name, " must have shape (N,) = (", n, ",), got ",
                g->sizes());
    TORCH_CHECK(g->scalar_type() == acc, "fusedloss: ", name, " must be ", acc, ", got ", g->scalar_type());
    TORCH_CHECK(g->device() == logits.device(), "fusedloss: ", name, " is on ", g->device(), " but logits are on ",
                logits.device());
  }
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && (stats.size(1) == 3 || stats.size(1) == 4) &&
                  stats.is_contiguous(),
              "fusedloss: stats must be the forward's contiguous (N, 3) or (N, 4) output, got ", stats.sizes());
  TORCH_CHECK(!grad_entropy.has_value() || stats.size(1) == 4,
              "fusedloss: grad_entropy needs the forward's (N, 4) stats (entropy=True), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc, "fusedloss: stats must be ", acc, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == logits.device(), "fusedloss: stats is on ", stats.device(), " but logits are on ",
              logits.device());
}

}  // namespace fusedloss
