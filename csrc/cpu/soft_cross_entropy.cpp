// CPU kernels of the cross-entropy with probability targets (soft_cross_entropy_fwd / _bwd; schemas in
// csrc/registration_soft_cross_entropy.cpp). The math and its derivation are in
// fusedloss/soft_cross_entropy_math.h, shared with the CUDA kernels; this file decides how rows are cut
// and vectorized.
//
// Forward: each row of logits and of targets is read once from memory, kChunk elements at a time.
// Pass 1 transforms the chunk's logits into an L1 buffer and takes their max; pass 2 reads the buffer
// and the chunk's targets for s, A and D (math header (3)), and with the entropy sum_ed (6). Chunk
// stats merge in order with ce::merge_stats. Few long rows (N < kFewRows) are also cut into fixed
// pieces read by different threads and merged in piece order: the pieces, hence every bit, do not
// depend on the thread count.
// Backward: one read of both rows and one write of each requested gradient, elementwise given the
// saved (max, log_s, A[, H]) of each row, in pieces of kBwdPiece elements spread over the threads.
#define FL_CPU_VEC 1
#include "fusedloss/cpu_utils.h"
#include "fusedloss/soft_cross_entropy_checks.h"
#include "fusedloss/soft_cross_entropy_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::VecIO;
using cpu::reduce_max;
using cpu::reduce_sum;

// Elements per forward chunk: 2048 fp32 z values (8 KB) stay in L1 next to the lines they came from.
constexpr int64_t kChunk = 2048;
// Few long rows are read in pieces of kFwdPiece elements by different threads (fixed sizes, see above).
constexpr int64_t kFwdPiece = 16 * kChunk;
constexpr int64_t kFewRows = 16;
// Elements per backward work item.
constexpr int64_t kBwdPiece = 16384;

// Stats (3) (and (6)'s sum_ed when Entropy) of x[lo, hi) and t[lo, hi) of one row, kChunk elements at a
// time. target_t is the logits' scalar_t or the accumulation type.
template <bool Entropy, typename scalar_t, typename target_t, typename acc_t>
ce::RowStats<acc_t> piece_stats(const scalar_t* x, const target_t* t, const acc_t* w, int64_t lo, int64_t hi,
                                const soft_ce::Options<acc_t>& o) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  alignas(64) acc_t z[kChunk];
  auto total = ce::empty_stats<acc_t>();
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    const int64_t nv = n - n % V;
    const acc_t* wc = w ? w + c0 : nullptr;
    const target_t* tc = t + c0;
    // Pass 1: z = transform(x) into the L1 buffer, and its max.
    Vec vmax(-fl_inf<acc_t>());
    for (int64_t i = 0; i < nv; i += V) {
      const Vec zi = ce::transform_logit<acc_t>(VecIO<scalar_t>::load(x + c0 + i), o.ce);
      zi.store(z + i);
      vmax = fl_max(vmax, zi);
    }
    acc_t m = reduce_max(vmax);
    for (int64_t i = nv; i < n; ++i) {
      z[i] = ce::transform_logit<acc_t>(static_cast<acc_t>(x[c0 + i]), o.ce);
      m = fl_max(m, z[i]);
    }
    // Pass 2 over the buffer and the targets: s, A = sum v and D = sum v (z - m), and sum_ed =
    // sum exp(z - m) (z - m) for the entropy. An all -inf chunk has s = 0 and differences taken
    // against 0: its D holds the -inf (v > 0) or NaN (v = 0) of those logits, as ce::update_stats keeps
    // them, and its sum_ed is 0.
    const bool finite_max = m != -fl_inf<acc_t>();
    const Vec vm(finite_max ? m : acc_t(0));
    const Vec one(acc_t(1));
    // (6)'s exp(d) * d with d clamped to ce::kLogFloor: a -inf z adds 0, not 0 * -inf
    const Vec log_floor(static_cast<acc_t>(ce::kLogFloor));
    Vec s0(acc_t(0)), vd(acc_t(0)), va(acc_t(0)), ved(acc_t(0));
    for (int64_t i = 0; i < nv; i += V) {
      const Vec d = Vec::loadu(z + i) - vm;
      if (finite_max) {
        const Vec e = fl_exp(d);
        s0 = s0 + e;
        if constexpr (Entropy) ved = ved + e * fl_max(d, log_floor);
      }
      const Vec v = soft_ce::target_weight<acc_t>(VecIO<target_t>::load(tc + i), wc ? Vec::loadu(wc + i) : one, o);
      vd = vd + v * d;
      va = va + v;
    }
    acc_t s = reduce_sum(s0), sd = reduce_sum(vd), sa = reduce_sum(va), sed = reduce_sum(ved);
    for (int64_t i = nv; i < n; ++i) {
      const acc_t d = z[i] - (finite_max ? m : acc_t(0));
      if (finite_max) {
        const acc_t e = fl_exp(d);
        s += e;
        if constexpr (Entropy) sed += e * fl_max(d, static_cast<acc_t>(ce::kLogFloor));
      }
      const acc_t v = soft_ce::target_weight<acc_t>(static_cast<acc_t>(tc[i]), wc ? wc[i] : acc_t(1), o);
      sd += v * d;
      sa += v;
    }
    total = ce::merge_stats(total, ce::RowStats<acc_t>{m, s, sd, sa, sed});
  }
  return total;
}

