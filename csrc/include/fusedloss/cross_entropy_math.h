#pragma once
// Per-row math of the fused softmax cross-entropy, shared by the CPU kernels (scalar and at::vec)
// and the CUDA kernels. fusedloss/triton/cross_entropy.py follows the same steps with the same names.
//
// Notation for one row of C logits x_j, target class y, class weights w_j (all 1 without weights):
//   (1) z_j   = transform(x_j) = softcap * tanh(x_j / softcap) / T      (softcap off: z_j = x_j / T)
//   (2) m = max_j z_j and s = sum_j exp(z_j - m), computed online; log_s = log s, lse = m + log_s.
//       Subtracting the max keeps every exp() in (0, 1]: no overflow, and s >= 1 never underflows.
//       m and log_s are kept apart: for logits of 1e30, m + log_s rounds to m, and everything
//       below would lose log_s (torch's log_softmax keeps it by subtracting the max first, too).
//   (3) loss  = (1 - eps) * w_y * (lse - z_y)                     the (weighted) NLL of the target
//             + (eps / C) * sum_j w_j * (lse - z_j)               label smoothing, as torch defines it
//             + lambda * lse^2                                    PaLM z-loss (not class-weighted)
//       with eps = label_smoothing, lambda = z_loss. In terms of the stats:
//         lse - z_y                 = (m - z_y) + log_s
//         sum_j w_j (lse - z_j)     = W * log_s - sum_j w_j (z_j - m),   W = sum_j w_j
//       so the forward keeps sum_w = W and sum_wd = sum_j w_j (z_j - m) next to (m, s): every
//       term stays of the size of the logits' spread, not of the logits themselves.
//   (4) gradient. With p_k = exp(z_k - lse) = exp((z_k - m) - log_s), d lse / d z_k = p_k, so
//         d loss / d z_k = p_k * (A + 2 lambda lse) - c_k,
//         A   = (1 - eps) w_y + (eps / C) W                        (the weight mass on lse)
//         c_k = (eps / C) w_k + [k == y] (1 - eps) w_y
//       With an upstream gradient g for the loss and g_lse for the returned lse (return_lse=True):
//         d / d z_k = p_k * p_scale - smooth * w_k                                  (k != y)
//         d / d z_y = nll * expm1((z_y - m) - log_s) + smooth * (p_y W - w_y) + lse_term * p_y
//       with nll = g (1 - eps) w_y, smooth = g eps / C, lse_term = g 2 lambda lse + g_lse and
//       p_scale = nll + smooth W + lse_term. The target's form is the same value regrouped so that
//       p_y - 1 comes from expm1: when p_y is close to 1, p_y * A - c_y cancels catastrophically.
//   (5) chain rule through (1): dz/dx = (1 - tanh^2(x / softcap)) / T, and tanh(x / softcap) is
//       z * T / softcap, so the backward recomputes z and needs no extra saved tensor.
//   (6) focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", eq. 5, in its
//       multi-class softmax form; issue #9): focal_row below.
//   (7) the row's extras (return_logprob / return_entropy), of the transformed row z:
//         logprob = log p_y = (z_y - m) - log_s
//         H = -sum_j p_j log p_j = -sum_j p_j ((z_j - m) - log_s) = log_s - sum_ed / s,
//         sum_ed = sum_j exp(z_j - m) (z_j - m)
//       sum_ed is accumulated online next to s, relative to the same running max: at a new max
//       M >= m, sum_j exp(z_j - M) (z_j - M) = exp(m - M) (sum_ed + (m - M) s). A -inf z_j adds 0
//       (the limit of p log p), not 0 * -inf. Their gradients, with upstream g_lp and g_H:
//         d logprob / d z_k = [k == y] - p_k: (4)'s NLL term with w_y (1 - eps) g replaced by
//           w_y (1 - eps) g - g_lp, so nll and p_scale take -g_lp (and the target's expm1 form
//           keeps p_y - 1 exact for this term too);
//         d H / d z_k = -sum_j (d p_j / d z_k) (log p_j + 1),  d p_j / d z_k = p_j ([j == k] - p_k)
//                     = -p_k (log p_k + 1) + p_k sum_j p_j (log p_j + 1) = -p_k (log p_k + H),
//           so p_scale takes -g_H H and each element -g_H p_k log p_k (0 where p_k = 0).
//       Both then go through (5) like the rest of the gradient.
// Only (m, log_s) per row is saved between forward and backward: the backward is one pass that
// recomputes z_k and p_k, reading the logits once and writing the gradient once.
// A row whose target equals ignore_index has loss 0, lse 0 and gradient 0, as in torch.

