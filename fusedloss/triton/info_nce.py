"""Triton kernels of InfoNCE's tiled log-sum-exps (fusedloss::info_nce_lse_{fwd,bwd}_triton).

The math follows csrc/include/fusedloss/info_nce_math.h, with its names. S = scale * Q K^T (N x M)
is never held: every kernel streams tiles of it, recomputed from Q and K with tl.dot.
  forward   lse_r_i = log sum_j exp(S_ij), lse_c_j = log sum_i exp(S_ij), each a running
            (max, sum exp) over the tiles of one row (column) block, flash-attention's online softmax
  positives pos_i = mean of S[i, j] over j in P(i), from the forward's own tiles: P(i) = {l_i} (l =
            labels, or i), or with key groups every j with key_groups_j == l_i
  (1)       P_ij = g_i exp(S_ij - lse_r_i) + h_j exp(S_ij - lse_c_j) + u_i [j in P(i)] / |P(i)|
            (h, lse_c: column direction; u: the positives' upstream gradient)
  (2)       dQ_i = scale sum_j P_ij K_j,   dK_j = scale sum_i P_ij Q_i
  (3)       dscale = sum_ij P_ij (Q_i . K_j), from the unscaled dot products (scale never divides),
            summed as (3'): per row (column) normalized by its sum of exp(S - lse) and shifted by
            c_i = pos_i / scale, the positive's own term separately, in float64

Rows and columns are the same problem with Q and K swapped (S^T = scale K Q^T), so each kernel is
written once over an "A" side, whose block of rows a program owns and writes, and a "B" side that it
streams: the forward runs once with (A, B) = (Q, K) for lse_r and once with (K, Q) for lse_c; the
backward once with (Q, K) for dQ and the rows' partial sums of dscale, once with (K, Q) for dK and
the columns' part of dscale. Each output element has exactly one writer and every sum runs in a fixed
order: no atomics, the results are bitwise reproducible. dscale's per-program partials are summed
afterwards by torch in fixed order.

Normalized rows (NORMED, the info_nce_lse_normed ops; fusedloss.info_nce's path for 16-bit rows): the
kernels take the rows as they are with their L2 norms n (float32, one small kernel), r = 1 / max(n, eps):
  S_ij = scale r_i r_j (Q_i . K_j), the tile's product on the raw rows and then scaled, so bf16/fp16
            rows reach the tensor cores and their products stay exact
  (2')      dQhat_i = scale sum_j (P_ij r_j) K_j, the columns of P scaled before the product
  dQ_i = r_i (dQhat_i - Qhat_i (Qhat_i . dQhat_i)), F.normalize's backward (no radial part where
            n_i < eps, as torch's clamp passes none), in float32 before the one rounding
No normalized or float32 copy of the inputs is made.

D is walked in chunks of BLOCK_D. When one chunk covers D (SINGLE_D), the A tile is loaded once and
kept in registers, and the backward's (BLOCK_A, D) gradient accumulator lives in registers too. For
larger D the accumulator cannot: each program keeps it in a (rows, D) float32 scratch that only it
reads and writes (the float32/float64 gradient itself when the dtypes agree), read-modify-written per
B tile, and scales and casts it in a last pass.

Precision (the tests compare with float64 at the dtype's rounding, see tests/conftest.py TOL):
- float32 inputs follow torch's matmul setting, as torch's matmul does (_fp32_precision): by default
  (torch.backends.cuda.matmul.allow_tf32 False, float32_matmul_precision "highest") both products use
  input_precision="ieee": float32 FMAs, as accurate as a CPU loop, but off the tensor cores (an
  H100's dense peaks: 67 TFLOP/s of float32 FMA against 495 of TF32); with TF32 allowed ("high" or
  "medium") they run on the tensor cores in TF32 (10-bit mantissa, ~1e-3 relative error, what
  torch's own matmul then gives). "tf32x3" (three TF32 products, ~float32 accuracy) is the faster
  candidate for the default to measure on a GPU.
- bfloat16/float16: S = Q K^T on tensor cores with float32 accumulation (the products of two
  16-bit values are exact in float32). P is float32, and rounding it to the input dtype for the
  gradient's products (2^-9 relative per term, flash-attention's choice) misses the tolerance
  wherever a gradient element cancels: by up to 650x in a float64 simulation at 1024 x 1024 x 256,
  and a single TF32 rounding of P (2^-11) still by up to 65x. P is split instead into two TF32 parts, hi =
  P rounded to 10 mantissa bits and lo = (P - hi) rounded likewise, and K (or Q), widened to
  float32, is exact in TF32 (bf16 has 7 mantissa bits, fp16 10); two TF32 tensor-core products
  then carry P to ~2^-22 relative. Every operand is exactly representable in TF32, so the tensor
  cores' own conversion is lossless, and the CPU interpreter (which multiplies exactly) runs the
  same arithmetic as the GPU.
- float64: Triton's tl.dot accepts float64, but its lowering on NVIDIA GPUs is recent and not
  known to work in every version we meet (3.6 on the GPU machine), so products are broadcast
  multiplies and sums (tl.sum(a[:, None, :] * b[None, :, :])) on small tiles: exact float64
  arithmetic on any target, correct rather than fast.

Only kernels and their launch helpers live here; the ops are registered with
torch.library.triton_op in fusedloss/ops/, and every launch goes through torch.library.wrap_triton
so that torch.compile can trace the enclosing op. No host syncs: scale is read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch import Tensor

from fusedloss.triton._common import acc_dtype as _acc_dtype
from fusedloss.triton._common import INTERPRET, cast_rtne

__all__ = ["info_nce_lse_fwd", "info_nce_lse_bwd", "info_nce_lse_normed_fwd", "info_nce_lse_normed_bwd"]

def _fp32_precision() -> str:
    """input_precision of float32 inputs' products (see the module's docstring): "tf32" where torch's
    matmul uses TF32 (torch.backends.cuda.matmul.allow_tf32), else "ieee". Read at each launch, as
    torch reads its switch; the interpreter computes every product exactly, so "ieee" there."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"

