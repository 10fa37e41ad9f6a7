#pragma once
// SigLIP's per-pair math (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"), shared by
// the CPU and CUDA kernels of fusedloss::siglip_{fwd,bwd}; fusedloss/triton/siglip.py mirrors it.
//
// With T = Q K^T (N x M, unscaled dot products), a scale t and a bias b (the learnable temperature and
// bias of SigLIP), the logits are z_ij = t T_ij + b and the label y_ij = +1 on each query's positive
// (j == l_i, l_i = labels_i or i) and -1 elsewhere. The kernels return the per-query losses
//   loss_i = sum_j softplus(-y_ij z_ij) = -sum_j log sigmoid(y_ij z_ij)                              (0)
// and the reduction is composed by autograd in Python, so the backward is the gradient of
// L = sum_i g_i loss_i:
//   dL/dz_ij = g_i d softplus(-y z)/dz = -g_i y_ij sigmoid(-y_ij z_ij) =: G_ij                        (1)
//            (a negative: +g_i sigmoid(z_ij); the positive: -g_i sigmoid(-z_ij))
//   dL/dQ_i  = t sum_j G_ij K_j,   dL/dK_j = t sum_i G_ij Q_i                                          (2)
//   dL/dt    = sum_ij G_ij T_ij,   dL/db   = sum_ij G_ij                                               (3)
// Unlike InfoNCE no term couples the pairs of a row (no log-sum-exp), so every pair is computed on its
// own and a row's loss is a plain sum: float32 per tile row, float64 across tiles (a row of M = 65536
// terms in float32 would lose ~log2(M) bits). (3) is accumulated per query row the same way, times g_i
// in float64, then summed over rows in a fixed order: deterministic and independent of the tiling.
//
// Numerics: softplus(x) = max(x, 0) + log1p(exp(-|x|)) never overflows and keeps the small terms that
// dominate a well-trained row (z_ij ~ -20 for negatives gives softplus ~ 2e-9 each: log(1 + e) would
// round them to 0, log1p keeps them). sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) otherwise,
// e = exp(-|x|): no exp of a large positive number.
#include "fusedloss/common.h"

namespace fusedloss {
namespace siglip {

FL_HOST_DEVICE float fl_log1p(float x) { return ::log1pf(x); }
FL_HOST_DEVICE double fl_log1p(double x) { return ::log1p(x); }

// softplus(x) = log(1 + exp(x)), stable for any x; NaN stays NaN, +inf gives +inf, -inf gives 0.
template <typename acc_t>
FL_HOST_DEVICE acc_t softplus(acc_t x) {
  const acc_t e = fl_exp(-(x < acc_t(0) ? -x : x));
  return (x > acc_t(0) ? x : acc_t(0)) + fl_log1p(e);  // a NaN x gives e = NaN
}

// sigmoid(x) = 1 / (1 + exp(-x)), stable for any x.
template <typename acc_t>
FL_HOST_DEVICE acc_t sigmoid(acc_t x) {
  const acc_t e = fl_exp(-(x < acc_t(0) ? -x : x));
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  return x >= acc_t(0) ? r : e * r;  // a NaN x gives e = NaN
}

// The logit of one pair: z = t T + b (the forward and the backward form it the same way, so that the
// backward's sigmoid sees the forward's z bit for bit).
template <typename acc_t>
FL_HOST_DEVICE acc_t logit(acc_t dot, acc_t scale, acc_t bias) {
  return fl_mul_rn(scale, dot) + bias;
}

// (0): one pair's term of loss_i, softplus(-y z).
template <typename acc_t>
FL_HOST_DEVICE acc_t pair_loss(acc_t z, bool positive) {
  return softplus(positive ? -z : z);
}

// (1) without g_i: d softplus(-y z) / dz = -y sigmoid(-y z).
template <typename acc_t>
FL_HOST_DEVICE acc_t pair_grad(acc_t z, bool positive) {
  return positive ? -sigmoid(-z) : sigmoid(z);
}

}  // namespace siglip
}  // namespace fusedloss
