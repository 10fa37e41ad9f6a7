"""Triton kernels of the cross-entropy with probability targets
(fusedloss::soft_cross_entropy_{fwd,bwd}_triton).

The per-row math follows csrc/include/fusedloss/soft_cross_entropy_math.h step by step, with its names:
  (1) z = transform(x) = softcap * tanh(x / softcap) / T   (softcap off: z = x / T), the class-index
      kernels' _transform_logit
  (2) t' = (1 - eps) t + eps / C, v = w t';  loss = -sum v log p + lambda lse^2
  (3) online over chunks of the row: m = max z, s = sum exp(z - m), A = sum v, D = sum v (z - m)
      (re-expressed against a new max M as D + A (m - M)); loss = A log_s - D + lambda lse^2
  (4) d / d z_k = p_k (g A + lse_term) - g v_k, lse_term = g 2 lambda lse + g_lse, times dz/dx
  (5) d / d t_k = -g (1 - eps) w_k log p_k, stored only when TARGET_GRAD
  (6) ENTROPY: H = log_s - sum_ed / s, sum_ed = sum exp(z - m) (z - m) online (the class-index kernels'
      _entropy_sum); its gradient g_H adds -g_H H to (4)'s p_scale and -g_H p_k log p_k per element
      (the class-index _entropy_term)
The forward returns loss (N,), lse (N,), stats (N, 3) = (m, log_s, A) ((N, 4) with H last when ENTROPY)
and the entropy (N,) (or (0,)); the backward reads stats.

One program per row for the forward, one per (row, chunk of BLOCK_SIZE classes) for the elementwise
backward. Accumulation in float32 (float64 for float64 logits): the element type of the forward's loss
pointer and of the backward's stats pointer. The target is read in its own dtype (the logits' or the
accumulation dtype) and its gradient stored in it. No host syncs, no atomics (deterministic). The ops
are registered in fusedloss/ops/soft_cross_entropy.py; launches go through torch.library.wrap_triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton._common import acc_dtype as _acc_dtype
from fusedloss.triton._common import cast_rtne
from fusedloss.triton._common import launch_config as _launch_config
# jit helpers keep their own names (torch.compile copies a kernel's helpers under their __name__)
from fusedloss.triton._common import param  # noqa: F401  (called by _options)
from fusedloss.triton._common import split_float as _split_float
from fusedloss.triton.cross_entropy import _tanh  # noqa: F401  (called by _transform_logit)
from fusedloss.triton.cross_entropy import _entropy_sum, _entropy_term, _options, _transform_grad, _transform_logit

__all__ = ["soft_cross_entropy_fwd", "soft_cross_entropy_bwd"]

_FWD_MAX_BLOCK = 4096
_FWD_MAX_WARPS = 8
_BWD_MAX_BLOCK = 4096
_BWD_MAX_WARPS = 8


@triton.jit
def _soft_options(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
                  inv_temperature_lo, num_classes, ACC: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # cross_entropy's options, with the smoothing as keep = 1 - eps and uniform = eps / C of (2)
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    return (1.0 - eps, eps / tl.cast(num_classes, ACC), z_loss, inv_temperature, inv_softcap, softcap_scale,
            inv_softcap_scale)


@triton.jit
def _target_weight(t_ptr, w_ptr, cols, mask, keep, uniform, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    # (2): v = w t' of a chunk; 0 past the row's end.
    t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(ACC)
    v = t * keep + uniform
    if HAS_WEIGHT:
        v = v * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, v, 0.0)


@triton.jit
def _soft_cross_entropy_fwd_kernel(x_ptr, x_stride, t_ptr, t_stride, w_ptr, loss_ptr, lse_ptr, stats_ptr, ent_ptr,
                                   num_classes, smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi,
                                   softcap_lo, inv_temperature_hi, inv_temperature_lo, HAS_WEIGHT: tl.constexpr,
                                   HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    STATS: tl.constexpr = 4 if ENTROPY else 3
    row = tl.program_id(0).to(tl.int64)
    keep, uniform, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _soft_options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, num_classes, ACC, HAS_SOFTCAP)
    x_row = x_ptr + row * x_stride
    t_row = t_ptr + row * t_stride
    neg_inf = float("-inf")
    m = tl.full([], neg_inf, ACC)
    s = tl.zeros([], ACC)
    sum_wd = tl.zeros([], ACC)  # D
    sum_w = tl.zeros([], ACC)  # A
    sum_ed = tl.zeros([], ACC)  # (6)
    offsets = tl.arange(0, BLOCK_SIZE)
    # (3)
    for start in range(0, num_classes, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < num_classes
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
        z_masked = tl.where(mask, z, neg_inf)
        m_new = tl.maximum(m, tl.max(z_masked, axis=0))
        # While every z so far is -inf, differences are taken against 0: no exp(-inf - -inf) = NaN, and
        # D keeps the -inf (v > 0) or NaN (v = 0) of those logits, as ce::update_stats does.
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        if ENTROPY:
            sum_ed = _entropy_sum(sum_ed, s, m, m_safe, z_masked)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z_masked - m_safe), axis=0)
        v = _target_weight(t_row, w_ptr, cols, mask, keep, uniform, ACC, HAS_WEIGHT)
        m_old = tl.where(m == neg_inf, m_safe, m)
        sum_wd += sum_w * (m_old - m_safe)
        sum_wd += tl.sum(tl.where(mask, v * (z - m_safe), 0.0), axis=0)
        sum_w += tl.sum(v, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    loss = sum_w * log_s - sum_wd
    loss = tl.where(z_loss > 0.0, loss + z_loss * lse * lse, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(stats_ptr + STATS * row, m)
    tl.store(stats_ptr + STATS * row + 1, log_s)
    tl.store(stats_ptr + STATS * row + 2, sum_w)
    if ENTROPY:
        entropy = log_s - sum_ed / s
        tl.store(stats_ptr + STATS * row + 3, entropy)
        tl.store(ent_ptr + row, entropy)


@triton.jit
def _soft_cross_entropy_bwd_kernel(g_ptr, g_stride, gl_ptr, gl_stride, gh_ptr, gh_stride, x_ptr, x_stride, t_ptr,
                                   t_stride, w_ptr, stats_ptr, stats_stride, gx_ptr, gt_ptr, num_classes, smoothing_hi,
                                   smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
                                   inv_temperature_lo, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                                   HAS_GRAD_LSE: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                                   TARGET_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1) * BLOCK_SIZE
    keep, uniform, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _soft_options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, num_classes, ACC, HAS_SOFTCAP)
    g = tl.load(g_ptr + row * g_stride).to(ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(gl_ptr + row * gl_stride).to(ACC)
    else:
        g_lse = tl.zeros([], ACC)
    stats_row = stats_ptr + row * stats_stride
    m = tl.load(stats_row)
    log_s = tl.load(stats_row + 1)
    mass = tl.load(stats_row + 2)
    # (4): the row's coefficients (grad_coefs)
    lse_term = tl.where(z_loss > 0.0, g * 2.0 * z_loss * (m + log_s) + g_lse, g_lse)
    p_scale = g * mass + lse_term
    if HAS_GRAD_ENTROPY:
        # (6): -g_H H joins p_scale
        g_h = tl.load(gh_ptr + row * gh_stride).to(ACC)
        p_scale -= g_h * tl.load(stats_row + 3)

    cols = chunk_start + tl.arange(0, BLOCK_SIZE)
    mask = cols < num_classes
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(ACC)
    z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    log_p = (z - m) - log_s
    v = _target_weight(t_ptr + row * t_stride, w_ptr, cols, mask, keep, uniform, ACC, HAS_WEIGHT)
    grad = (tl.exp(log_p) * p_scale - g * v) * _transform_grad(z, inv_softcap_scale, inv_temperature, HAS_SOFTCAP)
    if HAS_GRAD_ENTROPY:
        grad += _entropy_term(x, m, log_s, g_h, 0.0, inv_softcap, softcap_scale, inv_softcap_scale, inv_temperature,
                              HAS_SOFTCAP)
    tl.store(gx_ptr + row * num_classes + cols, cast_rtne(grad, gx_ptr.dtype.element_ty), mask=mask)
    if TARGET_GRAD:
        # (5)
        grad_t = -g * keep * log_p
        if HAS_WEIGHT:
            grad_t = grad_t * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        tl.store(gt_ptr + row * num_classes + cols, cast_rtne(grad_t, gt_ptr.dtype.element_ty), mask=mask)


def _check(logits: Tensor, target: Tensor, weight: Tensor | None) -> None:
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(f"logits and target must be (N, C) of one shape, got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    acc = _acc_dtype(logits.dtype)
    if target.dtype not in (logits.dtype, acc):
        raise TypeError(f"target must be {logits.dtype} or {acc} for {logits.dtype} logits, got {target.dtype}")
    if logits.shape[1] > 1 and (logits.stride(1) != 1 or target.stride(1) != 1):
        raise ValueError("logits and target must have unit stride along the class dimension")
    if weight is not None and (weight.shape != (logits.shape[1],) or weight.dtype != acc
                               or not weight.is_contiguous()):
        raise ValueError(f"weight must be a contiguous ({logits.shape[1]},) {acc} tensor")


def _scalars(label_smoothing: float, z_loss: float, softcap: float, temperature: float) -> tuple:
    return (*_split_float(label_smoothing), *_split_float(z_loss), *_split_float(softcap),
            *_split_float(1.0 / temperature))


def soft_cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                           z_loss: float, softcap: float, temperature: float,
                           entropy: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (N,), lse (N,), stats (N, 3) ((N, 4) with the entropy) and the entropy (N,) (with
    ``entropy``, else (0,)) in the accumulation dtype."""
    _check(logits, target, weight)
    n_rows, num_classes = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = torch.empty((n_rows,), dtype=acc, device=logits.device)
    lse = torch.empty((n_rows,), dtype=acc, device=logits.device)
    stats = torch.empty((n_rows, 4 if entropy else 3), dtype=acc, device=logits.device)
    ent = torch.empty((n_rows if entropy else 0,), dtype=acc, device=logits.device)
    if n_rows == 0:
        return loss, lse, stats, ent
    block, num_warps = _launch_config(num_classes, _FWD_MAX_BLOCK, _FWD_MAX_WARPS)
    torch.library.wrap_triton(_soft_cross_entropy_fwd_kernel)[(n_rows,)](
        logits, logits.stride(0), target, target.stride(0), weight if weight is not None else loss, loss, lse,
        stats, ent if entropy else loss, num_classes, *_scalars(label_smoothing, z_loss, softcap, temperature),
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, ENTROPY=bool(entropy), BLOCK_SIZE=block,
        num_warps=num_warps)
    return loss, lse, stats, ent


