#pragma once
// InfoNCE's per-element math, shared by the CPU and CUDA kernels of fusedloss::info_nce_lse_{fwd,bwd}.
//
// The kernel computes the log-sum-exps of the scaled similarity S = scale * Q K^T (N x M) and the
// positive logits:
//   lse_r_i = log sum_j exp(S_ij)      (rows: query -> key direction)
//   lse_c_j = log sum_i exp(S_ij)      (columns: key -> query direction, symmetric InfoNCE)
//   pos_i   = mean_{j in P(i)} S_ij    (the forward's own S; P(i) = {l_i}, l_i = labels_i or i,
//                                       or with key groups every j with key_groups_j == labels_i)
// The loss is lse_r_i - pos_i (and the columns' lse_c_i - pos_i); the reduction is composed by
// autograd in Python, so the kernel's backward is the gradient of
//   L = sum_i g_i lse_r_i + sum_j h_j lse_c_j + sum_i u_i pos_i:
//   dL/dS_ij = g_i exp(S_ij - lse_r_i) + h_j exp(S_ij - lse_c_j) + u_i [j in P(i)] / |P(i)| =: P_ij (1)
//   dL/dQ_i  = scale * sum_j P_ij K_j,    dL/dK_j = scale * sum_i P_ij Q_i                        (2)
//   dL/dscale = sum_ij P_ij (Q_i . K_j) = sum_ij P_ij S_ij / scale                                  (3)
// (3) is accumulated from the unscaled dot products T = Q K^T, so scale never divides. Its precision
// matters more than its size suggests: InfoNCE has u = -(g + h), and at a low temperature P is nearly
// one-hot on the positive, so the row's terms nearly cancel. The positive is inside the kernel so that
// they cancel element by element, on the same T_{i,l_i}, before any rounding. (3) is summed as
//   sum_i [ g_i (sum_j e_ij (T_ij - c_i)) / (sum_j e_ij) + u_i mean_{P(i)} (T_ij - c_i) + (g_i + u_i) c_i ]
//     + sum_j h_j [ (sum_i f_ij (T_ij - c'_j)) / (sum_i f_ij) + c'_j ]                           (3')
//   e_ij = exp(S_ij - lse_r_i),  f_ij = exp(S_ij - lse_c_j),
// equal to (3) for any shifts c, c' because sum_j e_ij / sum_j e_ij = 1. Why this form:
// - the ratio cancels the rounding of lse_r_i (|lse| ~ scale, so its last bit moves every e_ij of the
//   row by the same factor, ~1e-6 at scale 50);
// - the shift c_i = pos_i / scale (shift_of), ~T_{i,l_i}, makes the positive's own term of the
//   weighted mean ~0, so the float32 partial sums carry only what remains of the row, and
//   T_{i,l_i} - c_i is exact (Sterbenz; with several positives c_i is their mean); c'_j = c_j for
//   j < N (the symmetric loss's positive of column j), else 0;
// - (g_i + u_i) c_i is formed in double, exactly 0 for InfoNCE's rows (u = -g).
// Partial sums are float32 per tile row, merged in double; the scale gradient is returned in the
// dtype of scale (fusedloss.functional passes float64 for a learnable temperature).
// Both are streamed over tiles: the forward keeps a running (max, sum exp) per row and per column
// (flash-attention's online softmax); the backward recomputes each tile of S from Q and K.
#include "fusedloss/common.h"

