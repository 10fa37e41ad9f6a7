// CPU kernels of the fused softmax cross-entropy. The math (and its derivation) is in
// fusedloss/cross_entropy_math.h, shared with the CUDA kernels; this file decides how rows are cut
// into pieces, parallelized and vectorized.
//
// Forward: each row is read once from memory, in chunks of kChunk elements. A chunk is small
// enough to stay in L1, so the two passes over it (transform + max, then sum of exp(z - max)) cost
// one read from memory; chunk stats are merged with merge_stats. When rows are few and long
// (N < kFewRows), each row is also cut into fixed-size pieces processed by different threads and
// merged in a fixed order, so every thread has work and the result does not depend on the thread count.
// Backward: one read of the logits and one write of the gradient, elementwise given the saved
// (max, log_s) of each row.
// Forward + gradient in place (cross_entropy_fwd_grad_, the row kernel of chunked linear
// cross-entropy): the forward's pass over a row, then, by the same thread while the row is still
// in L2, the backward's pass over it with the gradient written over the logits. Rows cut into
// pieces (few long rows) finish their stats first, then write their gradient piece by piece.
// Focal loss forward (focal_loss_fwd): the forward's pass with a focal finish of each row; its
// backward is the cross-entropy backward with a per-row grad_loss.
#define FL_CPU_VEC 1
#include "fusedloss/checks.h"
#include "fusedloss/cpu_utils.h"
#include "fusedloss/cross_entropy_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fusedloss {
namespace {

using at::vec::Vectorized;
using cpu::VecIO;
using cpu::advise_huge_pages;
using cpu::reduce_max;
using cpu::reduce_sum;

// Elements per forward chunk: 2048 fp32 values plus their z buffer use 16 KB of L1.
constexpr int64_t kChunk = 2048;
// Rows of at least this many elements are cut into pieces of this size when there are few rows,
// so both cores work on one long row. Fixed, not derived from the thread count: the order of
// merges, hence every bit of the result, is the same whatever the number of threads.
constexpr int64_t kFwdPiece = 16 * kChunk;
constexpr int64_t kFewRows = 16;
// Elements per backward work item: large enough to amortize the per-row coefficients, small
// enough to balance two threads on a handful of rows.
constexpr int64_t kBwdPiece = 16384;

template <typename acc_t>
ce::Options<acc_t> make_options(int64_t C, int64_t ignore_index, double label_smoothing, double z_loss,
                                double softcap, double temperature) {
  return ce::Options<acc_t>{C,
                            ignore_index,
                            static_cast<acc_t>(label_smoothing),
                            static_cast<acc_t>(z_loss),
                            static_cast<acc_t>(softcap),
                            static_cast<acc_t>(1.0 / temperature)};
}

template <typename acc_t>
acc_t weight_sum_of(const acc_t* w, int64_t C) {
  if (w == nullptr) return static_cast<acc_t>(C);
  acc_t s = 0;
  for (int64_t j = 0; j < C; ++j) s += w[j];
  return s;
}

// Stats of x[lo, hi) of one row, kChunk elements at a time.
template <typename scalar_t, typename acc_t>
ce::RowStats<acc_t> piece_stats(const scalar_t* x, const acc_t* w, int64_t lo, int64_t hi,
                                const ce::Options<acc_t>& o, bool entropy) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const bool smoothing = o.smoothing > acc_t(0);
  alignas(64) acc_t z[kChunk];
  auto total = ce::empty_stats<acc_t>();
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    const int64_t nv = n - n % V;
    const acc_t* wc = w ? w + c0 : nullptr;
    // Pass 1: z = transform(x) into the L1 buffer, and its max.
    Vec vmax(-fl_inf<acc_t>());
    for (int64_t i = 0; i < nv; i += V) {
      const Vec zi = ce::transform_logit<acc_t>(VecIO<scalar_t>::load(x + c0 + i), o);
      zi.store(z + i);
      vmax = fl_max(vmax, zi);
    }
    acc_t m = reduce_max(vmax);
    for (int64_t i = nv; i < n; ++i) {
      z[i] = ce::transform_logit<acc_t>(static_cast<acc_t>(x[c0 + i]), o);
      m = fl_max(m, z[i]);
    }
    ce::RowStats<acc_t> chunk{m, acc_t(0), acc_t(0), acc_t(0)};
    // Pass 2 over the L1-resident z: sum exp(z - m) (two accumulators for ILP) and, with label
    // smoothing, sum w (z - m) and sum w. An all -inf chunk has s = 0 and keeps sum w * z.
    const bool finite_max = m != -fl_inf<acc_t>();
    const Vec vm(finite_max ? m : acc_t(0));
    Vec s0(acc_t(0)), s1(acc_t(0)), wd(acc_t(0)), ws(acc_t(0)), ed(acc_t(0));
    int64_t i = 0;
    if (finite_max && !smoothing && !entropy) {
      for (; i + 2 * V <= nv; i += 2 * V) {
        s0 = s0 + fl_exp(Vec::loadu(z + i) - vm);
        s1 = s1 + fl_exp(Vec::loadu(z + i + V) - vm);
      }
    }
    for (; i < nv; i += V) {
      const Vec d = Vec::loadu(z + i) - vm;
      if (finite_max) {
        const Vec e = fl_exp(d);
        s0 = s0 + e;
        if (entropy) ed = ed + fl_where_positive(e, e * d);  // (7): a -inf z adds 0
      }
      if (smoothing) {
        const Vec wi = wc ? Vec::loadu(wc + i) : Vec(acc_t(1));
        wd = wd + wi * d;
        ws = ws + wi;
      }
    }
    acc_t s = reduce_sum(s0 + s1), swd = reduce_sum(wd), sw = reduce_sum(ws), sed = reduce_sum(ed);
    for (i = nv; i < n; ++i) {
      const acc_t d = z[i] - (finite_max ? m : acc_t(0));
      if (finite_max) {
        const acc_t e = fl_exp(d);
        s += e;
        if (entropy) sed += fl_where_positive(e, e * d);
      }
      if (smoothing) {
        const acc_t wi = wc ? wc[i] : acc_t(1);
        swd += wi * d;
        sw += wi;
      }
    }
    chunk.sumexp = s;
    chunk.sum_wd = swd;
    chunk.sum_w = sw;
    chunk.sum_ed = sed;
    total = ce::merge_stats(total, chunk);
  }
  return total;
}

