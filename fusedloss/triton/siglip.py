"""Triton kernels of SigLIP's sigmoid pairwise loss (fusedloss::siglip_{fwd,bwd}_triton).

The math follows csrc/include/fusedloss/siglip_math.h, with its names and numbers. T = Q K^T (N x M)
is never held: every kernel streams tiles of it, recomputed from Q and K with the tile products of
fusedloss/triton/info_nce.py (the same precision choices: float32 products in "ieee", or in TF32 where
torch's matmul uses it; float64 as broadcast sums).
  (0)  loss_i = sum_j softplus(-y_ij z_ij),  z = scale T + bias,  y = +1 at j == l_i, -1 elsewhere
  (1)  G_ij = g_i dz_ij,  dz_ij = -y_ij sigmoid(-y_ij z_ij)
  (2)  dQ_i = scale sum_j G_ij K_j,  dK_j = scale sum_i G_ij Q_i
  (3)  dscale = sum_ij G_ij T_ij,  dbias = sum_ij G_ij

Every pair is independent (no log-sum-exp), so the forward is one pass over the key tiles per block of
queries, each row's sum float32 per tile and float64 across tiles. The backward runs one kernel over an
"A" side whose rows a program owns and writes, streaming the "B" side: (A, B) = (Q, K) for dQ and the
rows' partial sums of (3), (K, Q) for dK (the labels and g then index B). Each output element has
exactly one writer and every sum runs in a fixed order: no atomics; the per-row partials of (3) are
summed by torch afterwards, in a fixed order.

The siglip ops take float32 or float64 rows (the gradient is then its own accumulator). The
siglip_rows ops (fusedloss.siglip_loss's path for fp16/bf16 rows) take rows of any floating dtype as
they are: the loss in the accumulation dtype, a float32 accumulator for a 16-bit gradient when D spans
several chunks, and with ``normalize`` the rows' norms scale each tile after its product, as
info_nce's NORMED kernels do (fusedloss/triton/info_nce.py): T_ij = r_i r_j (Q_i . K_j), the columns of
G scaled by r_j before (2), and F.normalize's backward in float32 before the gradient's one rounding.

Only kernels and their launch helpers live here; the ops are registered in fusedloss/ops/siglip.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss.triton._common import INTERPRET, acc_dtype
from fusedloss.triton.info_nce import (_check_norms, _config, _dot_pb, _fp32_precision, _inv_norm, _row_norms,
                                       _rows_contiguous, _scores_tile, _write_grad)

__all__ = ["siglip_fwd", "siglip_bwd", "siglip_rows_fwd", "siglip_rows_bwd"]


@triton.jit
def _log1p(x):
    # log1p of x in [0, 1] from log alone (not every target, nor the interpreter, has a log1p): with
    # u = 1 + x rounded, log(u) * x / (u - 1) is accurate to a few ulps (Goldberg 1991), and x itself
    # where u rounds to 1.
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    # siglip::softplus: max(x, 0) + log1p(exp(-|x|)), no overflow, small terms kept.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # siglip::sigmoid: 1 / (1 + e) for x >= 0, e / (1 + e) otherwise, e = exp(-|x|).
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, r, e * r)


@triton.jit
def _siglip_fwd_kernel(
    q_ptr,
    q_stride,
    k_ptr,
    k_stride,
    scale_ptr,
    bias_ptr,
    labels_ptr,
    out_ptr,
    q_norm_ptr,
    k_norm_ptr,
    n_q,
    n_k,
    dim,
    HAS_LABELS: tl.constexpr,
    NORMED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    a_rows = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a_rows < n_q
    a_tile = tl.zeros([BLOCK_A, BLOCK_D], q_ptr.dtype.element_ty)
    if SINGLE_D:
        d_offsets = tl.arange(0, BLOCK_D)
        a_tile = tl.load(q_ptr + a_rows[:, None] * q_stride + d_offsets[None, :],
                         mask=a_mask[:, None] & (d_offsets < dim)[None, :], other=0.0)
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC)
    if HAS_LABELS:
        labels = tl.load(labels_ptr + a_rows, mask=a_mask, other=-1)
    else:
        labels = a_rows
    run = tl.zeros([BLOCK_A], tl.float64)
    inv_a = tl.zeros([BLOCK_A], ACC)
    if NORMED:
        inv_a = _inv_norm(q_norm_ptr, a_rows, a_mask)
    for b0 in range(0, n_k, BLOCK_B):
        b_rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b_rows < n_k
        dots, _ = _scores_tile(a_tile, a_rows, a_mask, q_stride, q_ptr, b_rows, b_mask, k_stride, k_ptr,
                               dim, ACC, BLOCK_A, BLOCK_B, BLOCK_D, SINGLE_D, FP32_PRECISION, INTERPRETED)
        if NORMED:
            dots = dots * inv_a[:, None] * _inv_norm(k_norm_ptr, b_rows, b_mask)[None, :]
        z = scale * dots + bias
        positive = labels[:, None] == b_rows[None, :]
        terms = tl.where(b_mask[None, :], _softplus(tl.where(positive, -z, z)), 0.0)  # (0)
        run += tl.sum(terms, axis=1).to(tl.float64)
    tl.store(out_ptr + a_rows, run.to(ACC), mask=a_mask)


@triton.jit
def _siglip_grad_kernel(
    a_ptr,
    a_stride,
    b_ptr,
    b_stride,
    scale_ptr,
    bias_ptr,
    labels_ptr,
    g_ptr,
    g_stride,
    grad_ptr,
    acc_ptr,
    part_ptr,
    a_norm_ptr,
    b_norm_ptr,
    n_a,
    n_b,
    dim,
    A_IS_QUERY: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    NORMED: tl.constexpr,
    SCRATCH_IN_GRAD: tl.constexpr,
    FINAL_PASS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    a_rows = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a_rows < n_a
    d_offsets = tl.arange(0, BLOCK_D)
    a_tile = tl.zeros([BLOCK_A, BLOCK_D], a_ptr.dtype.element_ty)
    if SINGLE_D:
        a_tile = tl.load(a_ptr + a_rows[:, None] * a_stride + d_offsets[None, :],
                         mask=a_mask[:, None] & (d_offsets < dim)[None, :], other=0.0)
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC)
    if A_IS_QUERY:
        g_a = tl.load(g_ptr + a_rows * g_stride, mask=a_mask, other=0.0).to(ACC)
        if HAS_LABELS:
            labels_a = tl.load(labels_ptr + a_rows, mask=a_mask, other=-1)
        else:
            labels_a = a_rows
    grad_acc = tl.zeros([BLOCK_A, BLOCK_D], ACC)  # SINGLE_D: sum_b G_ab scale B_b
    # Larger D: a float32/float64 gradient is its own accumulator; a 16-bit one gets a float32 scratch.
    if SCRATCH_IN_GRAD:
        scratch_ptr = grad_ptr
    else:
        scratch_ptr = acc_ptr
    gt = tl.zeros([BLOCK_A], tl.float64)  # (3) per query row, before the factor g_i
    gs = tl.zeros([BLOCK_A], tl.float64)
    inv_a = tl.zeros([BLOCK_A], ACC)
    if NORMED:
        inv_a = _inv_norm(a_norm_ptr, a_rows, a_mask)
    for b0 in range(0, n_b, BLOCK_B):
        b_rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b_rows < n_b
        dots, b_tile = _scores_tile(a_tile, a_rows, a_mask, a_stride, a_ptr, b_rows, b_mask, b_stride, b_ptr,
                                    dim, ACC, BLOCK_A, BLOCK_B, BLOCK_D, SINGLE_D, FP32_PRECISION, INTERPRETED)
        inv_b = tl.zeros([BLOCK_B], ACC)
        if NORMED:
            inv_b = _inv_norm(b_norm_ptr, b_rows, b_mask)
            dots = dots * inv_a[:, None] * inv_b[None, :]
        z = scale * dots + bias
        if A_IS_QUERY:
            positive = labels_a[:, None] == b_rows[None, :]
        else:
            if HAS_LABELS:
                labels_b = tl.load(labels_ptr + b_rows, mask=b_mask, other=-1)
            else:
                labels_b = b_rows
            positive = labels_b[None, :] == a_rows[:, None]
        # (1) without g: -y sigmoid(-y z); padding rows and columns give exact zeros.
        dz = tl.where(positive, -_sigmoid(-z), _sigmoid(z))
        dz = tl.where(a_mask[:, None] & b_mask[None, :], dz, 0.0)
        if A_IS_QUERY:
            gt += tl.sum(dz * dots, axis=1).to(tl.float64)
            gs += tl.sum(dz, axis=1).to(tl.float64)
            p = dz * (g_a * scale)[:, None]
        else:
            g_b = tl.load(g_ptr + b_rows * g_stride, mask=b_mask, other=0.0).to(ACC)
            p = dz * (g_b * scale)[None, :]
        if NORMED:
            p = p * inv_b[None, :]  # sum_b G_ab (B_b / |B_b|) on the raw rows
        # (2): sum_b (g scale dz)_ab B_b.
        if SINGLE_D:
            grad_acc += _dot_pb(p, b_tile, FP32_PRECISION).to(ACC)
        else:
            # The program's own rows of the accumulator, read-modify-written chunk by chunk; the first
            # B tile reads nothing. The barrier orders the previous tile's writes before this tile's
            # reads across the program's threads.
            tl.debug_barrier()
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + d_offsets
                d_mask = d < dim
                b_chunk = tl.load(b_ptr + b_rows[:, None] * b_stride + d[None, :],
                                  mask=b_mask[:, None] & d_mask[None, :], other=0.0)
                acc_ptrs = scratch_ptr + a_rows[:, None] * dim + d[None, :]
                acc_mask = a_mask[:, None] & d_mask[None, :]
                part = tl.load(acc_ptrs, mask=acc_mask & (b0 > 0), other=0.0)
                part += _dot_pb(p, b_chunk, FP32_PRECISION).to(ACC)
                tl.store(acc_ptrs, part, mask=acc_mask)
    # through the normalization (NORMED) and cast: a float32/float64 gradient that is its own
    # accumulator needs no last pass otherwise
    _write_grad(grad_acc, 1.0, a_tile, a_ptr, a_stride, scratch_ptr, grad_ptr, a_rows, a_mask, inv_a, a_norm_ptr,
                n_b, dim, NORMED, SINGLE_D, FINAL_PASS, BLOCK_A, BLOCK_D)
    if A_IS_QUERY:
        # (3) per row, times g_i in float64 (a row without gradient adds an exact 0)
        g64 = g_a.to(tl.float64)
        tl.store(part_ptr + a_rows, tl.where(g_a != 0.0, g64 * gt, 0.0), mask=a_mask)
        tl.store(part_ptr + n_a + a_rows, tl.where(g_a != 0.0, g64 * gs, 0.0), mask=a_mask)


def _check_inputs(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None,
                  rows: bool = False) -> None:
    if query.dim() != 2 or key.dim() != 2:
        raise ValueError(f"fusedloss.siglip_loss (triton): query and key must be 2-D, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"fusedloss.siglip_loss (triton): query and key must have the same last dimension, "
                         f"got {query.shape[1]} and {key.shape[1]}")
    dtypes = (torch.float32, torch.float64) + ((torch.bfloat16, torch.float16) if rows else ())
    if query.dtype not in dtypes or key.dtype != query.dtype:
        raise ValueError(f"fusedloss.siglip_loss (triton): query and key must have one dtype of {dtypes}, "
                         f"got {query.dtype} and {key.dtype}")
    for name, v in (("scale", scale), ("bias", bias)):
        if v.dim() != 0:
            raise ValueError(f"fusedloss.siglip_loss (triton): {name} must be a 0-dim tensor, got shape "
                             f"{tuple(v.shape)}")
    n, m = query.shape[0], key.shape[0]
    if labels is None:
        if m < n:
            raise ValueError(f"fusedloss.siglip_loss (triton): without labels (labels_i = i) there must be at "
                             f"least as many keys as queries, got N={n} and M={m}")
    elif labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"fusedloss.siglip_loss (triton): labels must be an int64 tensor of shape ({n},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")


def _fwd(query, key, scale, bias, labels, q_norm, k_norm):
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    labels = labels.contiguous() if labels is not None else None
    n, dim = query.shape
    acc = acc_dtype(query.dtype)
    out = torch.empty((n,), dtype=acc, device=query.device)
    if n == 0:
        return out
    block_a, block_b, block_d, single_d, num_warps, num_stages = _config("fwd", query.dtype, dim)
    torch.library.wrap_triton(_siglip_fwd_kernel)[(triton.cdiv(n, block_a),)](
        query, query.stride(0), key, key.stride(0), scale, bias,
        labels if labels is not None else out,  # never read without HAS_LABELS
        out,
        q_norm if q_norm is not None else out,  # never read without NORMED
        k_norm if k_norm is not None else out,
        n, key.shape[0], dim,
        HAS_LABELS=labels is not None,
        NORMED=q_norm is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, SINGLE_D=single_d,
        FP32_PRECISION=_fp32_precision(),
        INTERPRETED=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def siglip_fwd(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None = None) -> Tensor:
    """loss_i (N,) of (0) in the inputs' dtype. scale and bias are 0-dim tensors read on the device; labels
    are not range-checked (no sync): a query whose label is outside [0, M) has no positive."""
    _check_inputs(query, key, scale, bias, labels)
    return _fwd(query, key, scale, bias, labels, None, None)


def siglip_rows_fwd(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, normalize: bool,
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`siglip_fwd` on rows of any floating dtype as they are (16-bit ones on the tensor cores), the
    loss in the accumulation dtype; with ``normalize``, of the L2-normalized rows (F.normalize) without
    normalized copies. Also returns the rows' norms, query_norm (N,) and key_norm (M,) in the
    accumulation dtype ((0,) each without ``normalize``), for the backward."""
    _check_inputs(query, key, scale, bias, labels, rows=True)
    acc = acc_dtype(query.dtype)
    query, key = _rows_contiguous(query), _rows_contiguous(key)  # once, for the norms and the kernel
    if normalize:
        q_norm, k_norm = _row_norms(query, acc), _row_norms(key, acc)
    else:
        q_norm = k_norm = None
    out = _fwd(query, key, scale, bias, labels, q_norm, k_norm)
    empty = query.new_empty((0,), dtype=acc)
    return out, q_norm if normalize else empty, k_norm if normalize else empty.clone()


