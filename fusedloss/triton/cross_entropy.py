"""Triton kernels of the fused softmax cross-entropy (fusedloss::cross_entropy_{fwd,bwd}_triton).

The per-row math follows csrc/include/fusedloss/cross_entropy_math.h step by step, with its names:
  (1) z = transform(x) = softcap * tanh(x / softcap) / T        (softcap off: z = x / T)
  (2) m = max z and s = sum exp(z - m), online over the row; log_s = log s, lse = m + log_s
  (3) loss = (1 - eps) w_y ((m - z_y) + log_s)
           + (eps / C) (sum_w log_s - sum_wd)                     sum_wd = sum w (z - m), sum_w = W
           + lambda lse^2
  (4) d / d z_k = p_k p_scale - smooth w_k                            (k != y)
      d / d z_y = nll expm1(log p_y) + smooth (p_y W - w_y) + lse_term p_y
      with p_k = exp((z_k - m) - log_s), nll = g (1 - eps) w_y, smooth = g eps / C,
      lse_term = g 2 lambda lse + g_lse, p_scale = nll + smooth W + lse_term
  (5) times dz/dx = transform_grad(z) = (1 - tanh^2(x / softcap)) / T, from z itself

  (6) focal loss: loss = a_y q^gamma nll, coef = a_y q^gamma (1 + gamma p_y nll / q), with
      nll = (m - z_y) + log_s, q = 1 - p_y = -expm1(-nll)            (_focal_row)
  (7) extras: logprob = (z_y - m) - log_s, entropy H = log_s - sum_ed / s with
      sum_ed = sum exp(z - m) (z - m) online; their gradients (g_lp, g_H): nll and p_scale take
      -g_lp, p_scale takes -g_H H, each element -g_H p_k log p_k (0 where p_k = 0)

The forward returns loss (N,), lse (N,) and stats (N, 2) = (m, log_s), or (N, 4) with the extras
(logprob, entropy); the backward reads stats.
The focal loss forward (fusedloss::focal_loss_fwd_triton) is the forward's program finished with
(6); it returns loss, stats and coef, and its gradient is the backward's with grad_loss * coef.
The forward + gradient (fusedloss::cross_entropy_fwd_grad_triton_, the row kernel of chunked linear
cross-entropy) does both in one program per row: the forward's pass, then the backward's pass with
the gradient written over the logits while the row is still in cache.
Accumulation is in float32 (float64 for float64 logits): inside the kernels the accumulation dtype
is the element type of the forward's loss pointer and of the backward's stats pointer.

Only kernels and their launch helpers live here; the ops are registered with
torch.library.triton_op in fusedloss/ops/, and every launch goes through torch.library.wrap_triton
so that torch.compile can trace the enclosing op. No host syncs, no .item().
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch import Tensor

from fusedloss.triton._common import acc_dtype as _acc_dtype
from fusedloss.triton._common import cast_rtne
from fusedloss.triton._common import launch_config as _launch_config
# A jit helper keeps its own name: torch.compile copies the kernel source with its helpers under
# their __name__, so an alias would be an undefined name in the compiled kernel.
from fusedloss.triton._common import param
from fusedloss.triton._common import split_float as _split_float

__all__ = ["cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_fwd_grad_", "focal_loss_fwd"]

# Forward: one program per row loops over the row in chunks of BLOCK_SIZE classes; a large chunk
# means few block reductions per row (a max and a sum per chunk, two more with label smoothing).
_FWD_MAX_BLOCK = 8192
_FWD_MAX_WARPS = 16
# Backward: one program per (row, chunk), a purely elementwise pass.
_BWD_MAX_BLOCK = 4096
_BWD_MAX_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    # tanh from exp only (libdevice is not available under the Triton interpreter). Small |u| uses
    # the Cephes expansions (tanhf's polynomial, tanh's rational), which keep full relative accuracy
    # near 0 where 1 - exp(-2|u|) would cancel; large |u| uses (1 - e) / (1 + e) with
    # e = exp(-2|u|) in (0, 0.29]: no cancellation and no overflow (|u| = inf gives +-1).
    # NaN stays NaN.
    a = tl.abs(u)
    small_range = a < 0.625
    v = tl.where(small_range, u, 0.0)  # the expansion's input (a huge |u| would overflow u * u)
    zz = v * v
    if u.dtype == tl.float64:
        num = (-9.64399179425052238628e-1 * zz - 9.92877231001918586564e1) * zz - 1.61468768441708447952e3
        den = ((zz + 1.12811678491632931402e2) * zz + 2.23548839060100448583e3) * zz + 4.84406305325125486048e3
        small = v + v * zz * (num / den)
    else:
        poly = (((-5.70498872745e-3 * zz + 2.06390887954e-2) * zz - 5.37397155531e-2) * zz
                + 1.33314422036e-1) * zz - 3.33332819422e-1
        small = poly * zz * v + v
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(u < 0, -big, big)
    return tl.where(small_range, small, big)


@triton.jit
def _expm1(d):
    # exp(d) - 1 without cancellation near 0 (no expm1 in triton.language, and libdevice is not
    # available under the interpreter). |d| < 0.5: Taylor series, truncated far below an ulp
    # (degree 8 in float32, 15 in float64); otherwise exp(d) - 1, where |exp(d) - 1| >= 0.39
    # loses at most a factor 1.6 of exp's relative error. -inf gives -1, NaN stays NaN.
    small_range = tl.abs(d) < 0.5
    v = tl.where(small_range, d, 0.0)
    if d.dtype == tl.float64:
        t = 1.0 / 1307674368000.0
        t = t * v + 1.0 / 87178291200.0
        t = t * v + 1.0 / 6227020800.0
        t = t * v + 1.0 / 479001600.0
        t = t * v + 1.0 / 39916800.0
        t = t * v + 1.0 / 3628800.0
        t = t * v + 1.0 / 362880.0
        t = t * v + 1.0 / 40320.0
        t = t * v + 1.0 / 5040.0
        t = t * v + 1.0 / 720.0
        t = t * v + 1.0 / 120.0
        t = t * v + 1.0 / 24.0
        t = t * v + 1.0 / 6.0
        t = t * v + 0.5
    else:
        t = 1.0 / 40320.0
        t = t * v + 1.0 / 5040.0
        t = t * v + 1.0 / 720.0
        t = t * v + 1.0 / 120.0
        t = t * v + 1.0 / 24.0
        t = t * v + 1.0 / 6.0
        t = t * v + 0.5
    small = v + v * (v * t)
    return tl.where(small_range, small, tl.exp(d) - 1.0)


@triton.jit
def _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    # (1): z = softcap * tanh(x / softcap) / T, with softcap_scale = softcap / T; z = x / T without
    # the cap. fma(a, b, 0) is the product rounded on its own: a plain product would be fused by
    # the compiler with the caller's `z - m` into one FMA, so the backward's log p_y of a row's max
    # element would be a rounding residue instead of the forward's exact 0 (seen on an H100: 1e-4
    # relative error in C=1 rows, whose whole gradient is the small z-loss term).
    if HAS_SOFTCAP:
        return tl.fma(_tanh(x * inv_softcap), softcap_scale, 0.0)
    else:
        return tl.fma(x, inv_temperature, 0.0)


@triton.jit
def _transform_grad(z, inv_softcap_scale, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    # (5): dz/dx from z itself: tanh(x / softcap) = z * T / softcap.
    if HAS_SOFTCAP:
        t = z * inv_softcap_scale
        return (1.0 - t * t) * inv_temperature
    else:
        return inv_temperature


@triton.jit
def _options(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
             inv_temperature_lo, ACC: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # The float options in ACC, and the softcap's factors: softcap_scale = softcap / T and its
    # inverse (both unused without the cap).
    eps = param(smoothing_hi, smoothing_lo, ACC)
    z_loss = param(z_loss_hi, z_loss_lo, ACC)
    inv_temperature = param(inv_temperature_hi, inv_temperature_lo, ACC)
    inv_softcap = inv_temperature
    softcap_scale = inv_temperature
    inv_softcap_scale = inv_temperature
    if HAS_SOFTCAP:
        softcap = param(softcap_hi, softcap_lo, ACC)
        inv_softcap = 1.0 / softcap
        softcap_scale = softcap * inv_temperature
        inv_softcap_scale = 1.0 / softcap_scale
    return eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale


@triton.jit
def _entropy_sum(sum_ed, s, m, m_safe, z_masked):
    # (7): sum_ed after one more chunk (z_masked, -inf past the row's end) whose new running max is
    # m_safe (0 while every z so far is -inf). What was summed so far, relative to the new max:
    # exp(m - M) (sum_ed + (m - M) s); nothing while every z so far is -inf. A -inf z adds 0 (e = 0),
    # not 0 * -inf. s is the sum of exponentials before this chunk.
    rescale = tl.exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    sum_ed = tl.where(m == float("-inf"), 0.0, rescale * (sum_ed + shift * s))
    d = z_masked - m_safe
    e = tl.exp(d)
    return sum_ed + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)


@triton.jit
def _row_stats(logits_row, weight_ptr, num_classes, row_end, inv_softcap, softcap_scale, inv_temperature,
               ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    # (2): the row's running stats over columns [0, row_end), chunk by chunk: m = max z,
    # s = sum exp(z - m) and, with label smoothing only, sum_wd = sum w (z - m) and sum_w = sum w;
    # with the entropy only, (7)'s sum_ed = sum exp(z - m) (z - m).
    # row_end = 0 (ignored rows, bad targets) reads nothing.
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    sum_wd = tl.zeros([], ACC)
    sum_w = tl.zeros([], ACC)
    sum_ed = tl.zeros([], ACC)
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, row_end, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < num_classes
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(ACC)
        z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
        z_masked = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_masked, axis=0))
        # While every z so far is -inf, exp() and the differences are taken against 0 instead: no
        # exp(-inf - -inf) = NaN (a -inf z adds nothing to s).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HAS_ENTROPY:
            sum_ed = _entropy_sum(sum_ed, s, m, m_safe, z_masked)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z_masked - m_safe), axis=0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                sum_w_chunk = tl.sum(w, axis=0)
            else:
                w = 1.0
                sum_w_chunk = tl.cast(tl.minimum(num_classes - start, BLOCK_SIZE), ACC)
            # shift_wd: what was summed so far, re-expressed relative to the new max. With m = -inf
            # so far, sum_wd already holds the -inf (w > 0) or NaN (w == 0) of those logits.
            m_old = tl.where(m == float("-inf"), m_safe, m)
            sum_wd += sum_w * (m_old - m_safe)
            sum_wd += tl.sum(w * tl.where(mask, z - m_safe, 0.0), axis=0)
            sum_w += sum_w_chunk
        m = m_new
    return m, s, sum_wd, sum_w, sum_ed


@triton.jit
def _row_loss(m, s, sum_wd, sum_w, z_y, w_y, eps, z_loss, num_classes, active, ACC: tl.constexpr,
              HAS_SMOOTHING: tl.constexpr):
    # (2) + (3): loss, lse, m and log_s of the row. Rows that read nothing (ignored, bad target) take
    # m = 0, s = 1 here so that they compute no log(0) or inf - inf on the way to the zeros / NaNs
    # the caller stores.
    m = tl.where(active, m, 0.0)
    s = tl.where(active, s, 1.0)
    log_s = tl.log(s)
    lse = m + log_s
    loss = (1.0 - eps) * w_y * ((m - z_y) + log_s)
    if HAS_SMOOTHING:
        loss += eps / tl.cast(num_classes, ACC) * (sum_w * log_s - sum_wd)
    loss = tl.where(z_loss > 0.0, loss + z_loss * lse * lse, loss)
    return loss, lse, m, log_s


@triton.jit
def _grad_coefs(g, g_lse, m, log_s, w_y, weight_sum, eps, z_loss, num_classes, ACC: tl.constexpr):
    # (4): the row's gradient coefficients (GradCoefs): nll, smooth, lse_term, p_scale.
    nll = g * (1.0 - eps) * w_y
    smooth = g * eps / tl.cast(num_classes, ACC)
    lse_term = tl.where(z_loss > 0.0, g * 2.0 * z_loss * (m + log_s) + g_lse, g_lse)
    p_scale = nll + smooth * weight_sum + lse_term
    return nll, smooth, lse_term, p_scale


@triton.jit
def _extras_coefs(nll, p_scale, g_lp, g_h, entropy):
    # (7): the logprob's gradient joins the NLL term with weight -1; the entropy's adds -g_H H to p_scale.
    return nll - g_lp, p_scale - g_lp - g_h * entropy


@triton.jit
def _entropy_term(x, m, log_s, g_h, g_h_entropy, inv_softcap, softcap_scale, inv_softcap_scale, inv_temperature,
                  HAS_SOFTCAP: tl.constexpr):
    # (7) + (5): the entropy's element term -(g_H p_k log p_k + g_h_entropy p_k) dz/dx (0 where p_k = 0);
    # g_h_entropy = g_H H for the target, whose regrouped form has no p_scale, 0 for the others.
    z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    log_p = (z - m) - log_s
    p = tl.exp(log_p)
    term = tl.where(p > 0.0, g_h * p * log_p, 0.0) + g_h_entropy * p
    return -term * _transform_grad(z, inv_softcap_scale, inv_temperature, HAS_SOFTCAP)


@triton.jit
def _grad_elements(x, weight_ptr, cols, mask, m, log_s, p_scale, smooth, inv_softcap, softcap_scale,
                   inv_softcap_scale, inv_temperature, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # (1), (4), (5) for elements that are not the target: p_k = exp((z_k - m) - log_s).
    z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    grad = tl.exp((z - m) - log_s) * p_scale
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
            grad -= smooth * w
        else:
            grad -= smooth
    return grad * _transform_grad(z, inv_softcap_scale, inv_temperature, HAS_SOFTCAP)


@triton.jit
def _grad_target(z_y, w_y, m, log_s, nll, smooth, lse_term, weight_sum, inv_softcap_scale, inv_temperature,
                 HAS_SOFTCAP: tl.constexpr):
    # (4) + (5) for the target element, in the accumulation dtype: p_y - 1 from expm1, so that p_y
    # close to 1 does not cancel.
    d = (z_y - m) - log_s  # log p_y
    p_y = tl.exp(d)
    grad_y = nll * _expm1(d) + smooth * (p_y * weight_sum - w_y) + lse_term * p_y
    return grad_y * _transform_grad(z_y, inv_softcap_scale, inv_temperature, HAS_SOFTCAP)


@triton.jit
def _row_target(target_ptr, row, num_classes, ignore_index):
    # y, and whether the row is ignored / has an in-range target / is live; y_safe never indexes
    # out of bounds.
    y = tl.load(target_ptr + row)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < num_classes)
    active = in_range & (y != ignore_index)
    y_safe = tl.where(active, y, 0)
    return y, ignored, in_range, active, y_safe


@triton.jit
def _dead_row_fill(value, ignored, in_range):
    # Ignored rows: zeros. A target outside [0, C) that is not ignore_index: NaNs.
    return tl.where(ignored, 0.0, tl.where(in_range, value, float("nan")))


# ----------------------------------------------------------------------------------------------
# Forward: (1) + (2) + (3), one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    stats_ptr,
    num_classes,
    ignore_index,
    smoothing_hi,
    smoothing_lo,
    z_loss_hi,
    z_loss_lo,
    softcap_hi,
    softcap_lo,
    inv_temperature_hi,
    inv_temperature_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    EXTRAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    STATS: tl.constexpr = 4 if EXTRAS else 2
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    y, ignored, in_range, active, y_safe = _row_target(target_ptr, row, num_classes, ignore_index)

    # z_y and w_y of the target class.
    x_y = tl.load(logits_row + y_safe, mask=active, other=0.0).to(ACC)
    z_y = _transform_logit(x_y, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)

    m, s, sum_wd, sum_w, sum_ed = _row_stats(logits_row, weight_ptr, num_classes, tl.where(active, num_classes, 0),
                                             inv_softcap, softcap_scale, inv_temperature, ACC, HAS_WEIGHT,
                                             HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_SIZE, EXTRAS)
    loss, lse, m, log_s = _row_loss(m, s, sum_wd, sum_w, z_y, w_y, eps, z_loss, num_classes, active, ACC,
                                    HAS_SMOOTHING)
    tl.store(loss_ptr + row, _dead_row_fill(loss, ignored, in_range))
    tl.store(lse_ptr + row, _dead_row_fill(lse, ignored, in_range))
    tl.store(stats_ptr + STATS * row, _dead_row_fill(m, ignored, in_range))
    tl.store(stats_ptr + STATS * row + 1, _dead_row_fill(log_s, ignored, in_range))
    if EXTRAS:
        logprob = (z_y - m) - log_s
        entropy = log_s - sum_ed / tl.where(active, s, 1.0)
        tl.store(stats_ptr + STATS * row + 2, _dead_row_fill(logprob, ignored, in_range))
        tl.store(stats_ptr + STATS * row + 3, _dead_row_fill(entropy, ignored, in_range))


@triton.jit
def _focal_row(nll, a_y, gamma):
    # (6): focal_row of cross_entropy_math.h, where the derivation is. loss = a_y q^gamma nll and
    # coef = a_y q^gamma (1 + gamma p nll / q), q = 1 - p = -expm1(-nll). q^gamma is
    # exp(gamma log q) (triton.language has no pow that the interpreter runs), taken only where
    # q > 0: q = 0 gives 0 (q * 0 keeps a NaN q NaN), and gamma = 0 gives 1 whatever q. Its relative
    # error is about |gamma log q| ulps, under 100 ulps wherever q^gamma is a normal float32.
    q = -_expm1(-nll)
    p = tl.exp(-nll)
    q_pos = q > 0.0
    q_gamma = tl.where(q_pos, tl.exp(gamma * tl.log(tl.where(q_pos, q, 1.0))), q * 0.0)
    q_gamma = tl.where(gamma == 0.0, 1.0, q_gamma)
    nll_over_q = tl.where(q > 0.0, nll / tl.where(q > 0.0, q, 1.0), 1.0)
    p_term = gamma * p * tl.where(p > 0.0, nll_over_q, 0.0)  # p = 0: 0, not 0 * inf
    loss = a_y * (q_gamma * nll)
    coef = a_y * (q_gamma * (1.0 + p_term))
    return loss, coef


# ----------------------------------------------------------------------------------------------
# Focal loss forward: (2) + (6), one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _focal_loss_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    coef_ptr,
    num_classes,
    ignore_index,
    gamma_hi,
    gamma_lo,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # The forward's program with neither weights in the stats nor smoothing, z-loss, softcap or
    # temperature: _row_loss gives the row's nll, _focal_row finishes it with a_y = weight[y].
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    gamma = param(gamma_hi, gamma_lo, ACC)
    one = tl.full([], 1.0, ACC)
    zero = tl.zeros([], ACC)
    y, ignored, in_range, active, y_safe = _row_target(target_ptr, row, num_classes, ignore_index)

    x_y = tl.load(logits_row + y_safe, mask=active, other=0.0).to(ACC)
    z_y = _transform_logit(x_y, one, one, one, False)
    if HAS_WEIGHT:
        a_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        a_y = one

    m, s, sum_wd, sum_w, _ = _row_stats(logits_row, weight_ptr, num_classes, tl.where(active, num_classes, 0), one,
                                        one, one, ACC, False, False, False, BLOCK_SIZE, False)
    nll, lse, m, log_s = _row_loss(m, s, sum_wd, sum_w, z_y, one, zero, zero, num_classes, active, ACC, False)
    loss, coef = _focal_row(nll, a_y, gamma)
    tl.store(loss_ptr + row, _dead_row_fill(loss, ignored, in_range))
    tl.store(coef_ptr + row, _dead_row_fill(coef, ignored, in_range))
    tl.store(stats_ptr + 2 * row, _dead_row_fill(m, ignored, in_range))
    tl.store(stats_ptr + 2 * row + 1, _dead_row_fill(log_s, ignored, in_range))


# ----------------------------------------------------------------------------------------------
# Backward: (4) + (5), one program per (row, chunk of BLOCK_SIZE classes)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_bwd_kernel(
    grad_loss_ptr,
    grad_loss_stride,
    grad_lse_ptr,
    grad_lse_stride,
    logits_ptr,
    logits_row_stride,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    stats_ptr,
    stats_row_stride,
    stats_col_stride,
    grad_ptr,
    grad_logprob_ptr,
    grad_logprob_stride,
    grad_entropy_ptr,
    grad_entropy_stride,
    num_classes,
    ignore_index,
    smoothing_hi,
    smoothing_lo,
    z_loss_hi,
    z_loss_lo,
    softcap_hi,
    softcap_lo,
    inv_temperature_hi,
    inv_temperature_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1) * BLOCK_SIZE
    logits_row = logits_ptr + row * logits_row_stride
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    y, ignored, in_range, active, y_safe = _row_target(target_ptr, row, num_classes, ignore_index)

    g = tl.load(grad_loss_ptr + row * grad_loss_stride).to(ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(grad_lse_ptr + row * grad_lse_stride).to(ACC)
    else:
        g_lse = tl.zeros([], ACC)
    m = tl.load(stats_ptr + row * stats_row_stride).to(ACC)
    log_s = tl.load(stats_ptr + row * stats_row_stride + stats_col_stride).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)
        weight_sum = tl.cast(num_classes, ACC)
    nll, smooth, lse_term, p_scale = _grad_coefs(g, g_lse, m, log_s, w_y, weight_sum, eps, z_loss, num_classes, ACC)
    g_lp = tl.zeros([], ACC)
    g_h = tl.zeros([], ACC)
    entropy = tl.zeros([], ACC)
    if HAS_GRAD_LOGPROB:
        g_lp = tl.load(grad_logprob_ptr + row * grad_logprob_stride).to(ACC)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row * grad_entropy_stride).to(ACC)
        entropy = tl.load(stats_ptr + row * stats_row_stride + 3 * stats_col_stride).to(ACC)
    if HAS_GRAD_LOGPROB or HAS_GRAD_ENTROPY:
        nll, p_scale = _extras_coefs(nll, p_scale, g_lp, g_h, entropy)

    cols = chunk_start + tl.arange(0, BLOCK_SIZE)
    mask = cols < num_classes
    x = tl.load(logits_row + cols, mask=mask & active, other=0.0).to(ACC)
    grad = _grad_elements(x, weight_ptr, cols, mask & active, m, log_s, p_scale, smooth, inv_softcap,
                          softcap_scale, inv_softcap_scale, inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING,
                          HAS_SOFTCAP)
    if HAS_GRAD_ENTROPY:
        grad += _entropy_term(x, m, log_s, g_h, 0.0, inv_softcap, softcap_scale, inv_softcap_scale,
                              inv_temperature, HAS_SOFTCAP)

    # The target element, by the program whose chunk holds it.
    has_target = active & (y_safe >= chunk_start) & (y_safe < chunk_start + BLOCK_SIZE)
    x_y = tl.load(logits_row + y_safe, mask=has_target, other=0.0).to(ACC)
    z_y = _transform_logit(x_y, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    grad_y = _grad_target(z_y, w_y, m, log_s, nll, smooth, lse_term, weight_sum, inv_softcap_scale,
                          inv_temperature, HAS_SOFTCAP)
    if HAS_GRAD_ENTROPY:
        grad_y += _entropy_term(x_y, m, log_s, g_h, g_h * entropy, inv_softcap, softcap_scale, inv_softcap_scale,
                                inv_temperature, HAS_SOFTCAP)
    grad = tl.where(cols == y, grad_y, grad)

    grad = tl.where(active, grad, _dead_row_fill(grad, ignored, in_range))
    grad_row = grad_ptr + row * num_classes  # the gradient is contiguous
    tl.store(grad_row + cols, cast_rtne(grad, grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Forward + gradient in place: (1) - (5), one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_grad_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    loss_ptr,
    lse_ptr,
    num_classes,
    ignore_index,
    smoothing_hi,
    smoothing_lo,
    z_loss_hi,
    z_loss_lo,
    softcap_hi,
    softcap_lo,
    inv_temperature_hi,
    inv_temperature_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # The forward's program, then the backward's chunks of the same row with grad_loss =
    # grad_scale and grad_lse = 0, stored over the logits (contiguous: row stride C).
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * num_classes
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    y, ignored, in_range, active, y_safe = _row_target(target_ptr, row, num_classes, ignore_index)

    x_y = tl.load(logits_row + y_safe, mask=active, other=0.0).to(ACC)
    z_y = _transform_logit(x_y, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)
    if HAS_GRAD_SCALE:
        g = tl.load(grad_scale_ptr + row * grad_scale_stride).to(ACC)
    else:
        g = tl.full([], 1.0, ACC)

    m, s, sum_wd, sum_w, _ = _row_stats(logits_row, weight_ptr, num_classes, tl.where(active, num_classes, 0),
                                        inv_softcap, softcap_scale, inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING,
                                        HAS_SOFTCAP, BLOCK_SIZE, False)
    loss, lse, m, log_s = _row_loss(m, s, sum_wd, sum_w, z_y, w_y, eps, z_loss, num_classes, active, ACC,
                                    HAS_SMOOTHING)
    tl.store(loss_ptr + row, _dead_row_fill(loss, ignored, in_range))
    tl.store(lse_ptr + row, _dead_row_fill(lse, ignored, in_range))

    # W = sum_j w_j enters only through smooth * W: with label smoothing the stats hold it (sum_w),
    # without it smooth = 0 and W may be anything finite.
    if HAS_SMOOTHING:
        weight_sum = sum_w
    else:
        weight_sum = tl.cast(num_classes, ACC)
    nll, smooth, lse_term, p_scale = _grad_coefs(g, 0.0, m, log_s, w_y, weight_sum, eps, z_loss, num_classes, ACC)
    grad_y = _grad_target(z_y, w_y, m, log_s, nll, smooth, lse_term, weight_sum, inv_softcap_scale,
                          inv_temperature, HAS_SOFTCAP)

    # Every thread of the program has read the whole row (the stats) and x_y before any thread
    # overwrites a column: the stats' block reductions order them on a GPU already, the barrier
    # makes it explicit (one per row).
    tl.debug_barrier()
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, num_classes, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < num_classes
        x = tl.load(logits_row + cols, mask=mask & active, other=0.0).to(ACC)
        grad = _grad_elements(x, weight_ptr, cols, mask & active, m, log_s, p_scale, smooth, inv_softcap,
                              softcap_scale, inv_softcap_scale, inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING,
                              HAS_SOFTCAP)
        grad = tl.where(cols == y, grad_y, grad)
        grad = tl.where(active, grad, _dead_row_fill(grad, ignored, in_range))
        tl.store(logits_row + cols, cast_rtne(grad, logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _scalar_args(label_smoothing: float, z_loss: float, softcap: float, temperature: float) -> list[float]:
    args: list[float] = []
    for v in (label_smoothing, z_loss, softcap, 1.0 / temperature):
        args.extend(_split_float(v))
    return args


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    extras: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss (N,), lse (N,) and stats (N, 2) = (m, log_s), in the accumulation dtype; with
    ``extras`` stats is (N, 4) = (m, log_s, logprob, entropy).

    Ignored rows give zeros; a target outside [0, C) that is not ignore_index gives NaNs.
    """
    n_rows, num_classes = logits.shape
    acc_dtype = _acc_dtype(logits.dtype)
    loss = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    lse = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    stats = torch.empty((n_rows, 4 if extras else 2), dtype=acc_dtype, device=logits.device)
    if n_rows == 0:
        return loss, lse, stats

    has_weight = weight is not None
    weight_arg = weight if has_weight else target  # a read-only stand-in, never read
    block, num_warps = _launch_config(num_classes, _FWD_MAX_BLOCK, _FWD_MAX_WARPS)

    torch.library.wrap_triton(_cross_entropy_fwd_kernel)[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        weight_arg,
        loss,
        lse,
        stats,
        num_classes,
        ignore_index,
        *_scalar_args(label_smoothing, z_loss, softcap, temperature),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap > 0.0,
        EXTRAS=extras,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return loss, lse, stats


def cross_entropy_bwd(
    grad_loss: Tensor,
    grad_lse: Tensor | None,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    grad_logprob: Tensor | None = None,
    grad_entropy: Tensor | None = None,
) -> Tensor:
    """The (N, C) gradient of the logits, contiguous, in the logits' dtype (grad_entropy needs the
    (N, 4) stats)."""
    if grad_entropy is not None and stats.shape[1] != 4:
        raise RuntimeError("fusedloss: the entropy's gradient needs the forward's (N, 4) stats (extras=True)")
    n_rows, num_classes = logits.shape
    grad = torch.empty((n_rows, num_classes), dtype=logits.dtype, device=logits.device)
    if grad.numel() == 0:
        return grad

    has_weight = weight is not None
    has_grad_lse = grad_lse is not None
    # W = sum_j w_j on device, no sync (C without weights, in the kernel). Absent tensors get
    # read-only stand-ins that are never read.
    weight_sum = weight.sum() if has_weight else target
    weight_arg = weight if has_weight else target
    grad_lse_arg = grad_lse if has_grad_lse else grad_loss
    grad_logprob_arg = grad_logprob if grad_logprob is not None else grad_loss
    grad_entropy_arg = grad_entropy if grad_entropy is not None else grad_loss
    block, num_warps = _launch_config(num_classes, _BWD_MAX_BLOCK, _BWD_MAX_WARPS)
    grid = (n_rows, triton.cdiv(num_classes, block))

    torch.library.wrap_triton(_cross_entropy_bwd_kernel)[grid](
        grad_loss,
        grad_loss.stride(0),
        grad_lse_arg,
        grad_lse_arg.stride(0),
        logits,
        logits.stride(0),
        target,
        weight_arg,
        weight_sum,
        stats,
        stats.stride(0),
        stats.stride(1),
        grad,
        grad_logprob_arg,
        grad_logprob_arg.stride(0),
        grad_entropy_arg,
        grad_entropy_arg.stride(0),
        num_classes,
        ignore_index,
        *_scalar_args(label_smoothing, z_loss, softcap, temperature),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_GRAD_LSE=has_grad_lse,
        HAS_GRAD_LOGPROB=grad_logprob is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return grad


def cross_entropy_fwd_grad_(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Per-row loss (N,) and lse (N,) in the accumulation dtype; logits (N, C), contiguous, are
    overwritten with grad_scale_i * d loss_i / d logits_i (grad_scale None means 1).

    Ignored rows give zeros (loss, lse and gradient); a target outside [0, C) that is not
    ignore_index gives NaNs.
    """
    if logits.dim() != 2 or not logits.is_contiguous():
        raise RuntimeError("fusedloss: cross_entropy_fwd_grad_ writes the gradient over logits in place, so logits "
                           f"must be 2-D and contiguous; got sizes {tuple(logits.shape)} and strides "
                           f"{logits.stride()}")
    n_rows, num_classes = logits.shape
    acc_dtype = _acc_dtype(logits.dtype)
    if grad_scale is not None and (grad_scale.shape != (n_rows,) or grad_scale.dtype != acc_dtype):
        raise RuntimeError(f"fusedloss: grad_scale must be ({n_rows},) {acc_dtype}, got "
                           f"{tuple(grad_scale.shape)} {grad_scale.dtype}")
    loss = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    lse = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    if n_rows == 0:
        return loss, lse

    has_weight = weight is not None
    has_grad_scale = grad_scale is not None
    weight_arg = weight if has_weight else target  # read-only stand-ins, never read
    grad_scale_arg = grad_scale if has_grad_scale else loss
    block, num_warps = _launch_config(num_classes, _FWD_MAX_BLOCK, _FWD_MAX_WARPS)

    torch.library.wrap_triton(_cross_entropy_fwd_grad_kernel)[(n_rows,)](
        logits,
        target,
        weight_arg,
        grad_scale_arg,
        grad_scale_arg.stride(0),
        loss,
        lse,
        num_classes,
        ignore_index,
        *_scalar_args(label_smoothing, z_loss, softcap, temperature),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_GRAD_SCALE=has_grad_scale,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return loss, lse


def focal_loss_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Focal loss per row (N,), stats (N, 2) = (m, log_s) and the gradient coefficient coef (N,), in the
    accumulation dtype; ``weight`` is the per-class factor a_y. The gradient is cross_entropy_bwd with
    grad_loss * coef and no weights.

    Ignored rows give zeros; a target outside [0, C) that is not ignore_index gives NaNs.
    """
    n_rows, num_classes = logits.shape
    acc_dtype = _acc_dtype(logits.dtype)
    loss = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    stats = torch.empty((n_rows, 2), dtype=acc_dtype, device=logits.device)
    coef = torch.empty((n_rows,), dtype=acc_dtype, device=logits.device)
    if n_rows == 0:
        return loss, stats, coef

    has_weight = weight is not None
    weight_arg = weight if has_weight else target  # a read-only stand-in, never read
    block, num_warps = _launch_config(num_classes, _FWD_MAX_BLOCK, _FWD_MAX_WARPS)

    torch.library.wrap_triton(_focal_loss_fwd_kernel)[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        weight_arg,
        loss,
        stats,
        coef,
        num_classes,
        ignore_index,
        *_split_float(gamma),
        HAS_WEIGHT=has_weight,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return loss, stats, coef
