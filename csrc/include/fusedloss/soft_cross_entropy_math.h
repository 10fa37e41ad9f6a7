#pragma once
// Per-row math of the softmax cross-entropy with probability targets (cross_entropy with a float
// target of the input's shape; issue #16, item 3), shared by the CPU kernels (scalar and at::vec)
// and the CUDA kernels; fusedloss/triton/soft_cross_entropy.py follows the same steps with the same
// names.
//
// One row: logits x_j and target probabilities t_j, j < C; class weights w_j (1 without weights);
// label smoothing eps; z-loss lambda.
//   (1) z_j = transform(x_j), the class-index kernels' transform (softcap, then 1 / temperature):
//       cross_entropy_math.h (1); log p_j = z_j - lse, lse = log sum_j exp(z_j).
//   (2) torch's loss with probability targets (F.cross_entropy, label_smoothing mixes the target with
//       the uniform distribution before the weights apply):
//         t'_j = (1 - eps) t_j + eps / C,   v_j = w_j t'_j
//         loss = -sum_j v_j log p_j + lambda lse^2
//       Neither t nor t' is assumed to sum to 1 (torch does not renormalize either), and a t_j = 0
//       next to a -inf logit gives 0 * -inf = NaN, as torch's product does.
//   (3) one pass. With the online max m and s = sum_j exp(z_j - m) (log_s = log s, lse = m + log_s),
//         -sum_j v_j log p_j = sum_j v_j ((m - z_j) + log_s) = A log_s - D,
//         A = sum_j v_j,   D = sum_j v_j (z_j - m).
//       These are exactly the class-index kernels' smoothing sums sum_w / sum_wd (cross_entropy_math.h
//       (3)) with the per-element weight v_j in place of w_j, so the row state is ce::RowStats and
//       pieces merge with ce::merge_stats (D re-expressed against a larger max M: D + A (m - M)).
//       Every term stays of the size of the row's spread, not of the logits themselves: A lse - sum v z
//       would cancel for logits of 1e30 (and give NaN at C = 1 with z = inf).
//   (4) gradient. d log p_j / d z_k = [j == k] - p_k, so with upstream g for the loss and g_lse for
//       the returned lse (d lse / d z_k = p_k):
//         d loss / d z_k = -sum_j v_j ([j == k] - p_k) + 2 lambda lse p_k
//                        = p_k A - v_k + 2 lambda lse p_k
//         d / d z_k      = p_k (g A + lse_term) - g v_k,     lse_term = g 2 lambda lse + g_lse
//       then times dz/dx (cross_entropy_math.h (5)). A is the one row constant the backward cannot
//       recompute elementwise: the forward saves it next to (m, log_s).
//       No expm1 regrouping as in the class-index target element: when a one-hot row is predicted with
//       p_k ~ 1, p_k A - v_k cancels to an absolute error of an ulp of A, the same as torch's
//       log_softmax backward (grad - p * sum(grad)) makes.
//   (5) target gradient (torch lets the target require grad): lse does not depend on t, so
//         d loss / d t_k = -(1 - eps) w_k log p_k,     d / d t_k = -g (1 - eps) w_k ((z_k - m) - log_s)
//       Written only when asked: a target without requires_grad costs no extra write.
//   (6) the entropy (return_entropy) of the transformed row's softmax, H = -sum_j p_j log p_j: it does
//       not involve t, so it is the class-index kernels' (cross_entropy_math.h (7)) in the same pass:
//         H = -sum_j p_j ((z_j - m) - log_s) = log_s - sum_ed / s,   sum_ed = sum_j exp(z_j - m) (z_j - m)
//       (sum_j p_j = 1), with sum_ed kept online next to s (ce::update_stats, ce::merge_stats: at a new
//       max M, exp(m - M) (sum_ed + (m - M) s); a -inf z_j adds 0, the limit of p log p) and finished
//       by ce::row_entropy. Its gradient, with d p_j / d z_k = p_j ([j == k] - p_k):
//         d H / d z_k = -sum_j (d p_j / d z_k) (log p_j + 1)
//                     = -p_k (log p_k + 1) + p_k sum_j p_j (log p_j + 1) = -p_k (log p_k + H),
//       so with the upstream g_H of the row's entropy, (4) becomes
//         d / d z_k = p_k (g A + lse_term - g_H H) - g v_k - g_H p_k log p_k
//       (ce::entropy_term gives g_H p_k log p_k, 0 where p_k = 0), then times dz/dx. H is saved next
//       to the stats for the g_H H term. The target's gradient (5) is unchanged: H has none in t.
// Saved per row between forward and backward: stats (3,) = (m, log_s, A); with the entropy
// (4,) = (m, log_s, A, H).

#include "fusedloss/cross_entropy_math.h"

