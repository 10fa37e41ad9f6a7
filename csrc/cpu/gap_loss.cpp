// CPU kernels of the multi-class gap hinge loss. The math is in fusedloss/gap_loss_math.h, shared
// with the CUDA kernels. Rows are independent and parallel; within a row, the classes j != y are
// two vectorized ranges, [0, y) and (y, C).
#define FL_CPU_VEC 1
#include "fusedloss/checks.h"
#include "fusedloss/cpu_utils.h"
#include "fusedloss/gap_loss_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::VecIO;

// Sums over a row use two levels: fp32 vector lanes within blocks of kBlock elements, and a double
// across blocks, so the error stays near that of a 32-term sum even at C = 32768 (a plain fp32
// lane sum of 20k equal slopes drifts by ~2e-5 relative).
constexpr int64_t kBlock = 256;

// Sum (or max) of hinge terms and the max gap over x[lo, hi), added into (sum, max_h).
template <typename scalar_t, typename acc_t>
void range_terms(const scalar_t* x, int64_t lo, int64_t hi, acc_t x_y, const gap::Options<acc_t>& o, double& sum,
                 acc_t& max_h) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vx_y(x_y), vmargin(o.margin);
  Vec vmax(-fl_inf<acc_t>());
  int64_t j = lo;
  while (j + V <= hi) {
    Vec vsum(acc_t(0));
    const int64_t block_end = std::min(hi, j + kBlock);
    for (; j + V <= block_end; j += V) {
      const Vec h = (VecIO<scalar_t>::load(x + j) - vx_y) + vmargin;
      if (o.max_mode) {
        vmax = fl_max(vmax, h);
      } else {
        vsum = vsum + gap::hinge_term(h, o.p);
      }
    }
    sum += cpu::reduce_sum(vsum);
  }
  max_h = fl_max(max_h, cpu::reduce_max(vmax));
  for (; j < hi; ++j) {
    const acc_t h = static_cast<acc_t>(x[j]) - x_y + o.margin;
    if (o.max_mode) {
      max_h = fl_max(max_h, h);
    } else {
      sum += gap::hinge_term(h, o.p);
    }
  }
}

// Writes g * scale * slope_j over x[lo, hi) and adds the sum of the slopes into `slopes`.
template <typename scalar_t, typename acc_t>
void range_grads(const scalar_t* x, scalar_t* out, int64_t lo, int64_t hi, acc_t x_y, acc_t gscale,
                 const gap::Options<acc_t>& o, double& slopes) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vx_y(x_y), vmargin(o.margin), vscale(gscale);
  int64_t j = lo;
  while (j + V <= hi) {
    Vec vsum(acc_t(0));
    const int64_t block_end = std::min(hi, j + kBlock);
    for (; j + V <= block_end; j += V) {
      const Vec sj = gap::hinge_slope((VecIO<scalar_t>::load(x + j) - vx_y) + vmargin, o.p);
      VecIO<scalar_t>::store(out + j, sj * vscale);
      vsum = vsum + sj;
    }
    slopes += cpu::reduce_sum(vsum);
  }
  for (; j < hi; ++j) {
    const acc_t sj = gap::hinge_slope(static_cast<acc_t>(x[j]) - x_y + o.margin, o.p);
    out[j] = static_cast<scalar_t>(sj * gscale);
    slopes += sj;
  }
}

// The class that mode "max" charges: the first j != y with the largest gap h_j = x_j - x_y + margin
// (torch.argmax's rule in the reference; ties are common in bf16/fp16). Classes are ranked by x_j,
// the same order as h_j without h's rounding making false ties; a NaN gap counts as the largest.
template <typename scalar_t, typename acc_t>
int64_t argmax_gap(const scalar_t* x, int64_t C, int64_t y) {
  const acc_t x_y = static_cast<acc_t>(x[y]);
  int64_t best = -1;
  acc_t best_x = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (j == y) continue;
    const acc_t v = static_cast<acc_t>(x[j]);
    if (std::isinf(x_y)) {
      // every gap is +-inf or NaN (x_j = NaN, or x_j = x_y: inf - inf): the first NaN gap wins,
      // else the first j
      if (best < 0) best = j;
      if (v != v || v == x_y) return j;
      continue;
    }
    if (best < 0) {
      best = j;
      best_x = v;
    } else if (best_x == best_x && (v != v || v > best_x)) {
      best = j;
      best_x = v;
    }
  }
  return best;
}