template <typename scalar_t, typename target_t>
void soft_ce_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const soft_ce::Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss, at::Tensor& lse,
                          at::Tensor& stats, at::Tensor* entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t x_stride = logits.stride(0), t_stride = target.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const target_t* t = target.const_data_ptr<target_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  acc_t* ent_p = entropy ? entropy->mutable_data_ptr<acc_t>() : nullptr;
  const int64_t sw = stats.size(1);
  auto finish = [&](int64_t row, const ce::RowStats<acc_t>& r) {
    soft_ce::finish_row(r, o, loss_p + row, lse_p + row, st + sw * row, ent_p ? ent_p + row : nullptr);
  };
  // The plain op's loop stays free of (6)'s sum.
  auto stats_of = [&](int64_t row, int64_t lo, int64_t hi) {
    const scalar_t* xr = x + row * x_stride;
    const target_t* tr = t + row * t_stride;
    return ent_p ? piece_stats<true, scalar_t, target_t, acc_t>(xr, tr, w, lo, hi, o)
                 : piece_stats<false, scalar_t, target_t, acc_t>(xr, tr, w, lo, hi, o);
  };
  const int64_t piece = (N < kFewRows && C > kFwdPiece) ? kFwdPiece : std::max<int64_t>(C, 1);
  const int64_t splits = (C + piece - 1) / piece;
  if (splits <= 1) {
    at::parallel_for(0, N, cpu::grain_items(2 * C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        finish(row, stats_of(row, 0, C));
      }
    });
    return;
  }
  std::vector<ce::RowStats<acc_t>> partial(N * splits);
  at::parallel_for(0, N * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / splits, lo = (item % splits) * piece;
      partial[item] = stats_of(row, lo, std::min(C, lo + piece));
    }
  });
  for (int64_t row = 0; row < N; ++row) {
    auto merged = partial[row * splits];
    for (int64_t part = 1; part < splits; ++part) merged = ce::merge_stats(merged, partial[row * splits + part]);
    finish(row, merged);
  }
}

template <typename scalar_t, typename target_t>
void soft_ce_bwd_cpu_impl(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                          const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const at::Tensor& stats, const std::optional<at::Tensor>& grad_entropy,
                          const soft_ce::Options<at::opmath_type<scalar_t>>& o, at::Tensor& grad_x,
                          at::Tensor* grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t x_stride = logits.stride(0), t_stride = target.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const target_t* t = target.const_data_ptr<target_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const int64_t g_stride = grad_loss.stride(0);
  const acc_t* gl = grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr;
  const int64_t gl_stride = grad_lse.has_value() ? grad_lse->stride(0) : 0;
  const acc_t* gh = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
  const int64_t gh_stride = grad_entropy.has_value() ? grad_entropy->stride(0) : 0;
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const int64_t sw = stats.size(1);
  scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
  target_t* gt = grad_t ? grad_t->mutable_data_ptr<target_t>() : nullptr;
  const int64_t pieces = (C + kBwdPiece - 1) / kBwdPiece;
  at::parallel_for(0, N * pieces, cpu::grain_items(std::min(C, kBwdPiece) * (gt ? 4 : 3)), [&](int64_t begin,
                                                                                               int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / pieces, lo = (item % pieces) * kBwdPiece, hi = std::min(C, lo + kBwdPiece);
      const acc_t* sr = st + sw * row;
      const auto c = soft_ce::grad_coefs<acc_t>(sr[0], sr[1], sr[2], g[row * g_stride],
                                                gl ? gl[row * gl_stride] : acc_t(0), o,
                                                gh ? gh[row * gh_stride] : acc_t(0), gh ? sr[3] : acc_t(0));
      const scalar_t* xr = x + row * x_stride;
      const target_t* tr = t + row * t_stride;
      scalar_t* gxr = gx + row * C;
      target_t* gtr = gt ? gt + row * C : nullptr;
      const Vec one(acc_t(1));
      int64_t j = lo;
      for (; j + V <= hi; j += V) {
        const Vec z = ce::transform_logit<acc_t>(VecIO<scalar_t>::load(xr + j), o.ce);
        const Vec wj = w ? Vec::loadu(w + j) : one;
        VecIO<scalar_t>::store(gxr + j, soft_ce::grad_logit<acc_t>(z, VecIO<target_t>::load(tr + j), wj, c, o));
        if (gtr) VecIO<target_t>::store(gtr + j, soft_ce::grad_target<acc_t>(z, wj, c));
      }
      for (; j < hi; ++j) {
        const acc_t z = ce::transform_logit<acc_t>(static_cast<acc_t>(xr[j]), o.ce);
        const acc_t wj = w ? w[j] : acc_t(1);
        gxr[j] = static_cast<scalar_t>(soft_ce::grad_logit<acc_t>(z, static_cast<acc_t>(tr[j]), wj, c, o));
        if (gtr) gtr[j] = static_cast<target_t>(soft_ce::grad_target<acc_t>(z, wj, c));
      }
    }
  });
}