# Launch configurations, all in one place (no autotuning yet: future work, per GPU, dtype and D).
# block_a: rows of A a program owns; block_b: rows of B per streamed tile; single_d_max: the largest
# D held in one chunk (A tile in registers, and in the backward the gradient accumulator too);
# block_d: the chunk of D otherwise. Chosen for an H100 from ptxas's register counts of sm_90 builds
# (Triton 3.8, no GPU timing yet), keeping every kernel free of spills or nearly so:
# - bf16/fp16 forward: a 128 x 64 tile of S in float32 is 32 registers per thread at 8 warps; D up to
#   256 in one chunk (156 registers), 64-wide chunks beyond (128-wide ones spill).
# - bf16/fp16 backward: 64 x 64 tiles of S and P, next to the (64, D) float32 accumulator (32
#   registers per thread at D = 128, 8 warps); larger D takes the scratch path in 32-wide chunks
#   (64-wide ones spill).
# - float32 ("ieee" products on FMA units, operands in registers): 64 x 64 tiles, D up to 64 in one
#   chunk, 32-wide chunks beyond (one 128-wide chunk spills kilobytes).
# - float64 (broadcast products): a 16 x 16 x 16 product is 32 doubles per thread at 4 warps.
_CONFIGS = {
    # kind: (block_a, block_b, single_d_max, block_d, num_warps, num_stages)
    "fwd": (128, 64, 256, 64, 8, 2),
    "bwd": (64, 64, 128, 32, 8, 2),
    "fwd_fp32": (64, 64, 64, 32, 8, 2),
    "bwd_fp32": (64, 64, 64, 32, 8, 2),
    "fwd_fp64": (16, 16, 16, 16, 4, 1),
    "bwd_fp64": (16, 16, 16, 16, 4, 1),
}
# tl.dot needs every tile dimension >= 16; smaller N, M or D are padded with masks.
_MIN_DOT = 16


def _config(kind: str, dtype: torch.dtype, dim: int) -> tuple[int, int, int, bool, int, int]:
    """(block_a, block_b, block_d, single_d, num_warps, num_stages) for the given kernel, dtype and D."""
    key = {torch.float64: kind + "_fp64", torch.float32: kind + "_fp32"}.get(dtype, kind)
    block_a, block_b, single_d_max, block_d, num_warps, num_stages = _CONFIGS[key]
    single_d = dim <= single_d_max
    if single_d:
        block_d = max(triton.next_power_of_2(max(dim, 1)), _MIN_DOT)
    return block_a, block_b, block_d, single_d, num_warps, num_stages


# ----------------------------------------------------------------------------------------------
# Device helpers: tile products
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_to_tf32(x):
    # float32 x rounded to nearest (ties away from zero) at TF32's 10 mantissa bits, the 13 low bits
    # zero: a value the tensor cores take without further rounding. inf stays inf, NaN stays NaN.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_abt(a, b, acc, FP32_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # acc + a (BA, BD) times b (BB, BD) transposed: the unscaled dot products Q_i . K_j summed over
    # one more chunk of D, in the accumulation dtype (acc is the dot's own accumulator: no extra tile).
    if a.dtype == tl.float64:
        return acc + tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    elif a.dtype == tl.float32:
        return tl.dot(a, tl.trans(b), acc, input_precision=FP32_PRECISION)
    elif INTERPRETED and a.dtype == tl.bfloat16:
        # Triton's CPU interpreter keeps bfloat16 as raw uint16 bits and its tl.dot multiplies those
        # as integers. Widened to float32 the products are the same exact ones the tensor cores form.
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b), acc)  # bf16 / fp16 on tensor cores, exact products, fp32 sums


@triton.jit
def _dot_pb(p, b, FP32_PRECISION: tl.constexpr):
    # p (BA, BB) in the accumulation dtype times b (BB, BD) in the input dtype: one tile's part of
    # sum_j P_ij B_j (2), in the accumulation dtype.
    if b.dtype == tl.float64:
        return tl.sum(p[:, :, None] * b[None, :, :], axis=1)
    elif b.dtype == tl.float32:
        return tl.dot(p, b, input_precision=FP32_PRECISION)
    else:
        # P = hi + lo, each exact in TF32; b widened to float32 is exact in TF32 (module docstring).
        b32 = b.to(tl.float32)
        p_hi = _round_to_tf32(p)
        p_lo = _round_to_tf32(p - p_hi)
        acc = tl.dot(p_hi, b32, input_precision="tf32")
        return tl.dot(p_lo, b32, acc, input_precision="tf32")