namespace fusedloss {
namespace soft_ce {

template <typename acc_t>
struct Options {
  ce::Options<acc_t> ce;  // transform (softcap, 1 / T) and num_classes; smoothing and z_loss as below
  acc_t keep;             // 1 - eps: the share of t in t'
  acc_t uniform;          // eps / C
  acc_t z_loss;           // lambda
};

template <typename acc_t>
inline Options<acc_t> make_options(int64_t C, double label_smoothing, double z_loss, double softcap,
                                   double temperature) {
  Options<acc_t> o;
  // ignore_index is refused with probability targets (as in torch): no row is ignored.
  o.ce = ce::Options<acc_t>{C,
                            int64_t(0),
                            static_cast<acc_t>(label_smoothing),
                            static_cast<acc_t>(z_loss),
                            static_cast<acc_t>(softcap),
                            static_cast<acc_t>(1.0 / temperature)};
  o.keep = static_cast<acc_t>(1.0 - label_smoothing);
  o.uniform = static_cast<acc_t>(label_smoothing / static_cast<double>(C > 0 ? C : 1));
  o.z_loss = static_cast<acc_t>(z_loss);
  return o;
}

// (2): v = w t' for one element (scalar or at::vec vector); t in the accumulation dtype. Without
// smoothing keep = 1 and uniform = 0, and v = w t exactly (t * 1 + 0 rounds to t).
template <typename acc_t, typename T>
FL_HOST_DEVICE T target_weight(const T& t, const T& w, const Options<acc_t>& o) {
  return w * (t * T(o.keep) + T(o.uniform));
}

// (3), with (6)'s sum_ed when entropy: one element into the running stats (a GPU thread's inner
// step); the CPU kernel forms chunk stats with vector loops and merges them with ce::merge_stats.
template <typename acc_t>
FL_HOST_DEVICE void update_stats(ce::RowStats<acc_t>& r, acc_t z, acc_t v, bool entropy = false) {
  ce::update_stats(r, z, v, /*smoothing=*/true, entropy);
}

// (2) + (3): the row's loss and lse from its merged stats; log_s is saved for the backward.
template <typename acc_t>
FL_HOST_DEVICE void row_loss(const ce::RowStats<acc_t>& r, const Options<acc_t>& o, acc_t* loss, acc_t* lse,
                             acc_t* log_s) {
  const acc_t ls = fl_log(r.sumexp);
  const acc_t l = r.max + ls;
  acc_t value = r.sum_w * ls - r.sum_wd;  // A log_s - D
  if (o.z_loss > acc_t(0)) value += o.z_loss * l * l;
  *loss = value;
  *lse = l;
  *log_s = ls;
}

// The row's outputs from its merged stats: loss, lse and stats (m, log_s, A), and with entropy (not
// nullptr; sum_ed accumulated) (6)'s H into *entropy and stats[3].
template <typename acc_t>
FL_HOST_DEVICE void finish_row(const ce::RowStats<acc_t>& r, const Options<acc_t>& o, acc_t* loss, acc_t* lse,
                               acc_t* stats, acc_t* entropy) {
  row_loss(r, o, loss, lse, stats + 1);
  stats[0] = r.max;
  stats[2] = r.sum_w;
  if (entropy != nullptr) {
    stats[3] = ce::row_entropy(r, stats[1]);
    *entropy = stats[3];
  }
}

// (4), (5): the per-row constants of the backward.
template <typename acc_t>
struct GradCoefs {
  acc_t max;
  acc_t log_s;
  acc_t p_scale;  // g A + lse_term
  acc_t g;        // the upstream gradient of the row's loss
  acc_t g_target; // -g (1 - eps): the target gradient's factor of w_k log p_k
  acc_t entropy;  // g_H of (6); 0 when the entropy gets no gradient (its term is then skipped)
};

// max, log_s, mass (= A) are the forward's saved stats; g_H the gradient of the row's entropy (6) and
// H the entropy (its saved stats[3], read only when g_H != 0).
template <typename acc_t>
FL_HOST_DEVICE GradCoefs<acc_t> grad_coefs(acc_t max, acc_t log_s, acc_t mass, acc_t g, acc_t g_lse,
                                           const Options<acc_t>& o, acc_t g_H = acc_t(0), acc_t H = acc_t(0)) {
  GradCoefs<acc_t> c;
  c.max = max;
  c.log_s = log_s;
  const acc_t lse_term = o.z_loss > acc_t(0) ? g * acc_t(2) * o.z_loss * (max + log_s) + g_lse : g_lse;
  c.p_scale = g * mass + lse_term;
  if (g_H != acc_t(0)) c.p_scale -= g_H * H;
  c.g = g;
  c.g_target = -g * o.keep;
  c.entropy = g_H;
  return c;
}

// log p_k (scalar or vector) of a transformed logit.
template <typename acc_t, typename T>
FL_HOST_DEVICE T log_prob(const T& z, const GradCoefs<acc_t>& c) {
  return (z - T(c.max)) - T(c.log_s);
}

// (4) (and (6) when its g_H is not 0) + chain rule through (1): the logit's gradient. z = transform(x),
// t the target in the accumulation dtype, w the class weight (1 without weights).
template <typename acc_t, typename T>
FL_HOST_DEVICE T grad_logit(const T& z, const T& t, const T& w, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  const T log_p = log_prob<acc_t>(z, c);
  const T p = fl_exp(log_p);
  T value = p * T(c.p_scale) - T(c.g) * target_weight<acc_t>(t, w, o);
  if (c.entropy != acc_t(0)) value = value - ce::entropy_term(p, log_p, T(c.entropy));
  return value * ce::transform_grad<acc_t>(z, o.ce);
}

// (5): the target's gradient.
template <typename acc_t, typename T>
FL_HOST_DEVICE T grad_target(const T& z, const T& w, const GradCoefs<acc_t>& c) {
  return T(c.g_target) * w * log_prob<acc_t>(z, c);
}

constexpr int kStats = 3;
constexpr int kStatsEntropy = 4;  // (6): H after (m, log_s, A)

}  // namespace soft_ce
}  // namespace fusedloss