// The piece length of the forward's rows: the whole row, unless rows are few and long.
inline int64_t fwd_piece(int64_t N, int64_t C) {
  return (N < kFewRows && C > kFwdPiece) ? kFwdPiece : std::max<int64_t>(C, 1);
}

// Reads every row's stats and calls finish(row, merged stats) for it, with nullptr for an ignored
// row. Rows of one piece (piece >= C) are finished by the thread that read them, right after
// reading them (one parallel region: each region costs a thread wake-up). Rows of several pieces
// are read piece by piece across threads, and finished after every piece of every row was read;
// the pieces of a row are merged in piece order.
template <typename scalar_t, typename acc_t, typename Finish>
void for_each_row_stats(const scalar_t* x, int64_t row_stride, const int64_t* t, const acc_t* w, int64_t N,
                        int64_t C, int64_t piece, const ce::Options<acc_t>& o, const Finish& finish,
                        bool entropy = false) {
  const int64_t splits = std::max<int64_t>(1, (C + piece - 1) / piece);
  if (splits == 1) {
    at::parallel_for(0, N, cpu::grain_items(C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        if (ce::is_ignored(t[row], o)) {
          finish(row, nullptr);
          continue;
        }
        const auto stats = piece_stats<scalar_t, acc_t>(x + row * row_stride, w, 0, C, o, entropy);
        finish(row, &stats);
      }
    });
    return;
  }
  std::vector<ce::RowStats<acc_t>> partial(N * splits);
  at::parallel_for(0, N * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / splits, part = item % splits;
      if (ce::is_ignored(t[row], o)) continue;
      const int64_t lo = part * piece, hi = std::min(C, lo + piece);
      partial[item] = piece_stats<scalar_t, acc_t>(x + row * row_stride, w, lo, hi, o, entropy);
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (ce::is_ignored(t[row], o)) {
        finish(row, nullptr);
        continue;
      }
      auto merged = partial[row * splits];
      for (int64_t part = 1; part < splits; ++part) merged = ce::merge_stats(merged, partial[row * splits + part]);
      finish(row, &merged);
    }
  });
}

