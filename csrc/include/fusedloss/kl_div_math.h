#pragma once
// Per-row math of the distillation losses kl_div_logits and jsd_logits (issue #16, item 4), shared by
// the CPU kernels (scalar and at::vec) and the CUDA kernels; fusedloss/triton/kl_div.py follows the
// same steps with the same names.
//
// One row: student logits s_j, teacher logits t_j, j < C; temperature T; beta in [0, 1].
//   (1) a_j = s_j / T, b_j = t_j / T (multiplied by 1/T).
//       q = softmax(a) (student), p = softmax(b) (teacher);
//       log q_j = a_j - lse_a, log p_j = b_j - lse_b.
//   (2) the loss of the row, times `scale` (T^2 for kl_div_logits, Hinton et al. 2015: the soft
//       targets' gradients shrink as 1/T^2, the factor keeps them on the scale of a hard-label
//       loss; 1 for jsd_logits):
//         mode FORWARD_KL (kl_div_logits; jsd_logits with beta = 0):  K  = KL(p || q) = sum_j p_j (log p_j - log q_j)
//         mode REVERSE_KL (jsd_logits with beta = 1):                 K' = KL(q || p) = sum_j q_j (log q_j - log p_j)
//         mode JSD (0 < beta < 1): with m_j = beta p_j + (1 - beta) q_j,
//           J = beta Kp + (1 - beta) Kq,   Kp = KL(p || m),   Kq = KL(q || m)
//       A term whose probability is 0 (a -inf logit) is 0, the limit of x log x (torch's xlogy).
//   (3) one pass for the KLs. With the maxima M_a, M_b (M_a = max_j s_j / T: the maxima are taken
//       over the raw logits, see scaled_diff) and S_a = sum_j exp(a_j - M_a), S_b likewise
//       (lse = M + log S), log p_j - log q_j = (b_j - M_b) - (a_j - M_a) - log S_b + log S_a, so
//         K = W / S_b - log S_b + log S_a,   W = sum_j exp(b_j - M_b) ((b_j - M_b) - (a_j - M_a)).
//       Every term is of the size of the rows' spread, not of the logits themselves (K from
//       sum p (b - a) - lse_b + lse_a would cancel large terms: at C = 1 it would not even be 0).
//       The online max / sum-exp of both rows (M_a, S_a, M_b, S_b) carries W along: when a piece's
//       maxima (m_a, m_b) give way to larger ones, its W becomes
//         exp(m_b - M_b) (W + S_b ((m_b - M_b) - (m_a - M_a)))        (its S_b before rescaling)
//       and S_b becomes exp(m_b - M_b) S_b. Subtracting the max keeps every exp() in (0, 1]. K' is the
//       mirror image (W over the student's exponentials, with (a - M_a) - (b - M_b)).
//       The JSD needs both normalizers inside log m_j, so it takes a second pass over the row once
//       lse_a and lse_b are known (the row is still in cache).
//   (4) gradients. dq_j / da_k = q_j ([j == k] - q_k), the same for p with b. With upstream g and
//       c = g * scale / T (the 1/T is d a / d s):
//       FORWARD_KL: K = sum p log p - sum p log q, and sum_j p_j d log q_j / d a_k = p_k - q_k sum p = p_k - q_k:
//           d K / d a_k = q_k - p_k                             -> grad_s_k = c (q_k - p_k)
//         d K / d b_k = sum_j dp_j/db_k (log p_j - log q_j) + sum_j p_j d log p_j / d b_k
//                     = p_k (log p_k - log q_k) - p_k K + 0    -> grad_t_k = c p_k (log p_k - log q_k - K)
//       REVERSE_KL: the mirror image: grad_s_k = c q_k (log q_k - log p_k - K'), grad_t_k = c (p_k - q_k).
//       JSD: J = beta sum p log p + (1 - beta) sum q log q - sum m log m. As a function of q (p fixed),
//           dJ / dq_j = (1 - beta) (log q_j + 1) - (1 - beta) (log m_j + 1) = (1 - beta) (log q_j - log m_j)
//         and through the softmax, d / d a_k = q_k (dJ/dq_k - sum_j q_j dJ/dq_j), with
//           sum_j q_j (1 - beta) (log q_j - log m_j) = (1 - beta) Kq:
//           grad_s_k = c (1 - beta) q_k (log q_k - log m_k - Kq)
//         and by symmetry grad_t_k = c beta p_k (log p_k - log m_k - Kp).
//       Each p_k (...) / q_k (...) product is 0 where the probability is 0 (no 0 * inf).
//   (5) saved per row between forward and backward, stats (6,) = (max_s, log S_a, max_t, log S_b, k_t,
//       k_s): the raw maxima of s and t, the logs of the sums of (3) (lse_a = max_s / T + log S_a), and
//       the centering constants of (4): FORWARD_KL k_t = K; REVERSE_KL k_s = K'; JSD k_t = Kp, k_s = Kq.
//       The backward is one elementwise pass that reads both rows and writes the gradients.
// A row whose target equals ignore_index has loss 0, stats 0 and gradients 0.

