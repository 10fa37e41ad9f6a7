// CPU kernel of fusedloss::reduce_rows (the math is in fusedloss/reduce_math.h). Rows are cut into
// blocks of a fixed size, not a size derived from the thread count: each block's partial is summed
// in row order and the partials in block order, so every bit of the result is the same whatever
// the number of threads.
#include "fusedloss/checks.h"
#include "fusedloss/reduce_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace fusedloss {
namespace {

constexpr int64_t kBlockRows = 4096;

std::tuple<at::Tensor, at::Tensor> reduce_rows_cpu(const at::Tensor& loss, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& token_weight, int64_t ignore_index,
                                                   bool mean) {
  check_reduce_args(loss, target, weight, token_weight);
  const int64_t N = loss.size(0);
  at::Tensor out = at::empty({}, loss.options());
  at::Tensor mass = at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "fusedloss_reduce_rows_cpu", [&] {
    const scalar_t* l = loss.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t nw = weight.has_value() ? weight->size(0) : 0;
    const scalar_t* u = token_weight.has_value() ? token_weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
    auto block_partial = [&](int64_t b) {
      reduce::Partial p{0.0, 0.0};
      const int64_t hi = std::min(N, (b + 1) * kBlockRows);
      for (int64_t i = b * kBlockRows; i < hi; ++i) p = reduce::merge(p, reduce::row_partial(i, l, t, w, nw, u, ignore_index));
      return p;
    };
    reduce::Partial total{0.0, 0.0};
    if (blocks <= 4) {  // a thread wake-up costs more than summing these rows
      for (int64_t b = 0; b < blocks; ++b) total = reduce::merge(total, block_partial(b));
    } else {
      std::vector<reduce::Partial> partial(blocks);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) partial[b] = block_partial(b);
      });
      for (int64_t b = 0; b < blocks; ++b) total = reduce::merge(total, partial[b]);
    }
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(reduce::finish(total, mean));
    *mass.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total.mass);
  });
  return {out, mass};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("reduce_rows", &fusedloss::reduce_rows_cpu); }
