#pragma once
// Argument checks of fusedloss::siglip_{fwd,bwd}, shared by the CPU and CUDA front ends (host code only).
// fusedloss.functional.siglip_loss checks user input first with friendlier messages; these guard the
// ops when they are called directly through torch.ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "fusedloss/checks.h"

namespace fusedloss {

// query (N, D) and key (M, D): contiguous, one accumulation dtype (float32 or float64: the functional
// API converts fp16/bf16 rows to float32 first), one device; scale and bias 0-dim tensors in that dtype
// or float64 on the same device. Returns the accumulation dtype.
inline at::ScalarType check_siglip_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                                        const at::Tensor& bias) {
  TORCH_CHECK(query.dim() == 2, "fusedloss: siglip: query must be 2-D (N, D), got ", query.dim(), "-D");
  TORCH_CHECK(key.dim() == 2, "fusedloss: siglip: key must be 2-D (M, D), got ", key.dim(), "-D");
  TORCH_CHECK(query.size(1) == key.size(1), "fusedloss: siglip: query and key must have the same feature size, got ",
              query.size(1), " and ", key.size(1));
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "fusedloss: siglip: query must be float32 or float64, got ", dt);
  TORCH_CHECK(key.scalar_type() == dt, "fusedloss: siglip: key must have query's dtype ", dt, ", got ",
              key.scalar_type());
  TORCH_CHECK(query.is_contiguous() && key.is_contiguous(), "fusedloss: siglip: query and key must be contiguous");
  TORCH_CHECK(key.device() == query.device(), "fusedloss: siglip: key is on ", key.device(), " but query is on ",
              query.device());
  const at::Tensor* scalars[2] = {&scale, &bias};
  const char* names[2] = {"scale", "bias"};
  for (int s = 0; s < 2; ++s) {
    const auto& v = *scalars[s];
    TORCH_CHECK(v.dim() == 0, "fusedloss: siglip: ", names[s], " must be a 0-dim tensor, got shape ", v.sizes());
    TORCH_CHECK(v.scalar_type() == dt || v.scalar_type() == at::kDouble, "fusedloss: siglip: ", names[s],
                " must be ", dt, " or float64, got ", v.scalar_type());
    TORCH_CHECK(v.device() == query.device(), "fusedloss: siglip: ", names[s], " is on ", v.device(),
                " but query is on ", query.device());
  }
  return dt;
}

// labels: as InfoNCE's (checks.h), without groups. A label outside [0, M) is refused on CPU (read
// there); elsewhere its query simply has no positive (every key a negative): the functional API marks
// such a query NaN instead.
inline void check_siglip_labels(const std::optional<at::Tensor>& labels, const at::Tensor& query,
                                const at::Tensor& key) {
  check_info_nce_labels(labels, query, key, std::nullopt);
}

// grad_rows (N,) of the accumulation dtype (any stride) on query's device.
inline void check_siglip_grad(const at::Tensor& grad_rows, const at::Tensor& query) {
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == query.size(0), "fusedloss: siglip: grad_rows must have "
              "shape (", query.size(0), ",), got ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.scalar_type() == query.scalar_type(), "fusedloss: siglip: grad_rows must be ",
              query.scalar_type(), ", got ", grad_rows.scalar_type());
  TORCH_CHECK(grad_rows.device() == query.device(), "fusedloss: siglip: grad_rows is on ", grad_rows.device(),
              " but query is on ", query.device());
}

}  // namespace fusedloss