template <typename scalar_t>
void ce_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                     const ce::Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss, at::Tensor& lse,
                     at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  acc_t* stats_p = stats.mutable_data_ptr<acc_t>();
  // (N, 4) with the extras (7): (max, log_s, logprob, entropy)
  const int64_t sw = stats.size(1);
  const bool extras = sw == 4;
  cpu::check_targets(t, N, C, o.ignore_index);

  // Writes the row's outputs from its merged stats (zeros for an ignored row).
  auto finish_row = [&](int64_t row, const ce::RowStats<acc_t>* merged) {
    const int64_t y = t[row];
    acc_t* st = stats_p + sw * row;
    if (merged == nullptr) {
      loss_p[row] = 0;
      lse_p[row] = 0;
      std::fill(st, st + sw, acc_t(0));
      return;
    }
    const acc_t z_y = ce::transform_logit<acc_t>(static_cast<acc_t>(x[row * row_stride + y]), o);
    const acc_t w_y = w ? w[y] : acc_t(1);
    ce::row_loss(*merged, z_y, w_y, o, loss_p + row, lse_p + row, st + 1);
    st[0] = merged->max;
    if (extras) ce::row_extras(*merged, z_y, st[1], st + 2, st + 3);
  };
  for_each_row_stats<scalar_t, acc_t>(x, row_stride, t, w, N, C, fwd_piece(N, C), o, finish_row, extras);
}

// The gradient of x[lo, hi) of one live row into g[lo, hi), given the row's coefficients. g may
// be x itself (in place): every element is read before it is written, the target's first.
template <typename scalar_t, typename acc_t>
void grad_piece(const scalar_t* xr, scalar_t* gr, const acc_t* w, int64_t lo, int64_t hi, int64_t y, acc_t w_y,
                const ce::GradCoefs<acc_t>& coefs, const ce::Options<acc_t>& o) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const bool has_target = y >= lo && y < hi;
  const acc_t z_y = has_target ? ce::transform_logit<acc_t>(static_cast<acc_t>(xr[y]), o) : acc_t(0);
  const Vec one(acc_t(1));
  int64_t j = lo;
  for (; j + V <= hi; j += V) {
    const Vec z = ce::transform_logit<acc_t>(VecIO<scalar_t>::load(xr + j), o);
    const Vec wj = w ? Vec::loadu(w + j) : one;
    VecIO<scalar_t>::store(gr + j, ce::grad_element<acc_t>(z, wj, coefs, o));
  }
  for (; j < hi; ++j) {
    const acc_t z = ce::transform_logit<acc_t>(static_cast<acc_t>(xr[j]), o);
    gr[j] = static_cast<scalar_t>(ce::grad_element<acc_t>(z, w ? w[j] : acc_t(1), coefs, o));
  }
  if (has_target) gr[y] = static_cast<scalar_t>(ce::grad_target<acc_t>(z_y, w_y, coefs, o));
}

// Writes the (N, C) gradient, rows of out contiguous, in pieces of kBwdPiece elements spread over
// the threads: zeros for an ignored row, else grad_piece with coefs_of(row, w_y). out may be x
// (in place, row_stride == C).
template <typename scalar_t, typename acc_t, typename CoefsOf>
void grad_rows(const scalar_t* x, int64_t row_stride, scalar_t* out, int64_t N, int64_t C, const int64_t* t,
               const acc_t* w, const ce::Options<acc_t>& o, const CoefsOf& coefs_of) {
  const int64_t pieces = (C + kBwdPiece - 1) / kBwdPiece;
  at::parallel_for(0, N * pieces, cpu::grain_items(std::min(C, kBwdPiece)), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / pieces, part = item % pieces;
      const int64_t lo = part * kBwdPiece, hi = std::min(C, lo + kBwdPiece);
      const int64_t y = t[row];
      scalar_t* gr = out + row * C;
      if (ce::is_ignored(y, o)) {
        std::fill(gr + lo, gr + hi, scalar_t(0));
        continue;
      }
      const acc_t w_y = w ? w[y] : acc_t(1);
      grad_piece<scalar_t, acc_t>(x + row * row_stride, gr, w, lo, hi, y, w_y, coefs_of(row, w_y), o);
    }
  });
}