@triton.jit
def _scores_tile(a_tile, a_rows, a_mask, a_stride, a_ptr, b_rows, b_mask, b_stride, b_ptr, dim,
                 ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 SINGLE_D: tl.constexpr, FP32_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # The unscaled dot products A_a . B_b of one (BLOCK_A, BLOCK_B) tile, summed over D chunk by
    # chunk; rows outside A or B and columns past D load as 0. With SINGLE_D, a_tile is the
    # program's A tile, loaded once; the B tile is returned too, for the backward's product (2).
    d_offsets = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        d_mask = d_offsets < dim
        b_tile = tl.load(b_ptr + b_rows[:, None] * b_stride + d_offsets[None, :],
                         mask=b_mask[:, None] & d_mask[None, :], other=0.0)
        dots = _dot_abt(a_tile, b_tile, tl.zeros([BLOCK_A, BLOCK_B], ACC), FP32_PRECISION, INTERPRETED)
    else:
        b_tile = a_tile  # no tile to hand back: the backward reloads B per chunk
        dots = tl.zeros([BLOCK_A, BLOCK_B], ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + d_offsets
            d_mask = d < dim
            a_chunk = tl.load(a_ptr + a_rows[:, None] * a_stride + d[None, :],
                              mask=a_mask[:, None] & d_mask[None, :], other=0.0)
            b_chunk = tl.load(b_ptr + b_rows[:, None] * b_stride + d[None, :],
                              mask=b_mask[:, None] & d_mask[None, :], other=0.0)
            dots = _dot_abt(a_chunk, b_chunk, dots, FP32_PRECISION, INTERPRETED)
    return dots, b_tile


# F.normalize's eps: a row is divided by max(|x|, eps).
_NORM_EPS = tl.constexpr(1e-12)


@triton.jit
def _inv_norm(norm_ptr, rows, mask):
    # 1 / max(|x|, eps) of the rows, float32: the normalization of the NORMED kernels.
    return 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=mask, other=1.0), _NORM_EPS)


@triton.jit
def _row_norm_kernel(x_ptr, x_stride, out_ptr, n, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # The L2 norm of each row in the accumulation dtype, read from the rows as they are (no float32
    # copy of a 16-bit x).
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < n
    total = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :], mask=mask[:, None] & (d < dim)[None, :],
                    other=0.0).to(ACC)
        total += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(total), mask=mask)


# ----------------------------------------------------------------------------------------------
# Forward: lse over B for every row of A, one program per BLOCK_A rows
# ----------------------------------------------------------------------------------------------