namespace fusedloss {
namespace info_nce {

// Running log-sum-exp of a stream of values: lse = max + log(sum), sum = sum exp(x - max).
template <typename acc_t>
struct Lse {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
FL_HOST_DEVICE Lse<acc_t> empty_lse() {
  return Lse<acc_t>{-fl_inf<acc_t>(), acc_t(0)};
}

// Merge two partial results; the caller fixes the order of merges, so the result is deterministic.
// A part whose max is -inf (empty) adds nothing and never makes exp(-inf - -inf).
template <typename acc_t>
FL_HOST_DEVICE Lse<acc_t> merge(const Lse<acc_t>& a, const Lse<acc_t>& b) {
  const acc_t m = fl_max(a.max, b.max);
  if (m == -fl_inf<acc_t>()) return Lse<acc_t>{m, acc_t(0)};
  const acc_t sa = a.max == -fl_inf<acc_t>() ? acc_t(0) : a.sum * fl_exp(a.max - m);
  const acc_t sb = b.max == -fl_inf<acc_t>() ? acc_t(0) : b.sum * fl_exp(b.max - m);
  return Lse<acc_t>{m, sa + sb};
}

// A tile's part: its max m over the tile's values and sum exp(x - m), merged into the running one.
template <typename acc_t>
FL_HOST_DEVICE Lse<acc_t> merge_part(const Lse<acc_t>& run, acc_t tile_max, acc_t tile_sum) {
  return merge(run, Lse<acc_t>{tile_max, tile_sum});
}

template <typename acc_t>
FL_HOST_DEVICE acc_t finish(const Lse<acc_t>& r) {
  // An empty stream (M == 0) has lse -inf, as torch.logsumexp of an empty row.
  return r.max == -fl_inf<acc_t>() ? r.max : r.max + fl_log(r.sum);
}

// One softmax weight of (1) and (3'): exp(s - lse) where its upstream weight w is non-zero, else an
// exact 0 (never exp of an ignored row's values, which may be inf).
template <typename acc_t>
FL_HOST_DEVICE acc_t softmax_weight(acc_t s, acc_t w, acc_t lse) {
  return w == acc_t(0) ? acc_t(0) : fl_exp(s - lse);
}

// One row's (or column's) sum_j e_ij (T_ij - c_i) / sum_j e_ij of (3'). A sum of zeros (every e_ij 0: an
// infinite lse) gives 0, as the unnormalized sum does; a NaN stays NaN.
FL_HOST_DEVICE double softmax_mean(double num, double den) {
  return den == 0.0 ? 0.0 : num / den;
}

// (1): the gradient of L with respect to one element S_ij; u is the positive's weight u_i at
// j = l_i and 0 elsewhere. h and lse_c are 0 when the kernel runs without the column direction (pass
// has_cols = false so that exp is not evaluated). The terms are added in (1)'s order, the positive's
// last: g e + u is where a one-hot row cancels, in float32 as plain PyTorch's softmax - one_hot.
template <typename acc_t>
FL_HOST_DEVICE acc_t grad_s(acc_t s, acc_t g, acc_t lse_r, bool has_cols, acc_t h, acc_t lse_c, acc_t u = acc_t(0)) {
  acc_t p = g == acc_t(0) ? acc_t(0) : g * fl_exp(s - lse_r);
  if (has_cols && h != acc_t(0)) p += h * fl_exp(s - lse_c);
  return p + u;
}

// The shift c_i of (3'): the forward's positive logit unscaled, or 0 where that is not finite (a
// zero or infinite scale, an out-of-range label's NaN): any shift is exact, a close one is precise.
template <typename acc_t>
FL_HOST_DEVICE acc_t shift_of(acc_t pos, acc_t scale) {
  const acc_t c = pos / scale;
  return c - c == acc_t(0) ? c : acc_t(0);  // c - c is NaN for inf and NaN
}

// A row's part of (3'): g (num / den) + u mean_P (T - c) + (g + u) c, in double. t_minus_c is the
// kernel's mean of T_ij - c_i over the row's positives (NaN where the row has none: an out-of-range
// label). Zero weights add exact zeros.
template <typename acc_t>
FL_HOST_DEVICE double dscale_row(acc_t g, double num, double den, acc_t u, double t_minus_c, acc_t c) {
  double out = g == acc_t(0) ? 0.0 : static_cast<double>(g) * softmax_mean(num, den);
  if (u != acc_t(0)) out += static_cast<double>(u) * t_minus_c;
  return out + (static_cast<double>(g) + static_cast<double>(u)) * static_cast<double>(c);
}

// A column's part of (3'): h (num / den + c').
template <typename acc_t>
FL_HOST_DEVICE double dscale_col(acc_t h, double num, double den, acc_t c) {
  return h == acc_t(0) ? 0.0 : static_cast<double>(h) * (softmax_mean(num, den) + static_cast<double>(c));
}

}  // namespace info_nce
}  // namespace fusedloss