#include "fusedloss/common.h"

namespace fusedloss {
namespace ce {

template <typename acc_t>
struct Options {
  int64_t num_classes;
  int64_t ignore_index;
  acc_t smoothing;        // eps
  acc_t z_loss;           // lambda
  acc_t softcap;          // 0 turns the cap off
  acc_t inv_temperature;  // 1 / T
};

// (1), on a scalar or an at::vec vector.
template <typename acc_t, typename T>
FL_HOST_DEVICE T transform_logit(const T& x, const Options<acc_t>& o) {
  if (o.softcap > acc_t(0)) {
    return fl_mul_rn(fl_tanh(x * T(acc_t(1) / o.softcap)), T(o.softcap * o.inv_temperature));
  }
  return fl_mul_rn(x, T(o.inv_temperature));
}

// (5): dz/dx from z itself.
template <typename acc_t, typename T>
FL_HOST_DEVICE T transform_grad(const T& z, const Options<acc_t>& o) {
  if (o.softcap > acc_t(0)) {
    const T t = z * T(acc_t(1) / (o.softcap * o.inv_temperature));  // tanh(x / softcap)
    return (T(acc_t(1)) - t * t) * T(o.inv_temperature);
  }
  return T(o.inv_temperature);
}

// (2) and (3): running stats of a row or of a piece of it.
template <typename acc_t>
struct RowStats {
  acc_t max;     // m
  acc_t sumexp;  // s = sum exp(z - m)
  acc_t sum_wd;  // sum w (z - m), only with label smoothing
  acc_t sum_w;   // sum w, only with label smoothing
  acc_t sum_ed;  // sum exp(z - m) (z - m), only for the entropy (7)
};

template <typename acc_t>
FL_HOST_DEVICE RowStats<acc_t> empty_stats() {
  return RowStats<acc_t>{-fl_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// (7): sum_ed of a piece with max m and sum s, re-expressed relative to M >= m; 0 for an empty piece.
template <typename acc_t>
FL_HOST_DEVICE acc_t shift_ed(acc_t sum_ed, acc_t s, acc_t m, acc_t M) {
  if (m == -fl_inf<acc_t>() || s == acc_t(0)) return acc_t(0);
  if (m == M) return sum_ed;
  return fl_exp(m - M) * (sum_ed + (m - M) * s);
}

// sum_wd of a piece re-expressed relative to a larger max M: sum w (z - M) = sum_wd + sum_w (m - M).
// A piece with no weight mass contributes its sum_wd alone (avoids 0 * -inf for an empty piece).
template <typename acc_t>
FL_HOST_DEVICE acc_t shift_wd(const RowStats<acc_t>& r, acc_t M) {
  return r.sum_w == acc_t(0) ? r.sum_wd : r.sum_wd + r.sum_w * (r.max - M);
}

// Merges two pieces of one row; the caller fixes the order of merges, so results are
// deterministic. A piece whose max is -inf adds nothing to s (and must not make exp(-inf + inf)).
template <typename acc_t>
FL_HOST_DEVICE RowStats<acc_t> merge_stats(const RowStats<acc_t>& a, const RowStats<acc_t>& b) {
  const acc_t m = fl_max(a.max, b.max);
  RowStats<acc_t> r;
  r.max = m;
  r.sum_w = a.sum_w + b.sum_w;
  if (m == -fl_inf<acc_t>()) {
    r.sumexp = acc_t(0);
    r.sum_wd = a.sum_wd + b.sum_wd;
  } else {
    const acc_t sa = a.max == -fl_inf<acc_t>() ? acc_t(0) : a.sumexp * fl_exp(a.max - m);
    const acc_t sb = b.max == -fl_inf<acc_t>() ? acc_t(0) : b.sumexp * fl_exp(b.max - m);
    r.sumexp = sa + sb;
    r.sum_wd = shift_wd(a, m) + shift_wd(b, m);
  }
  // NaN maxima (a NaN logit) poison sum_ed too, through m - M.
  r.sum_ed =
      m == -fl_inf<acc_t>() ? acc_t(0) : shift_ed(a.sum_ed, a.sumexp, a.max, m) + shift_ed(b.sum_ed, b.sumexp, b.max, m);
  return r;
}

// One element into running stats (a GPU thread's inner step): one exp per element. The CPU kernel
// does the same on whole vectors, with a max pass and then a sum pass over each L1-sized chunk.
template <typename acc_t>
FL_HOST_DEVICE void update_stats(RowStats<acc_t>& r, acc_t z, acc_t w, bool smoothing, bool entropy = false) {
  if (z > r.max) {  // a new max rescales what was summed so far; the new element adds exp(0) * 0
    if (smoothing) r.sum_wd = shift_wd(r, z);
    if (entropy) r.sum_ed = shift_ed(r.sum_ed, r.sumexp, r.max, z);
    r.sumexp = (r.max == -fl_inf<acc_t>() ? acc_t(0) : r.sumexp * fl_exp(r.max - z)) + acc_t(1);
    r.max = z;
  } else if (z != z) {  // NaN poisons the row, as in torch
    r.max = z;
    r.sumexp = z;
    r.sum_ed = z;
  } else if (z != -fl_inf<acc_t>()) {
    const acc_t d = z - r.max;
    const acc_t e = fl_exp(d);
    r.sumexp += e;
    if (entropy) r.sum_ed += e * d;
  }
  if (smoothing) {
    // w * (z - m); a -inf logit gives -inf (w > 0) or NaN (w == 0), as torch's -(w * log_softmax).
    r.sum_wd += z == -fl_inf<acc_t>() ? w * z : w * (z - r.max);
    r.sum_w += w;
  }
}

template <typename acc_t>
FL_HOST_DEVICE bool is_ignored(int64_t y, const Options<acc_t>& o) {
  return y == o.ignore_index;
}

template <typename acc_t>
FL_HOST_DEVICE bool target_in_range(int64_t y, const Options<acc_t>& o) {
  return y >= 0 && y < o.num_classes;
}

// (2) + (3): the row's loss, lse and log_s from its merged stats. z_y is the transformed target
// logit, w_y its class weight. W is r.sum_w (accumulated only with label smoothing).
template <typename acc_t>
FL_HOST_DEVICE void row_loss(const RowStats<acc_t>& r, acc_t z_y, acc_t w_y, const Options<acc_t>& o,
                             acc_t* loss, acc_t* lse, acc_t* log_s) {
  const acc_t ls = fl_log(r.sumexp);
  const acc_t l = r.max + ls;
  acc_t value = (acc_t(1) - o.smoothing) * w_y * ((r.max - z_y) + ls);
  if (o.smoothing > acc_t(0)) {
    value += o.smoothing / acc_t(o.num_classes) * (r.sum_w * ls - r.sum_wd);
  }
  if (o.z_loss > acc_t(0)) {
    value += o.z_loss * l * l;
  }
  *loss = value;
  *lse = l;
  *log_s = ls;
}

// (7): the row's entropy from its merged stats (sum_ed accumulated) and log_s.
template <typename acc_t>
FL_HOST_DEVICE acc_t row_entropy(const RowStats<acc_t>& r, acc_t log_s) {
  return log_s - r.sum_ed / r.sumexp;
}

// (7): the row's logprob and entropy from its merged stats (sum_ed accumulated) and log_s.
template <typename acc_t>
FL_HOST_DEVICE void row_extras(const RowStats<acc_t>& r, acc_t z_y, acc_t log_s, acc_t* logprob, acc_t* entropy) {
  *logprob = (z_y - r.max) - log_s;
  *entropy = row_entropy(r, log_s);
}

// (4): the per-row constants of the gradient.
template <typename acc_t>
struct GradCoefs {
  acc_t max;
  acc_t log_s;
  acc_t p_scale;
  acc_t nll;
  acc_t smooth;
  acc_t lse_term;
  acc_t weight_sum;
  acc_t entropy;    // g_H of (7); 0 when the entropy gets no gradient (its terms are then skipped)
  acc_t entropy_h;  // g_H * H, inside p_scale (the target's regrouped form adds it itself)
};

// max and log_s are the forward's saved stats; weight_sum is W (C without weights). g_lp and g_H are
// the gradients of the row's logprob and entropy (7), H its entropy (read only when g_H != 0).
template <typename acc_t>
FL_HOST_DEVICE GradCoefs<acc_t> grad_coefs(acc_t max, acc_t log_s, acc_t w_y, acc_t weight_sum, acc_t g,
                                           acc_t g_lse, const Options<acc_t>& o, acc_t g_lp = acc_t(0),
                                           acc_t g_H = acc_t(0), acc_t H = acc_t(0)) {
  GradCoefs<acc_t> c;
  c.max = max;
  c.log_s = log_s;
  c.nll = g * (acc_t(1) - o.smoothing) * w_y - g_lp;
  c.smooth = g * o.smoothing / acc_t(o.num_classes);
  c.lse_term = o.z_loss > acc_t(0) ? g * acc_t(2) * o.z_loss * (max + log_s) + g_lse : g_lse;
  c.weight_sum = weight_sum;
  c.entropy = g_H;
  c.entropy_h = g_H != acc_t(0) ? g_H * H : acc_t(0);
  c.p_scale = c.nll + c.smooth * weight_sum + c.lse_term - c.entropy_h;
  return c;
}

// p_k, on a scalar or a vector.
template <typename acc_t, typename T>
FL_HOST_DEVICE T softmax_prob(const T& z, const GradCoefs<acc_t>& c) {
  return fl_exp((z - T(c.max)) - T(c.log_s));
}

// Where exp(d) > 0, d > -746 (float64's smallest subnormal is exp(-744.4)): max(d, kLogFloor) keeps those
// d, and makes p * d a plain 0 where p = exp(-inf) = 0 instead of 0 * -inf = NaN (one max, no select).
constexpr double kLogFloor = -1e4;

// (7)'s element term g_H p_k log p_k (0 where p_k = 0).
template <typename T>
FL_HOST_DEVICE T entropy_term(const T& p, const T& log_p, const T& g_H) {
  return g_H * p * fl_max(log_p, T(kLogFloor));
}

// (4) + (5) for elements that are not the target; w is w_k (1 without weights).
template <typename acc_t, typename T>
FL_HOST_DEVICE T grad_element(const T& z, const T& w, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  if (c.entropy != acc_t(0)) {
    const T log_p = (z - T(c.max)) - T(c.log_s);
    const T p = fl_exp(log_p);
    const T value = p * T(c.p_scale) - entropy_term(p, log_p, T(c.entropy)) - T(c.smooth) * w;
    return value * transform_grad<acc_t>(z, o);
  }
  return (softmax_prob<acc_t>(z, c) * T(c.p_scale) - T(c.smooth) * w) * transform_grad<acc_t>(z, o);
}

// (4) + (5) for the target element, always in acc_t.
template <typename acc_t>
FL_HOST_DEVICE acc_t grad_target(acc_t z_y, acc_t w_y, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  const acc_t d = (z_y - c.max) - c.log_s;  // log p_y
  const acc_t p = fl_exp(d);
  acc_t value = c.nll * fl_expm1(d) + c.smooth * (p * c.weight_sum - w_y) + c.lse_term * p;
  if (c.entropy != acc_t(0)) value -= entropy_term(p, d, c.entropy) + c.entropy_h * p;
  return value * transform_grad<acc_t>(z_y, o);
}

// (6) Focal loss. Per live row, with nll = -log p_y = (m - z_y) + log_s (row_loss's value without
// weights, smoothing or z-loss), p = p_y, q = 1 - p, gamma >= 0 and one per-class factor
// a_y = w_y * alpha_y:
//     loss = a_y * q^gamma * nll                      (= a_y * nll, the cross-entropy, at gamma = 0)
// Gradient, with s_j = softmax_j(z) and d log p / d z_j = [j == y] - s_j:
//   (a) d p / d z_j = p ([j == y] - s_j), so d q / d z_j = -p ([j == y] - s_j).
//   (b) d q^gamma / d z_j = gamma q^(gamma - 1) d q / d z_j = -gamma p q^(gamma - 1) ([j == y] - s_j).
//   (c) loss / a_y = -q^gamma log p, so by the product rule
//         d (loss / a_y) / d z_j = -(d q^gamma / d z_j) log p - q^gamma ([j == y] - s_j)
//                                = (s_j - [j == y]) (q^gamma - gamma p q^(gamma - 1) log p).
//       The gradient is the cross-entropy gradient s - onehot(y) times one per-row coefficient
//         c = q^gamma - gamma p q^(gamma - 1) log p = q^gamma (1 + gamma p nll / q)   (c >= q^gamma >= 0),
//       so the backward is (4) with grad_loss scaled per row by coef = a_y c (and no weights).
//   (d) q^(gamma - 1) is singular at q = 0 when gamma < 1, but nll / q -> 1 as q -> 0
//       (nll = -log(1 - q) = q + q^2 / 2 + ...): the second form of c is finite everywhere, and
//       c -> 0 as p -> 1 for gamma > 0 (c = 1 at gamma = 0). q = -expm1(-nll) keeps q's relative
//       accuracy when p is close to 1 (1 - p would cancel), and nll / q is taken as 1 where q is 0.
//   (e) A row whose p is 0 (nll = inf: a -inf target logit) has c = q^gamma = 1: p nll / q is taken
//       as 0 there, the limit of p log p, rather than 0 * inf.
// q^gamma is 1 at gamma = 0 whatever q (pow(0, 0) = 1 is not relied on).
template <typename acc_t>
struct FocalRow {
  acc_t loss;  // a_y q^gamma nll
  acc_t coef;  // a_y c: d loss / d z = coef * (softmax(z) - onehot(y))
};

template <typename acc_t>
FL_HOST_DEVICE FocalRow<acc_t> focal_row(acc_t nll, acc_t a_y, acc_t gamma) {
  const acc_t q = -fl_expm1(-nll);
  const acc_t p = fl_exp(-nll);
  const acc_t q_gamma = gamma == acc_t(0) ? acc_t(1) : fl_pow(q, gamma);
  const acc_t nll_over_q = q > acc_t(0) ? nll / q : acc_t(1);
  const acc_t p_term = p > acc_t(0) ? gamma * p * nll_over_q : acc_t(0);
  FocalRow<acc_t> r;
  r.loss = a_y * (q_gamma * nll);
  r.coef = a_y * (q_gamma * (acc_t(1) + p_term));
  return r;
}

}  // namespace ce
}  // namespace fusedloss