// Calls f.template operator()<target_t>() with target_t the target's element type: the logits'
// scalar_t, or the accumulation type for 16-bit logits with float32 targets.
template <typename scalar_t, typename F>
void with_target_type(const at::Tensor& target, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    f.template operator()<scalar_t>();
  } else {
    if (target.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
      f.template operator()<scalar_t>();
    } else {
      f.template operator()<acc_t>();
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cross_entropy_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, double z_loss, double softcap, double temperature, bool entropy) {
  check_soft_ce_args(logits, target, weight, label_smoothing, z_loss, softcap, temperature);
  const auto options = logits.options().dtype(soft_ce_acc_type(logits));
  const int64_t N = logits.size(0);
  auto loss = at::empty({N}, options);
  auto lse = at::empty({N}, options);
  auto stats = at::empty({N, entropy ? soft_ce::kStatsEntropy : soft_ce::kStats}, options);
  auto ent = at::empty({entropy ? N : 0}, options);
  if (N == 0) return {loss, lse, stats, ent};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_cross_entropy_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = soft_ce::make_options<acc_t>(logits.size(1), label_smoothing, z_loss, softcap, temperature);
    with_target_type<scalar_t>(target, [&]<typename target_t>() {
      soft_ce_fwd_cpu_impl<scalar_t, target_t>(logits, target, weight, o, loss, lse, stats, entropy ? &ent : nullptr);
    });
  });
  return {loss, lse, stats, ent};
}

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_bwd_cpu(const at::Tensor& grad_loss,
                                                               const std::optional<at::Tensor>& grad_lse,
                                                               const at::Tensor& logits, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight,
                                                               const at::Tensor& stats, double label_smoothing,
                                                               double z_loss, double softcap, double temperature,
                                                               bool target_grad,
                                                               const std::optional<at::Tensor>& grad_entropy) {
  check_soft_ce_args(logits, target, weight, label_smoothing, z_loss, softcap, temperature);
  check_soft_ce_bwd_args(grad_loss, grad_lse, logits, stats, grad_entropy);
  auto grad_x = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const auto t_options = target.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_t = target_grad ? at::empty(target.sizes(), t_options) : at::empty({0}, t_options);
  if (grad_x.numel() == 0) return {grad_x, grad_t};
  cpu::advise_huge_pages(grad_x.mutable_data_ptr(), grad_x.nbytes());
  if (target_grad) cpu::advise_huge_pages(grad_t.mutable_data_ptr(), grad_t.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_cross_entropy_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = soft_ce::make_options<acc_t>(logits.size(1), label_smoothing, z_loss, softcap, temperature);
    with_target_type<scalar_t>(target, [&]<typename target_t>() {
      soft_ce_bwd_cpu_impl<scalar_t, target_t>(grad_loss, grad_lse, logits, target, weight, stats, grad_entropy, o,
                                               grad_x, target_grad ? &grad_t : nullptr);
    });
  });
  return {grad_x, grad_t};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("soft_cross_entropy_fwd", &fusedloss::soft_cross_entropy_fwd_cpu);
  m.impl("soft_cross_entropy_bwd", &fusedloss::soft_cross_entropy_bwd_cpu);
}