def _grad(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, g: Tensor,
          a_is_query: bool, a_norm: Tensor | None = None, b_norm: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(2) for every row of A (through the normalization with a_norm, b_norm) and, when A is the query
    side, the rows' partials of (3): (2 N,) float64, d scale's then d bias's."""
    n_a, dim = a.shape
    n_b = b.shape[0]
    acc = acc_dtype(a.dtype)
    grad = torch.empty((n_a, dim), dtype=a.dtype, device=a.device)
    part = torch.empty((2 * n_a,), dtype=torch.float64, device=a.device) if a_is_query else None
    if n_a == 0 or n_b == 0:  # no pairs: every gradient is 0
        grad.zero_()
        if part is not None:
            part.zero_()
        return grad, part
    block_a, block_b, block_d, single_d, num_warps, num_stages = _config("bwd", a.dtype, dim)
    scratch_in_grad = a.dtype == acc
    scratch = a if single_d or scratch_in_grad else torch.empty((n_a, dim), dtype=acc, device=a.device)
    torch.library.wrap_triton(_siglip_grad_kernel)[(triton.cdiv(n_a, block_a),)](
        a, a.stride(0), b, b.stride(0), scale, bias,
        labels if labels is not None else g,  # never read without HAS_LABELS
        g, g.stride(0), grad,
        scratch,  # a read-only stand-in, never touched, unless the 16-bit chunked path
        part if part is not None else g,  # never written unless A_IS_QUERY
        a_norm if a_norm is not None else g,  # never read without NORMED
        b_norm if b_norm is not None else g,
        n_a, n_b, dim,
        A_IS_QUERY=a_is_query,
        HAS_LABELS=labels is not None,
        NORMED=a_norm is not None,
        SCRATCH_IN_GRAD=scratch_in_grad,
        FINAL_PASS=a_norm is not None or not scratch_in_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, SINGLE_D=single_d,
        FP32_PRECISION=_fp32_precision(),
        INTERPRETED=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return grad, part


def _bwd(grad_rows, query, key, scale, bias, labels, q_norm, k_norm):
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    labels = labels.contiguous() if labels is not None else None
    n = query.shape[0]
    if grad_rows.shape != (n,):
        raise ValueError(f"fusedloss.siglip_loss (triton): grad_rows must have shape ({n},), got "
                         f"{tuple(grad_rows.shape)}")
    grad_query, part = _grad(query, key, scale, bias, labels, grad_rows, True, q_norm, k_norm)
    grad_key, _ = _grad(key, query, scale, bias, labels, grad_rows, False, k_norm, q_norm)
    return grad_query, grad_key, part[:n].sum().to(scale.dtype), part[n:].sum().to(bias.dtype)


def siglip_bwd(grad_rows: Tensor, query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows_i loss_i: grad_query (N, D), grad_key (M, D) in the inputs' dtype,
    grad_scale and grad_bias (0-dim, summed in float64) in scale's and bias's dtypes. grad_rows may be
    expanded (stride 0). Deterministic: no atomics."""
    _check_inputs(query, key, scale, bias, labels)
    return _bwd(grad_rows, query, key, scale, bias, labels, None, None)


def siglip_rows_bwd(grad_rows: Tensor, query: Tensor, key: Tensor, query_norm: Tensor, key_norm: Tensor,
                    scale: Tensor, bias: Tensor, normalize: bool,
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`siglip_bwd` of :func:`siglip_rows_fwd`: the gradients of the rows as given, through their
    normalization with ``normalize`` (query_norm, key_norm: the forward's), each rounded once."""
    _check_inputs(query, key, scale, bias, labels, rows=True)
    if normalize:
        _check_norms("siglip_loss", query_norm, key_norm, query.shape[0], key.shape[0], acc_dtype(query.dtype))
    return _bwd(grad_rows, query, key, scale, bias, labels, query_norm if normalize else None,
                key_norm if normalize else None)