template <typename scalar_t>
void ce_bwd_cpu_impl(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                     const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                     const std::optional<at::Tensor>& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
                     const ce::Options<at::opmath_type<scalar_t>>& o, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const int64_t g_stride = grad_loss.stride(0);
  const acc_t* gl = grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr;
  const int64_t gl_stride = grad_lse.has_value() ? grad_lse->stride(0) : 0;
  const acc_t* stats_p = stats.const_data_ptr<acc_t>();
  const int64_t sw = stats.size(1);
  const acc_t* glp = grad_logprob.has_value() ? grad_logprob->const_data_ptr<acc_t>() : nullptr;
  const int64_t glp_stride = grad_logprob.has_value() ? grad_logprob->stride(0) : 0;
  const acc_t* gh = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
  const int64_t gh_stride = grad_entropy.has_value() ? grad_entropy->stride(0) : 0;
  cpu::check_targets(t, N, C, o.ignore_index);
  const acc_t W = weight_sum_of(w, C);
  grad_rows<scalar_t, acc_t>(x, row_stride, grad.mutable_data_ptr<scalar_t>(), N, C, t, w, o,
                             [&](int64_t row, acc_t w_y) {
                               const acc_t* st = stats_p + sw * row;
                               return ce::grad_coefs<acc_t>(st[0], st[1], w_y, W, g[row * g_stride],
                                                            gl ? gl[row * gl_stride] : acc_t(0), o,
                                                            glp ? glp[row * glp_stride] : acc_t(0),
                                                            gh ? gh[row * gh_stride] : acc_t(0), gh ? st[3] : acc_t(0));
                             });
}

template <typename scalar_t>
void ce_fwd_grad_cpu_impl(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& grad_scale,
                          const ce::Options<at::opmath_type<scalar_t>>& o, at::Tensor& loss, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);  // contiguous: row stride C
  scalar_t* x = logits.mutable_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr;
  const int64_t g_stride = grad_scale.has_value() ? grad_scale->stride(0) : 0;
  acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  // Before anything is overwritten: a bad target leaves the logits as they were.
  cpu::check_targets(t, N, C, o.ignore_index);
  const acc_t W = weight_sum_of(w, C);

  const int64_t piece = fwd_piece(N, C);
  const bool split = piece < C;
  // Rows in pieces: their coefficients, kept from the stats pass for the gradient pass.
  std::vector<ce::GradCoefs<acc_t>> coefs(split ? N : 0);
  // The forward's finish_row (without stats), then the gradient with grad_lse = 0. The row is
  // overwritten only here, after its stats are complete and its target logit is read; a row of
  // one piece is overwritten at once, by the thread that just read it.
  auto finish_row = [&](int64_t row, const ce::RowStats<acc_t>* merged) {
    scalar_t* xr = x + row * C;
    if (merged == nullptr) {
      loss_p[row] = 0;
      lse_p[row] = 0;
      if (!split) std::fill(xr, xr + C, scalar_t(0));
      return;
    }
    const int64_t y = t[row];
    const acc_t z_y = ce::transform_logit<acc_t>(static_cast<acc_t>(xr[y]), o);
    const acc_t w_y = w ? w[y] : acc_t(1);
    acc_t log_s;
    ce::row_loss(*merged, z_y, w_y, o, loss_p + row, lse_p + row, &log_s);
    const auto c =
        ce::grad_coefs<acc_t>(merged->max, log_s, w_y, W, g ? g[row * g_stride] : acc_t(1), acc_t(0), o);
    if (split) {
      coefs[row] = c;
    } else {
      grad_piece<scalar_t, acc_t>(xr, xr, w, 0, C, y, w_y, c, o);
    }
  };
  for_each_row_stats<scalar_t, acc_t>(x, C, t, w, N, C, piece, o, finish_row);
  if (split) {
    grad_rows<scalar_t, acc_t>(x, C, x, N, C, t, w, o, [&](int64_t row, acc_t) { return coefs[row]; });
  }
}