@triton.jit
def _info_nce_lse_kernel(
    a_ptr,
    a_stride,
    b_ptr,
    b_stride,
    scale_ptr,
    lse_ptr,
    labels_ptr,
    key_groups_ptr,
    pos_ptr,
    npos_ptr,
    a_norm_ptr,
    b_norm_ptr,
    n_a,
    n_b,
    dim,
    HAS_POS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    NORMED: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # HAS_POS (the query side): also pos_a, the mean of the values the lse summed at a's positive
    # columns (b == labels_a, or with HAS_GROUPS key_groups_b == labels_a), and their count npos_a;
    # NaN where there are none (a label outside [0, n_b), an empty group).
    # NORMED: A and B are raw rows and a_norm / b_norm their L2 norms; the dots are those of the
    # normalized rows (F.normalize's x / max(|x|, eps)), scaled after the tile's product.
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    a_rows = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a_rows < n_a
    scale = tl.load(scale_ptr).to(ACC)
    inv_a = tl.zeros([BLOCK_A], ACC)
    if NORMED:
        inv_a = _inv_norm(a_norm_ptr, a_rows, a_mask)

    a_tile = tl.zeros([BLOCK_A, BLOCK_D], a_ptr.dtype.element_ty)
    if SINGLE_D:
        d_offsets = tl.arange(0, BLOCK_D)
        a_tile = tl.load(a_ptr + a_rows[:, None] * a_stride + d_offsets[None, :],
                         mask=a_mask[:, None] & (d_offsets < dim)[None, :], other=0.0)

    # The running Lse of every row: max m and sum = sum exp(S - m) over the tiles so far.
    m = tl.full([BLOCK_A], float("-inf"), ACC)
    s = tl.zeros([BLOCK_A], ACC)
    pos_sum = tl.zeros([BLOCK_A], tl.float64)
    pos_count = tl.zeros([BLOCK_A], tl.int32)
    labels = tl.zeros([BLOCK_A], tl.int64)
    if HAS_POS:
        labels = tl.load(labels_ptr + a_rows, mask=a_mask, other=-1)
    for b0 in range(0, n_b, BLOCK_B):
        b_rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b_rows < n_b
        dots, _ = _scores_tile(a_tile, a_rows, a_mask, a_stride, a_ptr, b_rows, b_mask, b_stride, b_ptr,
                               dim, ACC, BLOCK_A, BLOCK_B, BLOCK_D, SINGLE_D, FP32_PRECISION, INTERPRETED)
        if NORMED:
            dots = dots * inv_a[:, None] * _inv_norm(b_norm_ptr, b_rows, b_mask)[None, :]
        z = tl.where(b_mask[None, :], dots * scale, float("-inf"))
        if HAS_POS:
            b_ids = b_rows
            if HAS_GROUPS:
                b_ids = tl.load(key_groups_ptr + b_rows, mask=b_mask, other=0)
            hit = (b_ids[None, :] == labels[:, None]) & b_mask[None, :]
            pos_sum += tl.sum(tl.where(hit, z, 0.0).to(tl.float64), axis=1)
            pos_count += tl.sum(hit.to(tl.int32), axis=1)
        # merge(): the tile's values join the running sum against the new max; while a row's max
        # is still -inf the shift is taken against 0, so that no exp(-inf - -inf) = NaN appears.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new

    # finish(): an empty stream (n_b == 0) gives -inf, as torch.logsumexp of an empty row.
    lse = tl.where(m == float("-inf"), m, m + tl.log(tl.where(m == float("-inf"), 1.0, s)))
    tl.store(lse_ptr + a_rows, lse, mask=a_mask)
    if HAS_POS:
        pos = tl.where(pos_count > 0, pos_sum / tl.maximum(pos_count, 1).to(tl.float64), float("nan"))
        tl.store(pos_ptr + a_rows, pos.to(ACC), mask=a_mask)
        tl.store(npos_ptr + a_rows, pos_count.to(tl.int64), mask=a_mask)


# ----------------------------------------------------------------------------------------------
# Backward: (1) + (2) for the rows of A, one program per BLOCK_A rows; (3) with A = Q
# ----------------------------------------------------------------------------------------------


@triton.jit
def _normalize_backward(g, a_hat, inv_a, radial, a_norm_ptr, a_rows, a_mask):
    # F.normalize's backward for rows x with x_hat = x / max(|x|, eps), given g = dL/dx_hat:
    # dL/dx = (g - x_hat (x_hat . g)) / max(|x|, eps), the radial part only where |x| >= eps (below
    # it the clamp holds the divisor constant, as torch's clamp_min passes no gradient there).
    norm = tl.load(a_norm_ptr + a_rows, mask=a_mask, other=0.0)
    radial = tl.where(norm >= _NORM_EPS, radial, 0.0)
    return inv_a[:, None] * (g - a_hat * radial[:, None])


@triton.jit
def _write_grad(grad_acc, factor, a_tile, a_ptr, a_stride, scratch_ptr, grad_ptr, a_rows, a_mask, inv_a, a_norm_ptr,
                n_b, dim, NORMED: tl.constexpr, SINGLE_D: tl.constexpr, FINAL_PASS: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    # The gradient of A's rows (contiguous, rows of length dim), factor * the sum_b P_ab B_b that the
    # backward kernels (this module's and siglip's) accumulated in registers (SINGLE_D: grad_acc) or in
    # the program's rows of the scratch; with NORMED through the normalization, then rounded once.
    # FINAL_PASS False: the scratch is the gradient itself, already final. n_b == 0: the scratch was
    # never written and the gradient is 0.
    ACC: tl.constexpr = grad_acc.dtype
    GRAD_T: tl.constexpr = grad_ptr.dtype.element_ty
    d_offsets = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        g = grad_acc * factor
        if NORMED:
            a_hat = a_tile.to(ACC) * inv_a[:, None]
            g = _normalize_backward(g, a_hat, inv_a, tl.sum(a_hat * g, axis=1), a_norm_ptr, a_rows, a_mask)
        tl.store(grad_ptr + a_rows[:, None] * dim + d_offsets[None, :], cast_rtne(g, GRAD_T),
                 mask=a_mask[:, None] & (d_offsets < dim)[None, :])
    elif FINAL_PASS:
        tl.debug_barrier()
        radial = tl.zeros([BLOCK_A], ACC)
        if NORMED:  # a first pass for each row's A_hat . g, which the second one needs whole
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + d_offsets
                mask = a_mask[:, None] & (d < dim)[None, :]
                part = tl.load(scratch_ptr + a_rows[:, None] * dim + d[None, :], mask=mask & (n_b > 0), other=0.0)
                a_chunk = tl.load(a_ptr + a_rows[:, None] * a_stride + d[None, :], mask=mask, other=0.0)
                radial += tl.sum(a_chunk.to(ACC) * inv_a[:, None] * (part * factor), axis=1)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + d_offsets
            mask = a_mask[:, None] & (d < dim)[None, :]
            offsets = a_rows[:, None] * dim + d[None, :]
            g = tl.load(scratch_ptr + offsets, mask=mask & (n_b > 0), other=0.0) * factor
            if NORMED:
                a_chunk = tl.load(a_ptr + a_rows[:, None] * a_stride + d[None, :], mask=mask, other=0.0)
                g = _normalize_backward(g, a_chunk.to(ACC) * inv_a[:, None], inv_a, radial, a_norm_ptr, a_rows,
                                        a_mask)
            tl.store(grad_ptr + offsets, cast_rtne(g, GRAD_T), mask=mask)


@triton.jit
def _info_nce_grad_kernel(
    a_ptr,
    a_stride,
    b_ptr,
    b_stride,
    scale_ptr,
    g_a_ptr,
    g_a_stride,
    lse_a_ptr,
    lse_a_stride,
    g_b_ptr,
    g_b_stride,
    lse_b_ptr,
    lse_b_stride,
    labels_ptr,
    key_groups_ptr,
    npos_ptr,
    u_ptr,
    u_stride,
    shift_ptr,
    grad_ptr,
    acc_ptr,
    dscale_part_ptr,
    a_norm_ptr,
    b_norm_ptr,
    n_a,
    n_b,
    dim,
    NORMED: tl.constexpr,
    HAS_A_TERM: tl.constexpr,
    HAS_B_TERM: tl.constexpr,
    A_POS: tl.constexpr,
    B_POS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_DSCALE: tl.constexpr,
    SCRATCH_IN_GRAD: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # P_ab = g_a exp(S_ab - lse_a) + g_b exp(S_ab - lse_b): with (A, B) = (Q, K), g_a/lse_a are the
    # row direction's g/lse_r and g_b/lse_b the column direction's h/lse_c; with (A, B) = (K, Q) the
    # other way round. HAS_A_TERM / HAS_B_TERM drop a direction that is absent (no exp evaluated).
    # The positives' u_i / npos_i at (i, j), j in P(i): A_POS when A is Q (labels, u and npos index A's
    # rows), B_POS when B is Q (they index B's rows); neither when no positive's gradient is given.
    # A key's id is key_groups_j with HAS_GROUPS, else j.
    # shift_ptr: (3')'s shifts of A's rows, c_i = pos_i / scale for queries, c'_j for keys.
    # NORMED: raw rows and their norms, as in the forward; P's columns are scaled by 1 / |B_b| before
    # the product with the raw B tile, and the gradient of the normalized rows goes through the
    # normalization's backward in float32 before its one rounding (see _normalize_backward).
    ACC: tl.constexpr = lse_a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    a_rows = pid.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a_rows < n_a
    d_offsets = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(ACC)
    inv_a = tl.zeros([BLOCK_A], ACC)
    if NORMED:
        inv_a = _inv_norm(a_norm_ptr, a_rows, a_mask)

    g_a = tl.zeros([BLOCK_A], ACC)
    lse_a = tl.zeros([BLOCK_A], ACC)
    if HAS_A_TERM:
        g_a = tl.load(g_a_ptr + a_rows * g_a_stride, mask=a_mask, other=0.0).to(ACC)
        lse_a = tl.load(lse_a_ptr + a_rows * lse_a_stride, mask=a_mask, other=0.0).to(ACC)
    a_tile = tl.zeros([BLOCK_A, BLOCK_D], a_ptr.dtype.element_ty)
    if SINGLE_D:
        a_tile = tl.load(a_ptr + a_rows[:, None] * a_stride + d_offsets[None, :],
                         mask=a_mask[:, None] & (d_offsets < dim)[None, :], other=0.0)
    grad_acc = tl.zeros([BLOCK_A, BLOCK_D], ACC)  # SINGLE_D: sum_b P_ab B_b
    # Larger D: the float32/float64 gradient is its own scratch (one pointer, so that torch.compile
    # sees no two mutated arguments aliasing each other); a float32 buffer for bf16/fp16.
    if SCRATCH_IN_GRAD:
        scratch_ptr = grad_ptr
    else:
        scratch_ptr = acc_ptr
    # (3') of info_nce_math.h for the A side's rows: sum_b e_ab (dots_ab - c_a) and sum_b e_ab, float32 per
    # tile, float64 across tiles; their ratio cancels the rounding of lse_a.
    num_a = tl.zeros([BLOCK_A], tl.float64)
    den_a = tl.zeros([BLOCK_A], tl.float64)
    c_a = tl.zeros([BLOCK_A], ACC)
    if HAS_DSCALE:
        c_a = tl.load(shift_ptr + a_rows, mask=a_mask, other=0.0)
    labels_a = tl.full([BLOCK_A], -1, tl.int64)
    u_a = tl.zeros([BLOCK_A], ACC)
    npos_a = tl.zeros([BLOCK_A], tl.int64)
    t_pos = tl.zeros([BLOCK_A], tl.float64)  # sum of T[a, j] - c_a over a's positives j
    if A_POS:
        labels_a = tl.load(labels_ptr + a_rows, mask=a_mask, other=-1)
        u_a = tl.load(u_ptr + a_rows * u_stride, mask=a_mask, other=0.0).to(ACC)
        npos_a = tl.load(npos_ptr + a_rows, mask=a_mask, other=0)
    u_each_a = tl.where(npos_a > 0, u_a / tl.maximum(npos_a, 1).to(ACC), 0.0)
    a_ids = a_rows  # the keys' ids when A is K
    if B_POS and HAS_GROUPS:
        a_ids = tl.load(key_groups_ptr + a_rows, mask=a_mask, other=0)

    for b0 in range(0, n_b, BLOCK_B):
        b_rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b_rows < n_b
        dots, b_tile = _scores_tile(a_tile, a_rows, a_mask, a_stride, a_ptr, b_rows, b_mask, b_stride, b_ptr,
                                    dim, ACC, BLOCK_A, BLOCK_B, BLOCK_D, SINGLE_D, FP32_PRECISION, INTERPRETED)
        inv_b = tl.zeros([BLOCK_B], ACC)
        if NORMED:
            inv_b = _inv_norm(b_norm_ptr, b_rows, b_mask)
            dots = dots * inv_a[:, None] * inv_b[None, :]
        z = dots * scale
        # (1), as grad_s(): a zero upstream gradient contributes an exact 0 (never 0 * inf).
        p = tl.zeros([BLOCK_A, BLOCK_B], ACC)
        valid = a_mask[:, None] & b_mask[None, :]  # padding rows and columns add nothing
        if HAS_A_TERM:
            e_a = tl.where(valid & (g_a[:, None] != 0.0), tl.exp(z - lse_a[:, None]), 0.0)
            p += g_a[:, None] * e_a
            if HAS_DSCALE:
                num_a += tl.sum(e_a * (dots - c_a[:, None]), axis=1).to(tl.float64)
                den_a += tl.sum(e_a, axis=1).to(tl.float64)
        if HAS_B_TERM:
            g_b = tl.load(g_b_ptr + b_rows * g_b_stride, mask=b_mask, other=0.0).to(ACC)
            lse_b = tl.load(lse_b_ptr + b_rows * lse_b_stride, mask=b_mask, other=0.0).to(ACC)
            p += tl.where(g_b[None, :] == 0.0, 0.0, g_b[None, :] * tl.exp(z - lse_b[None, :]))
        # The positive's u last, as grad_s adds it: a one-hot row cancels in g e + u before any rounding.
        if A_POS:
            b_ids = b_rows
            if HAS_GROUPS:
                b_ids = tl.load(key_groups_ptr + b_rows, mask=b_mask, other=0)
            hit = (b_ids[None, :] == labels_a[:, None]) & valid
            p += tl.where(hit, u_each_a[:, None], 0.0)
            if HAS_DSCALE:
                t_pos += tl.sum(tl.where(hit, dots - c_a[:, None], 0.0).to(tl.float64), axis=1)
        if B_POS:
            labels_b = tl.load(labels_ptr + b_rows, mask=b_mask, other=-1)
            u_b = tl.load(u_ptr + b_rows * u_stride, mask=b_mask, other=0.0).to(ACC)
            npos_b = tl.load(npos_ptr + b_rows, mask=b_mask, other=0)
            u_each_b = tl.where(npos_b > 0, u_b / tl.maximum(npos_b, 1).to(ACC), 0.0)
            hit = (labels_b[None, :] == a_ids[:, None]) & valid
            p += tl.where(hit, u_each_b[None, :], 0.0)
        p = tl.where(valid, p, 0.0)
        if NORMED:
            p = p * inv_b[None, :]  # sum_b P_ab (B_b / |B_b|) on the raw rows

        # (2): sum_b P_ab B_b.
        if SINGLE_D:
            grad_acc += _dot_pb(p, b_tile, FP32_PRECISION).to(ACC)
        else:
            # The program's own rows of the scratch, read-modify-written chunk by chunk (the first
            # B tile reads nothing: no zero fill needed). The barrier orders the previous tile's
            # writes before this tile's reads across the program's threads.
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

    # (2) scaled, through the normalization (NORMED) and cast to the inputs' dtype.
    _write_grad(grad_acc, scale, a_tile, a_ptr, a_stride, scratch_ptr, grad_ptr, a_rows, a_mask, inv_a, a_norm_ptr,
                n_b, dim, NORMED, SINGLE_D, True, BLOCK_A, BLOCK_D)

    if HAS_DSCALE:
        # dscale_row of info_nce_math.h: g (num / den) + u (T_pos - c) + (g + u) c per row of A, in
        # float64; a row of zeros (g_a = 0, padding, an infinite lse) adds 0.
        ratio = tl.where(den_a == 0.0, 0.0, num_a / tl.where(den_a == 0.0, 1.0, den_a))
        g64 = g_a.to(tl.float64)
        u64 = u_a.to(tl.float64)
        part = tl.where(g_a != 0.0, g64 * ratio, 0.0)
        t_mean = tl.where(npos_a > 0, t_pos / tl.maximum(npos_a, 1).to(tl.float64), float("nan"))
        part += tl.where(u_a != 0.0, u64 * t_mean, 0.0)
        part += tl.where(a_mask, (g64 + u64) * c_a.to(tl.float64), 0.0)
        tl.store(dscale_part_ptr + pid, tl.sum(part, axis=0))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows_contiguous(x: Tensor) -> Tensor:
    # The kernels step rows by stride(0) and assume unit stride along D.
    return x if x.stride(1) == 1 else x.contiguous()


def _check_inputs(query: Tensor, key: Tensor, scale: Tensor) -> None:
    if query.dim() != 2 or key.dim() != 2:
        raise ValueError(f"fusedloss.info_nce (triton): query and key must be 2-D, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"fusedloss.info_nce (triton): query and key must have the same last dimension, "
                         f"got {query.shape[1]} and {key.shape[1]}")
    if query.dtype != key.dtype:
        raise ValueError(f"fusedloss.info_nce (triton): query and key must have the same dtype, got "
                         f"{query.dtype} and {key.dtype}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"fusedloss.info_nce (triton): unsupported dtype {query.dtype} (float32, bfloat16, "
                         f"float16 or float64)")
    if scale.dim() != 0:
        raise ValueError(f"fusedloss.info_nce (triton): scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")


def _lse(a: Tensor, b: Tensor, scale: Tensor, acc: torch.dtype, labels: Tensor | None,
         key_groups: Tensor | None = None, a_norm: Tensor | None = None,
         b_norm: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """lse over B of every row of A and, with labels, A's positives (their mean S) and their count. With
    a_norm and b_norm (the rows' L2 norms), of the normalized rows."""
    n_a, dim = a.shape
    lse = torch.empty((n_a,), dtype=acc, device=a.device)
    pos = torch.empty((n_a,), dtype=acc, device=a.device) if labels is not None else None
    npos = torch.empty((n_a,), dtype=torch.int64, device=a.device) if labels is not None else None
    if n_a == 0:
        return lse, pos, npos
    block_a, block_b, block_d, single_d, num_warps, num_stages = _config("fwd", a.dtype, dim)
    torch.library.wrap_triton(_info_nce_lse_kernel)[(triton.cdiv(n_a, block_a),)](
        a,
        a.stride(0),
        b,
        b.stride(0),
        scale,
        lse,
        labels if labels is not None else lse,  # never read without HAS_POS
        key_groups if key_groups is not None else lse,  # never read without HAS_GROUPS
        pos if pos is not None else lse,
        npos if npos is not None else lse,
        a_norm if a_norm is not None else lse,  # never read without NORMED
        b_norm if b_norm is not None else lse,
        n_a,
        b.shape[0],
        dim,
        HAS_POS=labels is not None,
        HAS_GROUPS=key_groups is not None,
        NORMED=a_norm is not None,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        SINGLE_D=single_d,
        FP32_PRECISION=_fp32_precision(),
        INTERPRETED=INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return lse, pos, npos


def _labels_or_arange(labels: Tensor | None, n: int, m: int, device, key_groups: Tensor | None = None) -> Tensor:
    if key_groups is not None:
        if labels is None:
            raise ValueError("fusedloss.info_nce (triton): key_groups needs labels (the queries' group ids)")
        if key_groups.shape != (m,) or key_groups.dtype != torch.int64:
            raise ValueError(f"fusedloss.info_nce (triton): key_groups must be an int64 tensor of shape ({m},), got "
                             f"{key_groups.dtype} {tuple(key_groups.shape)}")
    if labels is None:
        if m < n:
            raise ValueError(f"fusedloss.info_nce (triton): without labels (labels_i = i) there must be at least as "
                             f"many keys as queries, got N={n} and M={m}")
        return torch.arange(n, device=device)
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"fusedloss.info_nce (triton): labels must be an int64 tensor of shape ({n},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    return labels


def _check_norms(op: str, q_norm: Tensor, k_norm: Tensor, n: int, m: int, acc: torch.dtype) -> None:
    """The forward's row norms, as a NORMED backward takes them (this module's and siglip's)."""
    if q_norm.shape != (n,) or k_norm.shape != (m,) or q_norm.dtype != acc or k_norm.dtype != acc:
        raise ValueError(f"fusedloss.{op} (triton): query_norm and key_norm must be {acc} of shapes ({n},) and "
                         f"({m},), got {q_norm.dtype} {tuple(q_norm.shape)} and {k_norm.dtype} {tuple(k_norm.shape)}")


def _row_norms(x: Tensor, acc: torch.dtype) -> Tensor:
    """The rows' L2 norms (n,) in the accumulation dtype."""
    n, dim = x.shape
    out = torch.empty((n,), dtype=acc, device=x.device)
    if n == 0:
        return out
    block_r, block_d = 16, min(max(triton.next_power_of_2(max(dim, 1)), _MIN_DOT), 256)
    torch.library.wrap_triton(_row_norm_kernel)[(triton.cdiv(n, block_r),)](
        x, x.stride(0), out, n, dim, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


def _fwd(query, key, scale, cols, labels, key_groups, normed):
    _check_inputs(query, key, scale)
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    acc = _acc_dtype(query.dtype)
    labels = _labels_or_arange(labels, query.shape[0], key.shape[0], query.device, key_groups)
    q_norm, k_norm = (_row_norms(query, acc), _row_norms(key, acc)) if normed else (None, None)
    lse_rows, pos, npos = _lse(query, key, scale, acc, labels, key_groups, q_norm, k_norm)
    lse_cols = (_lse(key, query, scale, acc, None, None, k_norm, q_norm)[0] if cols
                else torch.empty((0,), dtype=acc, device=query.device))
    return lse_rows, lse_cols, pos, npos, q_norm, k_norm


def info_nce_lse_fwd(query: Tensor, key: Tensor, scale: Tensor, cols: bool, labels: Tensor | None = None,
                     key_groups: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lse_rows (N,) = logsumexp_j scale q_i . k_j, with cols lse_cols (M,) = logsumexp_i of the same (else
    an empty (0,) tensor), pos (N,) = scale q_i . k_{labels_i} (labels None: i; with key_groups the mean over
    the keys whose group is labels_i), all in the accumulation dtype, and npos (N,) int64, the count of
    positives. scale is a 0-dim tensor read on the device; labels are not range-checked (no sync): a query
    without positives gets a NaN pos."""
    return _fwd(query, key, scale, cols, labels, key_groups, normed=False)[:4]


def info_nce_lse_normed_fwd(query: Tensor, key: Tensor, scale: Tensor, cols: bool, labels: Tensor | None = None,
                            key_groups: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                       Tensor]:
    """:func:`info_nce_lse_fwd` of the L2-normalized rows (``F.normalize``: x / max(|x|, 1e-12)) without
    normalized copies: the tiles' products run on the rows as they are (16-bit ones on the tensor cores)
    and are scaled by the rows' inverse norms after. Also returns the rows' norms, query_norm (N,) and
    key_norm (M,) in the accumulation dtype, for the backward."""
    return _fwd(query, key, scale, cols, labels, key_groups, normed=True)


def _grad(a: Tensor, b: Tensor, scale: Tensor, g_a: Tensor | None, lse_a: Tensor | None, g_b: Tensor | None,
          lse_b: Tensor | None, acc: torch.dtype, shift: Tensor | None, labels: Tensor, u: Tensor | None,
          npos: Tensor, key_groups: Tensor | None, a_is_query: bool, a_norm: Tensor | None = None,
          b_norm: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """scale sum_b P_ab B_b for every row of A (A's dtype) and, with a shift (the rows' c of (3')), the
    per-program partials of (3') for A's own direction. u (the positives' gradient, None: none) and
    labels index the query side: A's rows when a_is_query, else B's. With a_norm and b_norm, the
    gradient of the raw rows of A through their normalization."""
    n_a, dim = a.shape
    grad = torch.empty((n_a, dim), dtype=a.dtype, device=a.device)
    block_a, block_b, block_d, single_d, num_warps, num_stages = _config("bwd", a.dtype, dim)
    n_programs = triton.cdiv(n_a, block_a)
    with_dscale = shift is not None
    dscale_part = torch.empty((n_programs,), dtype=torch.float64, device=a.device) if with_dscale else None
    if grad.numel() == 0:
        if dscale_part is not None:  # no rows, or D == 0: every product is 0 (and so is pos)
            dscale_part.zero_()
        return grad, dscale_part
    # The scratch of the larger-D path (see the kernel); a read-only stand-in, never touched, otherwise.
    scratch_in_grad = not single_d and a.dtype == acc
    scratch = a if single_d or scratch_in_grad else torch.empty((n_a, dim), dtype=acc, device=a.device)
    # Absent direction's tensors get read-only stand-ins that are never read.
    has_a, has_b = g_a is not None, g_b is not None
    g_a_arg, lse_a_arg = (g_a, lse_a) if has_a else (lse_b, lse_b)
    g_b_arg, lse_b_arg = (g_b, lse_b) if has_b else (lse_a, lse_a)
    u_arg = u if u is not None else g_a_arg
    torch.library.wrap_triton(_info_nce_grad_kernel)[(n_programs,)](
        a,
        a.stride(0),
        b,
        b.stride(0),
        scale,
        g_a_arg,
        g_a_arg.stride(0),
        lse_a_arg,
        lse_a_arg.stride(0),
        g_b_arg,
        g_b_arg.stride(0),
        lse_b_arg,
        lse_b_arg.stride(0),
        labels,
        key_groups if key_groups is not None else labels,  # never read without HAS_GROUPS
        npos,
        u_arg,
        u_arg.stride(0),
        shift if shift is not None else lse_a_arg,
        grad,
        scratch,
        dscale_part if with_dscale else lse_a_arg,
        a_norm if a_norm is not None else lse_a_arg,  # never read without NORMED
        b_norm if b_norm is not None else lse_a_arg,
        n_a,
        b.shape[0],
        dim,
        NORMED=a_norm is not None,
        HAS_A_TERM=has_a,
        HAS_B_TERM=has_b,
        A_POS=u is not None and a_is_query,
        B_POS=u is not None and not a_is_query,
        HAS_GROUPS=key_groups is not None,
        HAS_DSCALE=with_dscale,
        SCRATCH_IN_GRAD=scratch_in_grad,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        SINGLE_D=single_d,
        FP32_PRECISION=_fp32_precision(),
        INTERPRETED=INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return grad, dscale_part


def _bwd(grad_rows, grad_cols, grad_pos, query, key, q_norm, k_norm, scale, lse_rows, lse_cols, pos, npos,
         labels, key_groups):
    _check_inputs(query, key, scale)
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    acc = _acc_dtype(query.dtype)
    n, m = query.shape[0], key.shape[0]
    if grad_rows.shape != (n,) or lse_rows.shape != (n,) or pos.shape != (n,):
        raise ValueError(f"fusedloss.info_nce (triton): grad_rows, lse_rows and pos must have shape ({n},), got "
                         f"{tuple(grad_rows.shape)}, {tuple(lse_rows.shape)} and {tuple(pos.shape)}")
    if grad_pos is not None and grad_pos.shape != (n,):
        raise ValueError(f"fusedloss.info_nce (triton): grad_pos must have shape ({n},), got {tuple(grad_pos.shape)}")
    if q_norm is not None:
        _check_norms("info_nce", q_norm, k_norm, n, m, acc)
    has_cols = grad_cols is not None
    if has_cols:
        if lse_cols is None:
            raise ValueError("fusedloss.info_nce (triton): grad_cols needs lse_cols (the forward with cols=True)")
        if grad_cols.shape != (m,) or lse_cols.shape != (m,):
            raise ValueError(f"fusedloss.info_nce (triton): grad_cols and lse_cols must have shape ({m},), got "
                             f"{tuple(grad_cols.shape)} and {tuple(lse_cols.shape)}")
    cols_g, cols_lse = (grad_cols, lse_cols) if has_cols else (None, None)
    labels = _labels_or_arange(labels, n, m, query.device, key_groups)
    # (3')'s shifts (info_nce_math.h shift_of): c_i = pos_i / scale where finite, else 0; the columns'
    # c'_j = c_j for j < N, else 0.
    c = pos / scale.to(acc)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    c_cols = None
    if has_cols:
        c_cols = torch.zeros((m,), dtype=acc, device=query.device)
        c_cols[: min(n, m)] = c[: min(n, m)]

    # (3') per row in the (Q, K) launch and, with the columns, per column in the (K, Q) launch.
    grad_query, dscale_rows = _grad(query, key, scale, grad_rows, lse_rows, cols_g, cols_lse, acc, c, labels,
                                    grad_pos, npos, key_groups, True, q_norm, k_norm)
    grad_key, dscale_cols = _grad(key, query, scale, cols_g, cols_lse, grad_rows, lse_rows, acc,
                                  c_cols, labels, grad_pos, npos, key_groups, False, k_norm, q_norm)
    # The per-program partials, summed by torch in a fixed order: deterministic, no sync. d scale in
    # scale's dtype (float64 from fusedloss.functional, rounded once).
    grad_scale = dscale_rows.sum()
    if dscale_cols is not None:
        grad_scale = grad_scale + dscale_cols.sum()
    return grad_query, grad_key, grad_scale.to(scale.dtype)


def info_nce_lse_bwd(
    grad_rows: Tensor,
    grad_cols: Tensor | None,
    grad_pos: Tensor | None,
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    lse_rows: Tensor,
    lse_cols: Tensor | None,
    pos: Tensor,
    npos: Tensor,
    labels: Tensor | None = None,
    key_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows_i lse_rows_i + sum_j grad_cols_j lse_cols_j + sum_i grad_pos_i pos_i:
    grad_query (N, D) and grad_key (M, D) in the inputs' dtype, grad_scale 0-dim in scale's dtype. grad_rows,
    grad_cols and grad_pos may be expanded (stride 0); pos, npos, labels and key_groups are the forward's.
    Deterministic: no atomics."""
    return _bwd(grad_rows, grad_cols, grad_pos, query, key, None, None, scale, lse_rows, lse_cols, pos, npos,
                labels, key_groups)


def info_nce_lse_normed_bwd(
    grad_rows: Tensor,
    grad_cols: Tensor | None,
    grad_pos: Tensor | None,
    query: Tensor,
    key: Tensor,
    query_norm: Tensor,
    key_norm: Tensor,
    scale: Tensor,
    lse_rows: Tensor,
    lse_cols: Tensor | None,
    pos: Tensor,
    npos: Tensor,
    labels: Tensor | None = None,
    key_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`info_nce_lse_bwd` of :func:`info_nce_lse_normed_fwd`: the gradients of the raw query and key
    rows, through their normalization (query_norm, key_norm: the forward's), each rounded once."""
    return _bwd(grad_rows, grad_cols, grad_pos, query, key, query_norm, key_norm, scale, lse_rows, lse_cols, pos,
                npos, labels, key_groups)
