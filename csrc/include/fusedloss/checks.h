#pragma once
// Argument checks shared by the C++ backends. The Python layer validates user input with friendlier
// messages first; these guard the ops when they are called directly through torch.ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fusedloss {

inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 2, "fusedloss: logits must be 2-D (N, C), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "fusedloss: logits must have unit stride along the class dimension");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "fusedloss: target must have shape (N,) = (", logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fusedloss: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.is_contiguous(), "fusedloss: target must be contiguous");
  TORCH_CHECK(target.device() == logits.device(), "fusedloss: target is on ", target.device(),
              " but logits are on ", logits.device());
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(1), "fusedloss: weight must have shape (C,) = (",
                logits.size(1), ",), got ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), "fusedloss: weight must be contiguous");
    TORCH_CHECK(w.device() == logits.device(), "fusedloss: weight is on ", w.device(),
                " but logits are on ", logits.device());
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(w.scalar_type() == acc, "fusedloss: weight must be ", acc, " for ", logits.scalar_type(),
                " logits, got ", w.scalar_type());
  }
}

// The ops that write their result over the logits (cross_entropy_fwd_grad_) need them contiguous:
// the gradient's layout is the contiguous one, and a strided or expanded view (rows sharing
// memory) cannot hold it.
inline void check_in_place_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_contiguous(), "fusedloss: cross_entropy_fwd_grad_ writes the gradient over logits in place, ",
              "so logits must be contiguous; got sizes ", logits.sizes(), " and strides ", logits.strides());
}

inline void check_gap_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           int64_t p) {
  check_ce_args(input, target, weight);  // the same layout contract as cross-entropy
  TORCH_CHECK(p == 1 || p == 2, "fusedloss: p must be 1 or 2, got ", p);
}

inline void check_row_grad(const at::Tensor& g, const at::Tensor& logits, const char* name) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(g.dim() == 1 && g.size(0) == logits.size(0), "fusedloss: ", name, " must have shape (N,)");
  TORCH_CHECK(g.scalar_type() == acc, "fusedloss: ", name, " must be ", acc, ", got ", g.scalar_type());
  TORCH_CHECK(g.device() == logits.device(), "fusedloss: ", name, " is on the wrong device");
}

inline void check_row_stats(const at::Tensor& stats, const at::Tensor& logits) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == 2 && stats.is_contiguous(),
              "fusedloss: stats must be the forward's contiguous (N, 2) output");
  TORCH_CHECK(stats.scalar_type() == acc, "fusedloss: stats must be ", acc, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == logits.device(), "fusedloss: stats is on the wrong device");
}

}  // namespace fusedloss