// Focal loss ((6) in cross_entropy_math.h): the forward's row pass, finished with focal_row on the
// row's nll (row_loss without weights: the options carry no smoothing, z-loss, softcap or
// temperature) and a_y = weight[y]. The gradient needs no kernel of its own (see registration.cpp).
template <typename scalar_t>
void focal_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const ce::Options<at::opmath_type<scalar_t>>& o, at::opmath_type<scalar_t> gamma,
                        at::Tensor& loss, at::Tensor& stats, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
  acc_t* stats_p = stats.mutable_data_ptr<acc_t>();
  acc_t* coef_p = coef.mutable_data_ptr<acc_t>();
  cpu::check_targets(t, N, C, o.ignore_index);

  auto finish_row = [&](int64_t row, const ce::RowStats<acc_t>* merged) {
    if (merged == nullptr) {
      loss_p[row] = 0;
      coef_p[row] = 0;
      stats_p[2 * row] = 0;
      stats_p[2 * row + 1] = 0;
      return;
    }
    const int64_t y = t[row];
    const acc_t z_y = ce::transform_logit<acc_t>(static_cast<acc_t>(x[row * row_stride + y]), o);
    acc_t nll, lse;
    ce::row_loss(*merged, z_y, acc_t(1), o, &nll, &lse, stats_p + 2 * row + 1);
    stats_p[2 * row] = merged->max;
    const auto f = ce::focal_row<acc_t>(nll, w ? w[y] : acc_t(1), gamma);
    loss_p[row] = f.loss;
    coef_p[row] = f.coef;
  };
  // The class weights enter only through a_y: the stats pass reads none (no smoothing).
  for_each_row_stats<scalar_t, acc_t>(x, row_stride, t, static_cast<const acc_t*>(nullptr), N, C, fwd_piece(N, C),
                                      o, finish_row);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                         double label_smoothing, double z_loss, double softcap,
                                                         double temperature, bool extras) {
  check_ce_args(logits, target, weight);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  auto lse = at::empty({logits.size(0)}, logits.options().dtype(acc));
  auto stats = at::empty({logits.size(0), extras ? 4 : 2}, logits.options().dtype(acc));
  if (logits.size(0) == 0) return {loss, lse, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), ignore_index, label_smoothing, z_loss, softcap, temperature);
    ce_fwd_cpu_impl<scalar_t>(logits, target, weight, o, loss, lse, stats);
  });
  return {loss, lse, stats};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                 const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index,
                                 double label_smoothing, double z_loss, double softcap, double temperature,
                                 const std::optional<at::Tensor>& grad_logprob,
                                 const std::optional<at::Tensor>& grad_entropy) {
  check_ce_args(logits, target, weight);
  check_row_grad(grad_loss, logits, "grad_loss");
  check_row_stats(stats, logits, grad_entropy.has_value());
  if (grad_lse.has_value()) check_row_grad(*grad_lse, logits, "grad_lse");
  if (grad_logprob.has_value()) check_row_grad(*grad_logprob, logits, "grad_logprob");
  if (grad_entropy.has_value()) check_row_grad(*grad_entropy, logits, "grad_entropy");
  auto grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  advise_huge_pages(grad.mutable_data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), ignore_index, label_smoothing, z_loss, softcap, temperature);
    ce_bwd_cpu_impl<scalar_t>(grad_loss, grad_lse, logits, target, weight, stats, grad_logprob, grad_entropy, o,
                              grad);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cpu(at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& grad_scale,
                                                              int64_t ignore_index, double label_smoothing,
                                                              double z_loss, double softcap, double temperature) {
  check_in_place_logits(logits);  // first: a strided view gets the in-place reason, not a layout detail
  check_ce_args(logits, target, weight);
  if (grad_scale.has_value()) check_row_grad(*grad_scale, logits, "grad_scale");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  auto lse = at::empty({logits.size(0)}, logits.options().dtype(acc));
  if (logits.size(0) == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), ignore_index, label_smoothing, z_loss, softcap, temperature);
    ce_fwd_grad_cpu_impl<scalar_t>(logits, target, weight, grad_scale, o, loss, lse);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   int64_t ignore_index, double gamma) {
  check_ce_args(logits, target, weight);
  TORCH_CHECK(gamma >= 0, "fusedloss: focal_loss gamma must be >= 0, got ", gamma);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  auto stats = at::empty({logits.size(0), 2}, logits.options().dtype(acc));
  auto coef = at::empty({logits.size(0)}, logits.options().dtype(acc));
  if (logits.size(0) == 0) return {loss, stats, coef};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "focal_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = make_options<acc_t>(logits.size(1), ignore_index, 0.0, 0.0, 0.0, 1.0);
    focal_fwd_cpu_impl<scalar_t>(logits, target, weight, o, static_cast<acc_t>(gamma), loss, stats, coef);
  });
  return {loss, stats, coef};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("focal_loss_fwd", &fusedloss::focal_loss_fwd_cpu);
  m.impl("cross_entropy_fwd_grad_", &fusedloss::cross_entropy_fwd_grad_cpu);
  m.impl("cross_entropy_fwd", &fusedloss::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &fusedloss::cross_entropy_bwd_cpu);
}
