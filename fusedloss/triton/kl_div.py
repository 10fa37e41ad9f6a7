"""Triton kernels of the distillation losses (fusedloss::kl_div_{fwd,bwd}_triton).

The per-row math follows csrc/include/fusedloss/kl_div_math.h step by step, with its names:
  (1) a = s / T, b = t / T;  log q = a - lse_a (student), log p = b - lse_b (teacher); maxima of the raw
      logits, differences formed before the scaling: (s - max_s) / T (scaled_diff)
  (2) loss = scale * K (FORWARD_KL, K = KL(p || q)), scale * K' (REVERSE_KL, K' = KL(q || p)), or
      scale * (beta Kp + (1 - beta) Kq) (JSD, m = beta p + (1 - beta) q, Kp = KL(p || m), Kq = KL(q || m));
      scale = T^2 for kl_div_logits, 1 for jsd_logits; a zero-probability term is 0
  (3) online over chunks of the row: the maxima (max_a, max_b), the sums of exponentials (sum_a,
      sum_b) and, for the KLs, w = sum exp(b - max_b) ((b - max_b) - (a - max_a)) (mirror for
      REVERSE_KL), re-expressed against new maxima as they grow (shift_w);
      K = w / sum_b - log sum_b + log sum_a. The JSD takes a second pass once lse_a, lse_b are known.
  (4) with c = g scale / T:
        FORWARD_KL  grad_s = c (q - p)                          grad_t = c p (log p - log q - K)
        REVERSE_KL  grad_s = c q (log q - log p - K')           grad_t = c (p - q)
        JSD         grad_s = c (1 - beta) q (log q - log m - Kq) grad_t = c beta p (log p - log m - Kp)
  (5) stats (N, 6) = (max_s, log sum_a, max_t, log sum_b, k_t, k_s) between forward and backward.

One program per row. The forward's chunk sums are taken against the merged max directly (the CPU
kernel takes them against the chunk's max and merges: the same value, other roundings). Accumulation
in float32 (float64 for float64 input): the element type of the loss pointer (forward) and of the
grad_loss pointer (backward). No host syncs, no atomics (deterministic). The ops are registered in
fusedloss/ops/kl_div.py; launches go through torch.library.wrap_triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton._common import acc_dtype as _acc_dtype
from fusedloss.triton._common import cast_rtne
from fusedloss.triton._common import launch_config as _launch_config
from fusedloss.triton._common import param
from fusedloss.triton._common import split_float as _split_float

__all__ = ["kl_div_fwd", "kl_div_bwd"]

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
_MAX_BLOCK = 4096
_MAX_WARPS = 8


def _mode(beta: float, jsd: bool) -> int:
    if not jsd or beta == 0.0:
        return FORWARD_KL
    return REVERSE_KL if beta == 1.0 else JSD


@triton.jit
def _rescale(m, m_new, inv_t):
    # exp((m - m_new) / T), 0 for a state still at -inf (no exp(-inf + inf))
    return tl.where(m == float("-inf"), 0.0, tl.exp((m - m_new) * inv_t))


@triton.jit
def _kl_div_fwd_kernel(s_ptr, s_stride, t_ptr, t_stride, target_ptr, loss_ptr, stats_ptr, C, ignore_index,
                       inv_t_hi, inv_t_lo, beta_hi, beta_lo, scale_hi, scale_lo,
                       HAS_TARGET: tl.constexpr, MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    inv_t = param(inv_t_hi, inv_t_lo, ACC)
    beta = param(beta_hi, beta_lo, ACC)
    scale = param(scale_hi, scale_lo, ACC)
    st = stats_ptr + 6 * row
    keep = True
    if HAS_TARGET:
        keep = tl.load(target_ptr + row) != ignore_index
    if keep:
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        offs = tl.arange(0, BLOCK_SIZE)
        neg_inf = float("-inf")
        max_s = tl.full((), neg_inf, ACC)
        max_t = tl.full((), neg_inf, ACC)
        sum_a = tl.zeros((), ACC)
        sum_b = tl.zeros((), ACC)
        w = tl.zeros((), ACC)
        # (3): one pass, online; the maxima of the raw logits, differences scaled by 1/T (scaled_diff)
        for c0 in range(0, C, BLOCK_SIZE):
            cols = c0 + offs
            mask = cols < C
            s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
            t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
            new_s = tl.maximum(max_s, tl.max(s, axis=0))
            new_t = tl.maximum(max_t, tl.max(t, axis=0))
            da = (s - tl.where(new_s == neg_inf, 0.0, new_s)) * inv_t
            db = (t - tl.where(new_t == neg_inf, 0.0, new_t)) * inv_t
            ea = tl.exp(da)
            eb = tl.exp(db)
            fa = _rescale(max_s, new_s, inv_t)
            fb = _rescale(max_t, new_t, inv_t)
            # w so far, against the new maxima (shift_w), then this chunk's terms
            if MODE == 0:
                w = tl.where(sum_b == 0.0, 0.0, fb * (w + sum_b * ((max_t - new_t) * inv_t - (max_s - new_s) * inv_t)))
                w += tl.sum(tl.where(eb > 0.0, eb * (db - da), 0.0), axis=0)
            elif MODE == 1:
                w = tl.where(sum_a == 0.0, 0.0, fa * (w + sum_a * ((max_s - new_s) * inv_t - (max_t - new_t) * inv_t)))
                w += tl.sum(tl.where(ea > 0.0, ea * (da - db), 0.0), axis=0)
            sum_a = sum_a * fa + tl.sum(ea, axis=0)
            sum_b = sum_b * fb + tl.sum(eb, axis=0)
            max_s = new_s
            max_t = new_t
        log_sa = tl.log(sum_a)
        log_sb = tl.log(sum_b)
        k_t = tl.zeros((), ACC)
        k_s = tl.zeros((), ACC)
        if MODE == 0:
            k_t = w / sum_b - log_sb + log_sa
            loss = scale * k_t
        elif MODE == 1:
            k_s = w / sum_a - log_sa + log_sb
            loss = scale * k_s
        else:
            # the JSD's second pass, (2)
            kp = tl.zeros((BLOCK_SIZE,), ACC)
            kq = tl.zeros((BLOCK_SIZE,), ACC)
            for c0 in range(0, C, BLOCK_SIZE):
                cols = c0 + offs
                mask = cols < C
                s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
                t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
                log_q = (s - max_s) * inv_t - log_sa
                log_p = (t - max_t) * inv_t - log_sb
                q = tl.exp(log_q)
                p = tl.exp(log_p)
                log_m = tl.log(beta * p + (1.0 - beta) * q)
                kp += tl.where(p > 0.0, p * (log_p - log_m), 0.0)
                kq += tl.where(q > 0.0, q * (log_q - log_m), 0.0)
            k_t = tl.sum(kp, axis=0)
            k_s = tl.sum(kq, axis=0)
            loss = scale * (beta * k_t + (1.0 - beta) * k_s)
        tl.store(loss_ptr + row, loss)
        tl.store(st, max_s)
        tl.store(st + 1, log_sa)
        tl.store(st + 2, max_t)
        tl.store(st + 3, log_sb)
        tl.store(st + 4, k_t)
        tl.store(st + 5, k_s)
    else:
        zero = tl.zeros((), ACC)
        tl.store(loss_ptr + row, zero)
        for i in tl.static_range(6):
            tl.store(st + i, zero)


@triton.jit
def _kl_div_bwd_kernel(g_ptr, g_stride, s_ptr, s_stride, t_ptr, t_stride, target_ptr, stats_ptr, gs_ptr, gt_ptr, C,
                       ignore_index, inv_t_hi, inv_t_lo, beta_hi, beta_lo, scale_hi, scale_lo,
                       HAS_TARGET: tl.constexpr, MODE: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = g_ptr.dtype.element_ty
    OUT: tl.constexpr = gs_ptr.dtype.element_ty
    inv_t = param(inv_t_hi, inv_t_lo, ACC)
    beta = param(beta_hi, beta_lo, ACC)
    scale = param(scale_hi, scale_lo, ACC)
    keep = True
    if HAS_TARGET:
        keep = tl.load(target_ptr + row) != ignore_index
    offs = tl.arange(0, BLOCK_SIZE)
    gs_row = gs_ptr + row * C
    gt_row = gt_ptr + row * C
    if keep:
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        st = stats_ptr + 6 * row
        max_s = tl.load(st)
        log_sa = tl.load(st + 1)
        max_t = tl.load(st + 2)
        log_sb = tl.load(st + 3)
        k_t = tl.load(st + 4)
        k_s = tl.load(st + 5)
        c = tl.load(g_ptr + row * g_stride) * scale * inv_t
        c_s = c
        c_t = c
        if MODE == 2:
            c_s = c * (1.0 - beta)
            c_t = c * beta
        for c0 in range(0, C, BLOCK_SIZE):
            cols = c0 + offs
            mask = cols < C
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(ACC)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(ACC)
            log_q = (s - max_s) * inv_t - log_sa
            log_p = (t - max_t) * inv_t - log_sb
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            # (4)
            if MODE == 0:
                grad_s = c_s * (q - p)
                grad_t = c_t * tl.where(p > 0.0, p * ((log_p - log_q) - k_t), 0.0)
            elif MODE == 1:
                grad_s = c_s * tl.where(q > 0.0, q * ((log_q - log_p) - k_s), 0.0)
                grad_t = c_t * (p - q)
            else:
                log_m = tl.log(beta * p + (1.0 - beta) * q)
                grad_s = c_s * tl.where(q > 0.0, q * ((log_q - log_m) - k_s), 0.0)
                grad_t = c_t * tl.where(p > 0.0, p * ((log_p - log_m) - k_t), 0.0)
            tl.store(gs_row + cols, cast_rtne(grad_s, OUT), mask=mask)
            if TEACHER_GRAD:
                tl.store(gt_row + cols, cast_rtne(grad_t, OUT), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_SIZE):
            cols = c0 + offs
            mask = cols < C
            zero = tl.zeros((BLOCK_SIZE,), OUT)
            tl.store(gs_row + cols, zero, mask=mask)
            if TEACHER_GRAD:
                tl.store(gt_row + cols, zero, mask=mask)


def _check(student: Tensor, teacher: Tensor, target: Tensor | None, temperature: float, beta: float) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must be (N, C) of one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher must have student's dtype {student.dtype}, got {teacher.dtype}")
    if student.shape[1] > 1 and (student.stride(1) != 1 or teacher.stride(1) != 1):
        raise ValueError("student and teacher must have unit stride along the class dimension")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if target is not None and (target.shape != (student.shape[0],) or target.dtype != torch.int64):
        raise ValueError("target must be an int64 (N,) tensor")


def _scalars(temperature: float, beta: float, jsd: bool) -> tuple:
    scale = 1.0 if jsd else temperature * temperature
    return (*_split_float(1.0 / temperature), *_split_float(beta), *_split_float(scale))


def kl_div_fwd(student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int, temperature: float,
               beta: float, jsd: bool) -> tuple[Tensor, Tensor]:
    """Per-row loss (N,) and stats (N, 6) in the accumulation dtype; 0 for ignored rows."""
    _check(student, teacher, target, temperature, beta)
    n_rows, num_classes = student.shape
    acc = _acc_dtype(student.dtype)
    loss = torch.empty((n_rows,), dtype=acc, device=student.device)
    stats = torch.empty((n_rows, 6), dtype=acc, device=student.device)
    if n_rows == 0:
        return loss, stats
    block, num_warps = _launch_config(num_classes, _MAX_BLOCK, _MAX_WARPS)
    torch.library.wrap_triton(_kl_div_fwd_kernel)[(n_rows,)](
        student, student.stride(0), teacher, teacher.stride(0), target if target is not None else loss, loss, stats,
        num_classes, ignore_index, *_scalars(temperature, beta, jsd),
        HAS_TARGET=target is not None, MODE=_mode(beta, jsd), BLOCK_SIZE=block, num_warps=num_warps)
    return loss, stats


def kl_div_bwd(grad_loss: Tensor, student: Tensor, teacher: Tensor, target: Tensor | None, stats: Tensor,
               ignore_index: int, temperature: float, beta: float, jsd: bool,
               teacher_grad: bool) -> tuple[Tensor, Tensor]:
    """The student's (N, C) gradient and the teacher's ((0,) unless teacher_grad), contiguous."""
    _check(student, teacher, target, temperature, beta)
    n_rows, num_classes = student.shape
    grad_s = torch.empty((n_rows, num_classes), dtype=student.dtype, device=student.device)
    grad_t = torch.empty((n_rows, num_classes) if teacher_grad else (0,), dtype=student.dtype,
                         device=student.device)
    if grad_s.numel() == 0:
        return grad_s, grad_t
    acc = _acc_dtype(student.dtype)
    if grad_loss.dtype != acc:  # the kernel accumulates in grad_loss's element type
        grad_loss = grad_loss.to(acc)
    block, num_warps = _launch_config(num_classes, _MAX_BLOCK, _MAX_WARPS)
    torch.library.wrap_triton(_kl_div_bwd_kernel)[(n_rows,)](
        grad_loss, grad_loss.stride(0), student, student.stride(0), teacher, teacher.stride(0),
        target if target is not None else stats, stats, grad_s, grad_t if teacher_grad else grad_s, num_classes,
        ignore_index, *_scalars(temperature, beta, jsd),
        HAS_TARGET=target is not None, MODE=_mode(beta, jsd), TEACHER_GRAD=bool(teacher_grad), BLOCK_SIZE=block,
        num_warps=num_warps)
    return grad_s, grad_t
