#pragma once
// Per-row math of the fused softmax cross-entropy, shared by the CPU kernels (scalar and at::vec)
// and the CUDA kernels. fusedloss/triton/cross_entropy.py follows the same steps with the same names.
//
// Notation for one row of C logits x_j, target class y, class weights w_j (all 1 without weights):
//   (1) z_j   = transform(x_j) = softcap * tanh(x_j / softcap) / T      (softcap off: z_j = x_j / T)
//   (2) lse   = log sum_j exp(z_j), computed online as (m, s) with m = max z_j, s = sum exp(z_j - m),
//               lse = m + log s. Subtracting the max keeps every exp() in (0, 1]: no overflow for
//               logits up to the dtype's max, and no underflow of the sum for very negative rows.
//   (3) loss  = (1 - eps) * w_y * (lse - z_y)                     the (weighted) NLL of the target
//             + (eps / C) * sum_j w_j * (lse - z_j)               label smoothing, as torch defines it
//             + lambda * lse^2                                    PaLM z-loss (not class-weighted)
//       with eps = label_smoothing, lambda = z_loss. The smoothing sum is W * lse - sum_j w_j z_j
//       with W = sum_j w_j, so the forward needs only m, s, sum_j w_j z_j and z_y per row.
//   (4) gradient. With p_k = exp(z_k - lse), d lse / d z_k = p_k, so
//         d loss / d z_k = p_k * (A + 2 lambda lse) - c_k,
//         A   = (1 - eps) w_y + (eps / C) W                        (the weight mass on lse)
//         c_k = (eps / C) w_k + [k == y] (1 - eps) w_y
//       With an upstream gradient g for the loss and g_lse for the returned lse (return_lse=True):
//         d / d z_k = p_k * (g (A + 2 lambda lse) + g_lse) - g c_k.
//   (5) chain rule through (1): dz/dx = (1 - tanh^2(x / softcap)) / T, and tanh(x / softcap) is
//       z * T / softcap, so the backward recomputes z and needs no extra saved tensor.
// Only lse is saved between forward and backward: the backward is one pass that recomputes z_k and
// p_k, reading the logits once and writing the gradient once.
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
    return fl_tanh(x * T(acc_t(1) / o.softcap)) * T(o.softcap * o.inv_temperature);
  }
  return x * T(o.inv_temperature);
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

// (2): running (max, sum of exp(z - max)) of a row or a piece of it.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sumexp;
  acc_t sum_wz;  // sum_j w_j z_j, needed only with label smoothing
};

template <typename acc_t>
FL_HOST_DEVICE RowStats<acc_t> empty_stats() {
  return RowStats<acc_t>{-fl_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// Merges two pieces of one row; the order of merges is fixed by the caller, so results are
// deterministic. A piece whose max is -inf contributes nothing (and must not produce
// exp(-inf - -inf) = NaN).
template <typename acc_t>
FL_HOST_DEVICE RowStats<acc_t> merge_stats(const RowStats<acc_t>& a, const RowStats<acc_t>& b) {
  const acc_t m = fl_max(a.max, b.max);
  RowStats<acc_t> r;
  r.max = m;
  r.sum_wz = a.sum_wz + b.sum_wz;
  if (m == -fl_inf<acc_t>()) {
    r.sumexp = acc_t(0);
  } else {
    const acc_t sa = a.max == -fl_inf<acc_t>() ? acc_t(0) : a.sumexp * fl_exp(a.max - m);
    const acc_t sb = b.max == -fl_inf<acc_t>() ? acc_t(0) : b.sumexp * fl_exp(b.max - m);
    r.sumexp = sa + sb;
  }
  return r;
}

// One element into running stats (the GPU threads' inner step; the CPU kernel does the same on
// whole vectors with a two-pass max-then-sum per cache-sized chunk).
template <typename acc_t>
FL_HOST_DEVICE void update_stats(RowStats<acc_t>& r, acc_t z, acc_t w_z_term) {
  if (z > r.max) {
    r.sumexp = (r.max == -fl_inf<acc_t>() ? acc_t(0) : r.sumexp * fl_exp(r.max - z)) + acc_t(1);
    r.max = z;
  } else if (z != z) {
    r.max = z;  // NaN poisons the row
    r.sumexp = z;
  } else {
    r.sumexp += fl_exp(z - r.max);
  }
  r.sum_wz += w_z_term;
}

template <typename acc_t>
FL_HOST_DEVICE bool is_ignored(int64_t y, const Options<acc_t>& o) {
  return y == o.ignore_index;
}

template <typename acc_t>
FL_HOST_DEVICE bool target_in_range(int64_t y, const Options<acc_t>& o) {
  return y >= 0 && y < o.num_classes;
}

// (2) + (3): the row's loss and lse from its merged stats. z_y is the transformed target logit,
// w_y its class weight, weight_sum W (C without weights).
template <typename acc_t>
FL_HOST_DEVICE void row_loss(const RowStats<acc_t>& r, acc_t z_y, acc_t w_y, acc_t weight_sum,
                             const Options<acc_t>& o, acc_t* loss, acc_t* lse) {
  const acc_t l = r.max + fl_log(r.sumexp);
  acc_t value = (acc_t(1) - o.smoothing) * w_y * (l - z_y);
  if (o.smoothing > acc_t(0)) {
    value += o.smoothing / acc_t(o.num_classes) * (weight_sum * l - r.sum_wz);
  }
  if (o.z_loss > acc_t(0)) {
    value += o.z_loss * l * l;
  }
  *loss = value;
  *lse = l;
}

// (4): the per-row constants of the gradient. The element k gets
//   (exp(z_k - lse) * p_scale - uniform * w_k - [k == y] target) * dz/dx_k.
template <typename acc_t>
struct GradCoefs {
  acc_t lse;
  acc_t p_scale;
  acc_t uniform;
  acc_t target;
};

template <typename acc_t>
FL_HOST_DEVICE GradCoefs<acc_t> grad_coefs(acc_t lse, acc_t w_y, acc_t weight_sum, acc_t g,
                                           acc_t g_lse, const Options<acc_t>& o) {
  const acc_t eps_c = o.smoothing / acc_t(o.num_classes);
  const acc_t a = (acc_t(1) - o.smoothing) * w_y + eps_c * weight_sum;
  GradCoefs<acc_t> c;
  c.lse = lse;
  c.p_scale = g * (a + acc_t(2) * o.z_loss * lse) + g_lse;
  c.uniform = g * eps_c;
  c.target = g * (acc_t(1) - o.smoothing) * w_y;
  return c;
}

// (4) + (5) for one element (or a vector of them) that is not the target; w is w_k (1 without
// weights). The target element is written separately with grad_target(), in acc_t.
template <typename acc_t, typename T>
FL_HOST_DEVICE T grad_element(const T& z, const T& w, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  return (fl_exp(z - T(c.lse)) * T(c.p_scale) - T(c.uniform) * w) * transform_grad<acc_t>(z, o);
}

template <typename acc_t>
FL_HOST_DEVICE acc_t grad_target(acc_t z_y, acc_t w_y, const GradCoefs<acc_t>& c, const Options<acc_t>& o) {
  return (fl_exp(z_y - c.lse) * c.p_scale - c.uniform * w_y - c.target) * transform_grad<acc_t>(z_y, o);
}

}  // namespace ce
}  // namespace fusedloss