def soft_cross_entropy_bwd(grad_loss: Tensor, grad_lse: Tensor | None, logits: Tensor, target: Tensor,
                           weight: Tensor | None, stats: Tensor, label_smoothing: float, z_loss: float,
                           softcap: float, temperature: float, target_grad: bool,
                           grad_entropy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The logits' (N, C) gradient and the target's ((0,) unless target_grad), contiguous. grad_entropy
    needs the forward's (N, 4) stats (entropy=True)."""
    _check(logits, target, weight)
    if grad_entropy is not None and stats.shape[1] != 4:
        raise RuntimeError("fusedloss: grad_entropy needs the forward's (N, 4) stats (entropy=True)")
    n_rows, num_classes = logits.shape
    grad_x = torch.empty((n_rows, num_classes), dtype=logits.dtype, device=logits.device)
    grad_t = torch.empty((n_rows, num_classes) if target_grad else (0,), dtype=target.dtype, device=target.device)
    if grad_x.numel() == 0:
        return grad_x, grad_t
    acc = _acc_dtype(logits.dtype)
    if grad_loss.dtype != acc:
        grad_loss = grad_loss.to(acc)
    if grad_lse is not None and grad_lse.dtype != acc:
        grad_lse = grad_lse.to(acc)
    if grad_entropy is not None and grad_entropy.dtype != acc:
        grad_entropy = grad_entropy.to(acc)
    grad_lse_arg = grad_lse if grad_lse is not None else grad_loss
    grad_entropy_arg = grad_entropy if grad_entropy is not None else grad_loss
    block, num_warps = _launch_config(num_classes, _BWD_MAX_BLOCK, _BWD_MAX_WARPS)
    grid = (n_rows, triton.cdiv(num_classes, block))
    torch.library.wrap_triton(_soft_cross_entropy_bwd_kernel)[grid](
        grad_loss, grad_loss.stride(0), grad_lse_arg, grad_lse_arg.stride(0), grad_entropy_arg,
        grad_entropy_arg.stride(0), logits, logits.stride(0), target, target.stride(0),
        weight if weight is not None else stats, stats, stats.stride(0), grad_x, grad_t if target_grad else grad_x,
        num_classes, *_scalars(label_smoothing, z_loss, softcap, temperature), HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=softcap > 0, HAS_GRAD_LSE=grad_lse is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        TARGET_GRAD=bool(target_grad), BLOCK_SIZE=block, num_warps=num_warps)
    return grad_x, grad_t