#include "fusedloss/common.h"

#if defined(FL_CPU_VEC) && !FL_DEVICE_CODE
#include <ATen/cpu/vec/vec.h>
namespace fusedloss {
// Declared before the templates below (two-phase lookup, see common.h).
template <typename T>
inline at::vec::Vectorized<T> fl_log(const at::vec::Vectorized<T>& x) {
  return x.log();
}
// v where p > 0, else 0: the x log x = 0 convention of (2) and (4).
template <typename T>
inline at::vec::Vectorized<T> kl_where_positive(const at::vec::Vectorized<T>& p, const at::vec::Vectorized<T>& v) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(zero, v, p > zero);
}
}  // namespace fusedloss
#endif

namespace fusedloss {

FL_HOST_DEVICE float kl_where_positive(float p, float v) { return p > 0.f ? v : 0.f; }
FL_HOST_DEVICE double kl_where_positive(double p, double v) { return p > 0.0 ? v : 0.0; }

namespace kl {

enum Mode : int { FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2 };

template <typename acc_t>
struct Options {
  int64_t num_classes;
  int64_t ignore_index;
  acc_t inv_temperature;
  acc_t beta;
  acc_t scale;  // T^2 (kl_div_logits) or 1 (jsd_logits)
  int mode;
};

// kl_div_logits (jsd = false): FORWARD_KL times T^2. jsd_logits: by beta, no T^2 (Liger's JSD).
template <typename acc_t>
inline Options<acc_t> make_options(int64_t C, int64_t ignore_index, double temperature, double beta, bool jsd) {
  int mode = FORWARD_KL;
  if (jsd) mode = beta == 0.0 ? FORWARD_KL : (beta == 1.0 ? REVERSE_KL : JSD);
  return Options<acc_t>{C,
                        ignore_index,
                        static_cast<acc_t>(1.0 / temperature),
                        static_cast<acc_t>(beta),
                        static_cast<acc_t>(jsd ? 1.0 : temperature * temperature),
                        mode};
}

// (1) relative to a max: (x - m) / T, on a scalar or an at::vec vector. The maxima are taken over the
// raw logits (max commutes with a positive scale) and the difference is formed before the scaling:
// x * (1/T) - m would let a compiler fuse the product into an FMA (GCC does in -std=c++NN mode, nvcc
// by default) and leave a rounding error where the difference must be 0 (the max element, C = 1).
template <typename acc_t, typename T>
FL_HOST_DEVICE T scaled_diff(const T& x, const T& m, const Options<acc_t>& o) {
  return (x - m) * T(o.inv_temperature);
}

// (3): running stats of a row or of a piece of it: the raw maxima of s and t, the sums of
// exp((x - max) / T), and w (FORWARD_KL: weighted by the teacher's exponentials, REVERSE_KL: by the
// student's; unused by the JSD).
template <typename acc_t>
struct RowState {
  acc_t max_s, sum_a, max_t, sum_b, w;
};

template <typename acc_t>
FL_HOST_DEVICE RowState<acc_t> empty_state() {
  return RowState<acc_t>{-fl_inf<acc_t>(), acc_t(0), -fl_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// exp((m - M) / T) for a piece's max m under the merged max M >= m; 0 for an empty (all -inf) piece,
// so that exp(-inf + inf) never appears.
template <typename acc_t>
FL_HOST_DEVICE acc_t rescale(acc_t m, acc_t M, const Options<acc_t>& o) {
  return m == -fl_inf<acc_t>() ? acc_t(0) : fl_exp(scaled_diff(m, M, o));
}

// A piece's W against the merged maxima (3): rescaled by its anchor side's factor f, shifted by the
// change of both maxima (already divided by T). A piece without mass on the anchor side has W = 0
// (and no -inf - -inf).
template <typename acc_t>
FL_HOST_DEVICE acc_t shift_w(acc_t w, acc_t sum_anchor, acc_t f, acc_t d_anchor, acc_t d_other) {
  return sum_anchor == acc_t(0) ? acc_t(0) : f * (w + sum_anchor * (d_anchor - d_other));
}

// Merges two pieces of one row; the callers fix the order of merges, so results are deterministic.
template <typename acc_t>
FL_HOST_DEVICE RowState<acc_t> merge_state(const RowState<acc_t>& x, const RowState<acc_t>& y,
                                           const Options<acc_t>& o) {
  RowState<acc_t> r;
  r.max_s = fl_max(x.max_s, y.max_s);
  r.max_t = fl_max(x.max_t, y.max_t);
  const acc_t xa = rescale(x.max_s, r.max_s, o), ya = rescale(y.max_s, r.max_s, o);
  const acc_t xb = rescale(x.max_t, r.max_t, o), yb = rescale(y.max_t, r.max_t, o);
  r.sum_a = x.sum_a * xa + y.sum_a * ya;
  r.sum_b = x.sum_b * xb + y.sum_b * yb;
  r.w = acc_t(0);
  if (o.mode == FORWARD_KL || o.mode == REVERSE_KL) {
    const acc_t dxa = scaled_diff(x.max_s, r.max_s, o), dya = scaled_diff(y.max_s, r.max_s, o);
    const acc_t dxb = scaled_diff(x.max_t, r.max_t, o), dyb = scaled_diff(y.max_t, r.max_t, o);
    if (o.mode == FORWARD_KL) {
      r.w = shift_w(x.w, x.sum_b, xb, dxb, dxa) + shift_w(y.w, y.sum_b, yb, dyb, dya);
    } else {
      r.w = shift_w(x.w, x.sum_a, xa, dxa, dxb) + shift_w(y.w, y.sum_a, ya, dya, dyb);
    }
  }
  return r;
}

// The weighted term of (3) for one element: e diff where e > 0, else 0, with e the anchor side's
// exp((x - max) / T) and diff = (t - max_t) / T - (s - max_s) / T (FORWARD_KL) or the mirror
// (REVERSE_KL). Scalar or vector.
template <typename T>
FL_HOST_DEVICE T w_term(const T& e, const T& diff) {
  return kl_where_positive(e, e * diff);
}

// One element (raw logits s, t) into a running state (a GPU thread's inner step). The CPU kernel
// builds chunk states with vector loops and merges them with merge_state.
template <typename acc_t>
FL_HOST_DEVICE void update_state(RowState<acc_t>& r, acc_t s, acc_t t, const Options<acc_t>& o) {
  // Common case once a few elements are in: neither max grows, two exp() (false for NaN, and for a
  // state still at -inf, where s - max would be NaN).
  if (s <= r.max_s && t <= r.max_t && r.max_s != -fl_inf<acc_t>() && r.max_t != -fl_inf<acc_t>()) {
    const acc_t da = scaled_diff(s, r.max_s, o), db = scaled_diff(t, r.max_t, o);
    const acc_t ea = fl_exp(da), eb = fl_exp(db);
    r.sum_a += ea;
    r.sum_b += eb;
    if (o.mode == FORWARD_KL) r.w += w_term(eb, db - da);
    if (o.mode == REVERSE_KL) r.w += w_term(ea, da - db);
    return;
  }
  // The element as a piece of its own: its maxima are its values, so its W is 0 (3).
  RowState<acc_t> one;
  one.max_s = s;
  one.max_t = t;
  one.sum_a = (s != s) ? s : (s == -fl_inf<acc_t>() ? acc_t(0) : acc_t(1));
  one.sum_b = (t != t) ? t : (t == -fl_inf<acc_t>() ? acc_t(0) : acc_t(1));
  one.w = acc_t(0);
  r = merge_state(r, one, o);
}

// Row result of the forward: the loss (2) and the stats (5).
template <typename acc_t>
struct RowResult {
  acc_t loss, max_s, log_sa, max_t, log_sb, k_t, k_s;
};

// (3) for the KL modes; for the JSD, the normalizers only (loss and k's come from jsd_finish).
template <typename acc_t>
FL_HOST_DEVICE RowResult<acc_t> finish_state(const RowState<acc_t>& r, const Options<acc_t>& o) {
  RowResult<acc_t> out{acc_t(0), r.max_s, fl_log(r.sum_a), r.max_t, fl_log(r.sum_b), acc_t(0), acc_t(0)};
  if (o.mode == FORWARD_KL) {
    out.k_t = r.w / r.sum_b - out.log_sb + out.log_sa;
    out.loss = o.scale * out.k_t;
  } else if (o.mode == REVERSE_KL) {
    out.k_s = r.w / r.sum_a - out.log_sa + out.log_sb;
    out.loss = o.scale * out.k_s;
  }
  return out;
}

// log q and log p of one element (scalar or vector; raw logits) from the row's stats.
template <typename acc_t, typename T>
FL_HOST_DEVICE void log_probs(const T& s, const T& t, acc_t max_s, acc_t log_sa, acc_t max_t, acc_t log_sb,
                              const Options<acc_t>& o, T& log_q, T& log_p) {
  log_q = scaled_diff(s, T(max_s), o) - T(log_sa);
  log_p = scaled_diff(t, T(max_t), o) - T(log_sb);
}

// The JSD's second pass, per element: adds p (log p - log m) to kp and q (log q - log m) to kq.
template <typename acc_t, typename T>
FL_HOST_DEVICE void jsd_terms(const T& s, const T& t, const RowResult<acc_t>& r, const Options<acc_t>& o, T& kp,
                              T& kq) {
  T log_q, log_p;
  log_probs(s, t, r.max_s, r.log_sa, r.max_t, r.log_sb, o, log_q, log_p);
  const T q = fl_exp(log_q), p = fl_exp(log_p);
  const T log_m = fl_log(T(o.beta) * p + T(acc_t(1) - o.beta) * q);
  kp = kp + kl_where_positive(p, p * (log_p - log_m));
  kq = kq + kl_where_positive(q, q * (log_q - log_m));
}

template <typename acc_t>
FL_HOST_DEVICE void jsd_finish(RowResult<acc_t>& out, acc_t kp, acc_t kq, const Options<acc_t>& o) {
  out.k_t = kp;
  out.k_s = kq;
  out.loss = o.scale * (o.beta * kp + (acc_t(1) - o.beta) * kq);
}

// (4): the row's coefficients c_s, c_t from its upstream gradient g_row.
template <typename acc_t>
struct GradCoefs {
  acc_t c_s, c_t;
};

template <typename acc_t>
FL_HOST_DEVICE GradCoefs<acc_t> grad_coefs(acc_t g_row, const Options<acc_t>& o) {
  const acc_t c = g_row * o.scale * o.inv_temperature;
  if (o.mode == JSD) return GradCoefs<acc_t>{c * (acc_t(1) - o.beta), c * o.beta};
  return GradCoefs<acc_t>{c, c};
}

// (4) for one element (scalar or vector; raw logits): the student's and the teacher's gradient.
// st: the row's stats (5).
template <typename acc_t, typename T>
FL_HOST_DEVICE void grad_elem(const T& s, const T& t, const acc_t* st, const GradCoefs<acc_t>& c,
                              const Options<acc_t>& o, T& grad_s, T& grad_t) {
  T log_q, log_p;
  log_probs(s, t, st[0], st[1], st[2], st[3], o, log_q, log_p);
  const T q = fl_exp(log_q), p = fl_exp(log_p);
  if (o.mode == FORWARD_KL) {
    grad_s = T(c.c_s) * (q - p);
    grad_t = T(c.c_t) * kl_where_positive(p, p * ((log_p - log_q) - T(st[4])));
  } else if (o.mode == REVERSE_KL) {
    grad_s = T(c.c_s) * kl_where_positive(q, q * ((log_q - log_p) - T(st[5])));
    grad_t = T(c.c_t) * (p - q);
  } else {
    const T log_m = fl_log(T(o.beta) * p + T(acc_t(1) - o.beta) * q);
    grad_s = T(c.c_s) * kl_where_positive(q, q * ((log_q - log_m) - T(st[5])));
    grad_t = T(c.c_t) * kl_where_positive(p, p * ((log_p - log_m) - T(st[4])));
  }
}

// Stats per row (5).
constexpr int kStats = 6;

template <typename acc_t>
FL_HOST_DEVICE void store_stats(acc_t* st, const RowResult<acc_t>& r) {
  st[0] = r.max_s;
  st[1] = r.log_sa;
  st[2] = r.max_t;
  st[3] = r.log_sb;
  st[4] = r.k_t;
  st[5] = r.k_s;
}

template <typename acc_t>
FL_HOST_DEVICE bool is_ignored(int64_t y, const Options<acc_t>& o) {
  return y == o.ignore_index;
}

}  // namespace kl
}  // namespace fusedloss