template <typename scalar_t>
void gap_fwd_cpu_impl(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                      const gap::Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1), row_stride = input.stride(0);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  cpu::check_targets(t, N, C, o.ignore_index);
  at::parallel_for(0, N, cpu::grain_items(C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = t[row];
      if (gap::is_ignored(y, o)) {
        out[row] = 0;
        continue;
      }
      const scalar_t* xr = x + row * row_stride;
      const acc_t x_y = static_cast<acc_t>(xr[y]);
      double sum = 0;
      acc_t max_h = -fl_inf<acc_t>();
      range_terms(xr, 0, y, x_y, o, sum, max_h);
      range_terms(xr, y + 1, C, x_y, o, sum, max_h);
      const acc_t value = o.max_mode ? (C > 1 ? gap::hinge_term(max_h, o.p) : acc_t(0)) : static_cast<acc_t>(sum);
      out[row] = gap::row_scale(w ? w[y] : acc_t(1), o) * value;
    }
  });
}

template <typename scalar_t>
void gap_bwd_cpu_impl(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const gap::Options<at::opmath_type<scalar_t>>& o,
                      at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1), row_stride = input.stride(0);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const int64_t g_stride = grad_loss.stride(0);
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  cpu::check_targets(t, N, C, o.ignore_index);
  at::parallel_for(0, N, cpu::grain_items(C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = t[row];
      scalar_t* gr = out + row * C;
      if (gap::is_ignored(y, o)) {
        std::fill(gr, gr + C, scalar_t(0));
        continue;
      }
      const scalar_t* xr = x + row * row_stride;
      const acc_t x_y = static_cast<acc_t>(xr[y]);
      const acc_t gscale = g[row * g_stride] * gap::row_scale(w ? w[y] : acc_t(1), o);
      if (o.max_mode) {
        std::fill(gr, gr + C, scalar_t(0));
        const int64_t j = argmax_gap<scalar_t, acc_t>(xr, C, y);
        if (j >= 0) {
          const acc_t gj = gap::hinge_slope(static_cast<acc_t>(xr[j]) - x_y + o.margin, o.p) * gscale;
          gr[j] = static_cast<scalar_t>(gj);
          gr[y] = static_cast<scalar_t>(-gj);
        }
        continue;
      }
      double slopes = 0;
      range_grads(xr, gr, 0, y, x_y, gscale, o, slopes);
      range_grads(xr, gr, y + 1, C, x_y, gscale, o, slopes);
      gr[y] = static_cast<scalar_t>(-static_cast<acc_t>(slopes) * gscale);
    }
  });
}

at::Tensor gap_loss_fwd_cpu(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            double margin, int64_t p, int64_t ignore_index, bool class_normalize, bool max_mode) {
  check_gap_args(input, target, weight, p);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({input.size(0)}, input.options().dtype(acc));
  if (input.size(0) == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gap_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gap_fwd_cpu_impl<scalar_t>(input, target, weight,
                               gap::make_options<acc_t>(input.size(1), margin, p, ignore_index, class_normalize, max_mode),
                               loss);
  });
  return loss;
}

at::Tensor gap_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, double margin, int64_t p, int64_t ignore_index,
                            bool class_normalize, bool max_mode) {
  check_gap_args(input, target, weight, p);
  check_row_grad(grad_loss, input, "grad_loss");
  auto grad = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  cpu::advise_huge_pages(grad.mutable_data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gap_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gap_bwd_cpu_impl<scalar_t>(grad_loss, input, target, weight,
                               gap::make_options<acc_t>(input.size(1), margin, p, ignore_index, class_normalize, max_mode),
                               grad);
  });
  return grad;
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("gap_loss_fwd", &fusedloss::gap_loss_fwd_cpu);
  m.impl("gap_loss_bwd", &fusedloss::gap_loss_bwd_cpu);
}
