"""Fused linear cross-entropy in Triton (fusedloss::linear_cross_entropy_{fwd,bwd}_triton): the loss of
Z = X W^T + b without Z in device memory. Every logits tile is computed by tl.dot into registers,
turned into statistics (forward) or into its gradient (backward) there, and dropped.

Notation: X (N, D) the input rows, W (V, D) the head, b (V,) its bias, y_i the target of row i
(y_i = target[i + 1] with shift, see _lce_targets), Z_iv = X_i . W_v + b_v the logits and G = dL/dZ.
The per-row math is cross_entropy_math.h's, through the jit helpers of fusedloss/triton/cross_entropy.py
with the same names and steps (1)-(5): _transform_logit, _row_loss, _grad_coefs, _grad_elements,
_grad_target, _dead_row_fill.

Forward (_lce_fwd_kernel, then _lce_fwd_merge_kernel):
  a program owns BLOCK_N rows and one of n_splits contiguous ranges of the vocabulary; over its range,
  BLOCK_V columns at a time, it keeps each row's online (m, s, sum_wd, sum_w) of step (2), as
  _row_stats does along a row, and the target's z_y (the one tile column equal to y_i). Splits exist
  so that few rows still fill the GPU; their partial stats (n_splits, 5, N) are merged by one program
  per row block in split order (merge_stats of the header), then (3) gives loss, lse and the saved
  stats (m, log_s). O(N * n_splits) floats; no (N, V) anything. With the extras (step (7)) each
  program also keeps sum_ed = sum exp(z - m) (z - m), a sixth partial, merged likewise, and the merge
  gives logprob and entropy (stats (N, 4) = (m, log_s, logprob, entropy)).
Backward: with g_i = dL/dloss_i and g_lse_i = dL/dlse_i, G_i is step (4)-(5) of the tile's recomputed
logits and the saved (m_i, log_s_i), plus (7)'s terms of the extras' gradients (g_lp_i, g_H_i, with the
saved entropy H_i) where asked for. Then
  dX = G W      (_lce_bwd_dx_kernel): a program owns BLOCK_N rows x BLOCK_DO columns of D and loops
                over the vocabulary: recompute the (BLOCK_N, BLOCK_V) logits tile (the full D),
                G tile, acc += G_tile W[vocab tile, its D columns];
  dW = G^T X    (_lce_bwd_dw_kernel): a program owns BLOCK_V classes x BLOCK_DO columns of D and loops
  db = sum_i G_i over the rows likewise; the programs of the first D block also sum G for db.
Each output element has one writer and each sum runs in a fixed order: no atomics, bitwise
reproducible run to run. Accumulators are fp32 (fp64 for fp64) registers, stored once in the output
dtype: no fp32 (V, D) or (N, D) temporary for 16-bit parameters.

The cost of that ownership: a program's accumulator holds BLOCK_DO of the D columns, but the logits tile
it needs takes all of D, so each backward kernel recomputes the logits ceil(D / BLOCK_DO) times:
about (3 + 2 ceil(D / BLOCK_DO)) * 2 N D V flops for forward + backward against 6 N D V for the chunked
cuBLAS path (no recomputation for D <= BLOCK_DO; 16x the logits GEMM per backward kernel at D = 4096,
BLOCK_DO = 256). What it buys is memory: O(N + V) floats beyond inputs and gradients. Whether it wins
time at a given (N, D, V) is for a GPU measurement (bench/bench_linear_cross_entropy.py); the default
backend on CUDA tensors stays the chunked one until then.

Precision:
- bfloat16/float16 logits: tl.dot of 16-bit operands on tensor cores, fp32 accumulation (a product
  of two 16-bit values is exact in fp32).
- G enters the gradient products rounded: bf16 G (round to nearest even, cast_rtne) for bf16, as the
  chunked cuBLAS path and torch's chunked path round it; for float16, TF32 (fp32 G and operands on
  tensor cores, 10 mantissa bits like fp16 but fp32's exponent range: a G scaled by 1/denominator
  would fall into fp16's subnormals).
- float32 follows torch's matmul setting: TF32 when torch.backends.cuda.matmul.allow_tf32 (that is,
  torch.get_float32_matmul_precision() != "highest"), else IEEE fp32 FMAs (input_precision="ieee", the
  default, as accurate as a CPU loop, off the tensor cores).
- float64 is not handled here (the triton backend runs it through the chunked path).
Under TRITON_INTERPRET=1, whose tl.dot gives garbage for bfloat16 operands, 16-bit operands are widened
to fp32 first: the products are the same exact values, so the interpreter runs the GPU's arithmetic up
to the order of the fp32 sums.

Optional gradient filtering (grad_filter > 0, off by default): a G tile whose every |G| is below
grad_filter skips its gradient products (CCE's filter: far-from-target softmax entries below the
gradient dtype's resolution). The logits are still recomputed; only the products are skipped, so it
trades exactness for speed only where the gradient is that small.

Only kernels and their launch helpers live here (no import from fusedloss.ops); the ops are registered
with torch.library.triton_op in fusedloss/ops/linear_cross_entropy.py, and every launch goes through
torch.library.wrap_triton. No host syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch import Tensor

# A jit helper keeps its own name: torch.compile copies the kernel source with its helpers under
# their __name__, so an alias would be an undefined name in the compiled kernel.
from fusedloss.triton._common import INTERPRET as _INTERPRET
from fusedloss.triton._common import cast_rtne, param
from fusedloss.triton.cross_entropy import (_dead_row_fill, _entropy_term, _extras_coefs, _grad_coefs, _grad_elements,
                                            _grad_target, _options, _row_loss, _scalar_args, _transform_logit)

__all__ = ["linear_cross_entropy_fwd", "linear_cross_entropy_bwd"]

# Under the interpreter one small configuration (each program runs in Python; numpy does the tile
# arithmetic, so larger tiles cost little and fewer programs run). Tests change it to cover more
# blocks per dimension.
INTERPRET_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32, "BLOCK_DO": 32}

# Hopper tile sets (H100/H200: 132 SMs, 227 KB of shared memory a block and 64K 32-bit registers per SM,
# dense bf16 tensor cores ~990 TFLOP/s), one set per kind of operand, each config (BLOCK_N, BLOCK_V,
# BLOCK_K[, BLOCK_DO], stages, warps). Reasoning:
# - forward: a GEMM with an epilogue per tile. 128 x 128 fp32 accumulators over 8 warps (two warpgroups
#   of wgmma) = 64 registers a thread, leaving room for the stats; BLOCK_K = 64 bf16 = 128-byte rows
#   (full swizzle). Stages: (128 + 128) x 64 x 2 B = 32 KB per stage, 3-4 stages fit. 128 x 256 halves
#   the reloads of X per vocabulary column for large V; 64 x 128 for few rows.
# - backward: two accumulators live at once (the logits tile and the (rows, BLOCK_DO) gradient block),
#   so the tiles are smaller: 64 x 128 logits + 64 x 128 (or 64 x 256) gradient over 8 warps. Larger
#   BLOCK_DO means fewer recomputations of the logits (ceil(D / BLOCK_DO)), bounded by registers.
# - tf32 (float32 operands on the tensor cores): the same tiles with BLOCK_K = 32, the same 128-byte
#   rows; at BLOCK_K = 64 three of the four forward configs need 240-288 KB of shared memory.
# - ieee (float32 products on the FMA units, operands in registers): smaller tiles, BLOCK_K = 32. The
#   16-bit tiles spill 0.1-25 KB a thread there (ptxas, sm_90).
# tests/test_triton_aot.py compiles every config for sm_90 and fails on one that does not fit in shared
# memory; its script prints each config's registers and spills.
_FWD_CONFIGS = {
    "16bit": [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 128, 64, 4, 4), (64, 256, 64, 3, 8)],
    "tf32": [(128, 128, 32, 4, 8), (128, 256, 32, 3, 8), (64, 128, 32, 4, 4), (64, 256, 32, 3, 8)],
    "ieee": [(64, 64, 32, 3, 4), (64, 128, 32, 3, 8), (128, 64, 32, 3, 8), (32, 128, 32, 3, 4)],
}
_BWD_CONFIGS = {
    "16bit": [(64, 128, 64, 128, 3, 8), (64, 128, 64, 256, 3, 8), (128, 64, 64, 128, 3, 8), (64, 64, 64, 256, 3, 4)],
    "tf32": [(64, 128, 32, 128, 3, 8), (64, 128, 32, 256, 3, 8), (128, 64, 32, 128, 3, 8), (64, 64, 32, 128, 3, 4)],
    "ieee": [(64, 64, 32, 128, 3, 8), (64, 64, 32, 64, 3, 8), (64, 32, 32, 64, 3, 4)],
}
# The vocabulary split's granularity: a multiple of every BLOCK_V above.
_SPLIT_ALIGN = 256
_MERGE_BLOCK = 128


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lce_targets(target_ptr, rows, n_rows, seq_len, num_classes, ignore_index, SHIFT: tl.constexpr):
    # _row_target for a block of rows. SHIFT: row r = (sequence b, position t = r % seq_len) scores
    # target[r + 1] (position t + 1 of the same sequence); the last position of each sequence has no
    # next token and counts as ignored. Rows past n_rows are ignored too (never stored).
    row_ok = rows < n_rows
    if SHIFT:
        has_next = row_ok & ((rows % seq_len) != seq_len - 1)
        y = tl.load(target_ptr + rows + 1, mask=has_next, other=ignore_index)
    else:
        y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < num_classes)
    active = in_range & (y != ignore_index)
    y_safe = tl.where(active, y, 0)
    return y, ignored, in_range, active, y_safe


@triton.jit
def _dot_operand(v, ROUND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # v rounded to ROUND_DTYPE (to nearest even), then in the dtype tl.dot takes.
    return cast_rtne(v, ROUND_DTYPE).to(DOT_DTYPE)


@triton.jit
def _logits_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, rows, cols, n_rows, num_classes,
                 D, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # The raw logits X[rows] W[cols]^T + b[cols] of one tile, accumulated over D in BLOCK_K steps.
    # Out-of-range rows and columns read zeros (their logits are masked by the callers).
    row_mask = rows < n_rows
    col_mask = cols < num_classes
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = ks < D
        x = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wd, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _merge_stats(m_a, s_a, wd_a, w_a, m_b, s_b, wd_b, w_b):
    # merge_stats of cross_entropy_math.h, per row: the union of two pieces of a row relative to the
    # larger max; a piece whose max is -inf adds nothing to s. shift_wd: a piece's sum w (z - m)
    # re-expressed relative to the merged max (alone when the piece has no weight mass).
    m = tl.maximum(m_a, m_b)
    dead = m == float("-inf")
    m_ref = tl.where(dead, 0.0, m)
    sa = tl.where(m_a == float("-inf"), 0.0, s_a * tl.exp(m_a - m_ref))
    sb = tl.where(m_b == float("-inf"), 0.0, s_b * tl.exp(m_b - m_ref))
    s = tl.where(dead, 0.0, sa + sb)
    shift_a = tl.where(w_a == 0.0, wd_a, wd_a + w_a * (m_a - m_ref))
    shift_b = tl.where(w_b == 0.0, wd_b, wd_b + w_b * (m_b - m_ref))
    sum_wd = tl.where(dead, wd_a + wd_b, shift_a + shift_b)
    return m, s, sum_wd, w_a + w_b


@triton.jit
def _merge_ed(m_a, s_a, ed_a, m_b, s_b, ed_b, m):
    # (7)'s sum_ed of two pieces relative to the merged max m: exp(m_x - m) (ed_x + (m_x - m) s_x) each,
    # nothing from a piece whose max is -inf (it has no mass).
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.where(m_a == float("-inf"), 0.0, tl.exp(m_a - m_ref) * (ed_a + (m_a - m_ref) * s_a))
    eb = tl.where(m_b == float("-inf"), 0.0, tl.exp(m_b - m_ref) * (ed_b + (m_b - m_ref) * s_b))
    return ea + eb


@triton.jit
def _row_extras(grad_logprob_ptr, grad_logprob_stride, grad_entropy_ptr, grad_entropy_stride, stats_ptr, rows,
                row_ok, active, nll, p_scale, ACC: tl.constexpr, STATS: tl.constexpr,
                HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    # (7): the extras' gradients of a block of rows folded into nll and p_scale; g_h and the saved
    # entropy for _entropy_term (zeros when not asked for).
    r64 = rows.to(tl.int64)
    g_lp = tl.zeros(rows.shape, ACC)
    g_h = tl.zeros(rows.shape, ACC)
    entropy = tl.zeros(rows.shape, ACC)
    if HAS_GRAD_LOGPROB:
        g_lp = tl.load(grad_logprob_ptr + r64 * grad_logprob_stride, mask=row_ok, other=0.0).to(ACC)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + r64 * grad_entropy_stride, mask=row_ok, other=0.0).to(ACC)
        entropy = tl.load(stats_ptr + STATS * r64 + 3, mask=row_ok, other=0.0).to(ACC)
    g_lp = tl.where(active, g_lp, 0.0)
    g_h = tl.where(active, g_h, 0.0)
    if HAS_GRAD_LOGPROB or HAS_GRAD_ENTROPY:
        nll, p_scale = _extras_coefs(nll, p_scale, g_lp, g_h, entropy)
    return nll, p_scale, g_h, entropy


@triton.jit
def _row_grad_setup(target_ptr, weight_ptr, weight_sum_ptr, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_lse_ptr,
                    grad_lse_stride, rows, n_rows, seq_len, num_classes, ignore_index, eps, z_loss,
                    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, SHIFT: tl.constexpr,
                    STATS: tl.constexpr):
    # Per row of a block: the target, the saved stats and the gradient coefficients of step (4).
    y, ignored, in_range, active, y_safe = _lce_targets(target_ptr, rows, n_rows, seq_len, num_classes,
                                                        ignore_index, SHIFT)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    g = tl.load(grad_loss_ptr + r64 * grad_loss_stride, mask=row_ok, other=0.0).to(ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(grad_lse_ptr + r64 * grad_lse_stride, mask=row_ok, other=0.0).to(ACC)
    else:
        g_lse = tl.zeros(rows.shape, ACC)
    m = tl.load(stats_ptr + STATS * r64, mask=row_ok, other=0.0).to(ACC)
    log_s = tl.load(stats_ptr + STATS * r64 + 1, mask=row_ok, other=0.0).to(ACC)
    # inactive rows: finite stand-ins (their gradient is replaced by _dead_row_fill)
    m = tl.where(active, m, 0.0)
    log_s = tl.where(active, log_s, 0.0)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
    else:
        w_y = tl.full(rows.shape, 1.0, ACC)
        weight_sum = tl.cast(num_classes, ACC)
    nll, smooth, lse_term, p_scale = _grad_coefs(g, g_lse, m, log_s, w_y, weight_sum, eps, z_loss, num_classes, ACC)
    return y, ignored, in_range, active, m, log_s, w_y, weight_sum, nll, smooth, lse_term, p_scale


@triton.jit
def _grad_tile(x, cols, col_mask, y, ignored, in_range, active, weight_ptr, m, log_s, w_y, weight_sum, nll, smooth,
               lse_term, p_scale, g_h, entropy, inv_softcap, softcap_scale, inv_softcap_scale, inv_temperature,
               ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_GRAD_ENTROPY: tl.constexpr):
    # G = dL/dx of a tile of raw logits x (steps (1), (4), (5)): _grad_elements for every element, the
    # target column by _grad_target from its x_y (one element of the row per tile at most), zeros for
    # ignored rows and out-of-range columns, NaN rows for targets outside [0, V).
    grad = _grad_elements(x, weight_ptr, cols[None, :], col_mask[None, :], m[:, None], log_s[:, None],
                          p_scale[:, None], smooth[:, None], inv_softcap, softcap_scale, inv_softcap_scale,
                          inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    if HAS_GRAD_ENTROPY:
        grad += _entropy_term(x, m[:, None], log_s[:, None], g_h[:, None], 0.0, inv_softcap, softcap_scale,
                              inv_softcap_scale, inv_temperature, HAS_SOFTCAP)
    is_y = cols[None, :] == y[:, None]
    x_y = tl.sum(tl.where(is_y, x, 0.0), axis=1)
    z_y = _transform_logit(x_y, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
    grad_y = _grad_target(z_y, w_y, m, log_s, nll, smooth, lse_term, weight_sum, inv_softcap_scale, inv_temperature,
                          HAS_SOFTCAP)
    if HAS_GRAD_ENTROPY:
        grad_y += _entropy_term(x_y, m, log_s, g_h, g_h * entropy, inv_softcap, softcap_scale, inv_softcap_scale,
                                inv_temperature, HAS_SOFTCAP)
    grad = tl.where(is_y, grad_y[:, None], grad)
    grad = tl.where(active[:, None], grad, _dead_row_fill(grad, ignored[:, None], in_range[:, None]))
    return tl.where(col_mask[None, :], grad, 0.0)


@triton.jit
def _keep_tile(grad, filter_eps, FILTER: tl.constexpr):
    # grad_filter: False when every |G| of the tile is below filter_eps (NaN keeps the tile).
    if FILTER:
        largest = tl.max(tl.max(tl.abs(grad), axis=1), axis=0)
        return (largest >= filter_eps) | (largest != largest)
    else:
        return True


# ----------------------------------------------------------------------------------------------
# Forward: partial stats per (row block, vocabulary split), then the merge and step (3)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lce_fwd_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, target_ptr, weight_ptr, part_ptr,
    n_rows, D, num_classes, seq_len, ignore_index, v_per_split,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
    inv_temperature_lo,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SHIFT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    PARTS: tl.constexpr = 6 if HAS_ENTROPY else 5
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    y, ignored, in_range, active, y_safe = _lce_targets(target_ptr, rows, n_rows, seq_len, num_classes, ignore_index,
                                                        SHIFT)

    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    sum_wd = tl.zeros((BLOCK_N,), ACC)
    sum_w = tl.zeros((BLOCK_N,), ACC)
    sum_ed = tl.zeros((BLOCK_N,), ACC)
    z_y = tl.zeros((BLOCK_N,), ACC)
    v_start = split * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, num_classes)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < v_stop
        x = _logits_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, rows, cols, n_rows,
                         num_classes, D, ACC, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = _transform_logit(x, inv_softcap, softcap_scale, inv_temperature, HAS_SOFTCAP)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        # (2), _row_stats' update with a block of rows: m, s; with label smoothing sum_wd, sum_w.
        z_masked = tl.where(mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_masked, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HAS_ENTROPY:
            # (7), as _row_stats: the sum so far relative to the new max, then the tile's e (z - m); a -inf
            # z adds 0, not 0 * -inf
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
            sum_ed = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe) * (sum_ed + shift * s))
            d_e = z_masked - m_safe[:, None]
            e = tl.exp(d_e)
            sum_ed += tl.sum(tl.where(e > 0.0, e * d_e, 0.0), axis=1)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z_masked - m_safe[:, None]), axis=1)
        if HAS_SMOOTHING:
            d = tl.where(mask[None, :], z - m_safe[:, None], 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                sum_w_chunk = tl.sum(w, axis=0)
                wd = tl.sum(w[None, :] * d, axis=1)
            else:
                sum_w_chunk = tl.cast(tl.minimum(v_stop - v0, BLOCK_V), ACC)
                wd = tl.sum(d, axis=1)
            m_old = tl.where(m == float("-inf"), m_safe, m)
            sum_wd += sum_w * (m_old - m_safe)
            sum_wd += wd
            sum_w += sum_w_chunk
        m = m_new

    row_mask = rows < n_rows
    base = part_ptr + split.to(tl.int64) * PARTS * n_rows + rows
    tl.store(base, m, mask=row_mask)
    tl.store(base + n_rows, s, mask=row_mask)
    tl.store(base + 2 * n_rows, sum_wd, mask=row_mask)
    tl.store(base + 3 * n_rows, sum_w, mask=row_mask)
    tl.store(base + 4 * n_rows, z_y, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(base + 5 * n_rows, sum_ed, mask=row_mask)


@triton.jit
def _lce_fwd_merge_kernel(
    part_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, stats_ptr, logprob_ptr, entropy_ptr, n_rows, num_classes,
    seq_len, ignore_index, n_splits, smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SHIFT: tl.constexpr, EXTRAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The splits' pieces in split order (fixed: bitwise reproducible), then (3) per row, and (7) with
    # the extras (into stats' columns 2-3 and the outputs of their own).
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    PARTS: tl.constexpr = 6 if EXTRAS else 5
    STATS: tl.constexpr = 4 if EXTRAS else 2
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    eps = param(smoothing_hi, smoothing_lo, ACC)
    z_loss = param(z_loss_hi, z_loss_lo, ACC)
    y, ignored, in_range, active, y_safe = _lce_targets(target_ptr, rows, n_rows, seq_len, num_classes, ignore_index,
                                                        SHIFT)
    m = tl.load(part_ptr + rows, mask=row_mask, other=float("-inf"))
    s = tl.load(part_ptr + n_rows + rows, mask=row_mask, other=0.0)
    sum_wd = tl.load(part_ptr + 2 * n_rows + rows, mask=row_mask, other=0.0)
    sum_w = tl.load(part_ptr + 3 * n_rows + rows, mask=row_mask, other=0.0)
    z_y = tl.load(part_ptr + 4 * n_rows + rows, mask=row_mask, other=0.0)
    sum_ed = tl.zeros((BLOCK,), ACC)
    if EXTRAS:
        sum_ed = tl.load(part_ptr + 5 * n_rows + rows, mask=row_mask, other=0.0)
    for split in range(1, n_splits):
        base = part_ptr + split * PARTS * n_rows + rows  # the partials hold far fewer than 2^31 floats
        m_b = tl.load(base, mask=row_mask, other=float("-inf"))
        s_b = tl.load(base + n_rows, mask=row_mask, other=0.0)
        wd_b = tl.load(base + 2 * n_rows, mask=row_mask, other=0.0)
        w_b = tl.load(base + 3 * n_rows, mask=row_mask, other=0.0)
        m_a, s_a = m, s
        m, s, sum_wd, sum_w = _merge_stats(m, s, sum_wd, sum_w, m_b, s_b, wd_b, w_b)
        if EXTRAS:
            ed_b = tl.load(base + 5 * n_rows, mask=row_mask, other=0.0)
            sum_ed = _merge_ed(m_a, s_a, sum_ed, m_b, s_b, ed_b, m)
        z_y += tl.load(base + 4 * n_rows, mask=row_mask, other=0.0)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        w_y = tl.full((BLOCK,), 1.0, ACC)
    s_row = s
    loss, lse, m, log_s = _row_loss(m, s, sum_wd, sum_w, z_y, w_y, eps, z_loss, num_classes, active, ACC,
                                    HAS_SMOOTHING)
    tl.store(loss_ptr + rows, _dead_row_fill(loss, ignored, in_range), mask=row_mask)
    tl.store(lse_ptr + rows, _dead_row_fill(lse, ignored, in_range), mask=row_mask)
    tl.store(stats_ptr + STATS * rows, _dead_row_fill(m, ignored, in_range), mask=row_mask)
    tl.store(stats_ptr + STATS * rows + 1, _dead_row_fill(log_s, ignored, in_range), mask=row_mask)
    if EXTRAS:
        logprob = _dead_row_fill((z_y - m) - log_s, ignored, in_range)
        entropy = _dead_row_fill(log_s - sum_ed / tl.where(active, s_row, 1.0), ignored, in_range)
        tl.store(stats_ptr + STATS * rows + 2, logprob, mask=row_mask)
        tl.store(stats_ptr + STATS * rows + 3, entropy, mask=row_mask)
        tl.store(logprob_ptr + rows, logprob, mask=row_mask)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dX by row blocks, dW and db by vocabulary blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lce_bwd_dx_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, target_ptr, weight_ptr, weight_sum_ptr, stats_ptr,
    grad_loss_ptr, grad_loss_stride, grad_lse_ptr, grad_lse_stride, grad_logprob_ptr, grad_logprob_stride,
    grad_entropy_ptr, grad_entropy_stride, dx_ptr,
    n_rows, D, num_classes, seq_len, ignore_index, filter_eps,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
    inv_temperature_lo,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr, HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, STATS: tl.constexpr,
    SHIFT: tl.constexpr, FILTER: tl.constexpr, DOT_DTYPE: tl.constexpr,
    GRAD_DOT_DTYPE: tl.constexpr, G_ROUND_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GRAD_INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = (tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)).to(tl.int64)
    d_mask = dcols < D
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)
    y, ignored, in_range, active, m, log_s, w_y, weight_sum, nll, smooth, lse_term, p_scale = _row_grad_setup(
        target_ptr, weight_ptr, weight_sum_ptr, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_lse_ptr,
        grad_lse_stride, rows, n_rows, seq_len, num_classes, ignore_index, eps, z_loss, ACC, HAS_WEIGHT, HAS_GRAD_LSE,
        SHIFT, STATS)
    nll, p_scale, g_h, entropy = _row_extras(grad_logprob_ptr, grad_logprob_stride, grad_entropy_ptr,
                                             grad_entropy_stride, stats_ptr, rows, rows < n_rows, active, nll,
                                             p_scale, ACC, STATS, HAS_GRAD_LOGPROB, HAS_GRAD_ENTROPY)

    acc = tl.zeros((BLOCK_N, BLOCK_DO), ACC)
    for v0 in range(0, num_classes, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < num_classes
        x = _logits_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, rows, cols, n_rows,
                         num_classes, D, ACC, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        grad = _grad_tile(x, cols, col_mask, y, ignored, in_range, active, weight_ptr, m, log_s, w_y, weight_sum, nll,
                          smooth, lse_term, p_scale, g_h, entropy, inv_softcap, softcap_scale, inv_softcap_scale,
                          inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_GRAD_ENTROPY)
        if _keep_tile(grad, filter_eps, FILTER):
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv + dcols[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            acc = tl.dot(_dot_operand(grad, G_ROUND_DTYPE, GRAD_DOT_DTYPE), w.to(GRAD_DOT_DTYPE), acc,
                         input_precision=GRAD_INPUT_PRECISION)
    out = dx_ptr + rows.to(tl.int64)[:, None] * D + dcols[None, :]  # dX is contiguous
    tl.store(out, cast_rtne(acc, dx_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & d_mask[None, :])


@triton.jit
def _lce_bwd_dw_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, target_ptr, weight_ptr, weight_sum_ptr, stats_ptr,
    grad_loss_ptr, grad_loss_stride, grad_lse_ptr, grad_lse_stride, grad_logprob_ptr, grad_logprob_stride,
    grad_entropy_ptr, grad_entropy_stride, dw_ptr, db_ptr,
    n_rows, D, num_classes, seq_len, ignore_index, filter_eps,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
    inv_temperature_lo,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr, HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, STATS: tl.constexpr,
    SHIFT: tl.constexpr, FILTER: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr, GRAD_DOT_DTYPE: tl.constexpr, G_ROUND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    pid_d = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < num_classes
    dcols = (pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)).to(tl.int64)
    d_mask = dcols < D
    eps, z_loss, inv_temperature, inv_softcap, softcap_scale, inv_softcap_scale = _options(
        smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, inv_temperature_hi,
        inv_temperature_lo, ACC, HAS_SOFTCAP)

    acc = tl.zeros((BLOCK_V, BLOCK_DO), ACC)
    acc_b = tl.zeros((BLOCK_V,), ACC)
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        y, ignored, in_range, active, m, log_s, w_y, weight_sum, nll, smooth, lse_term, p_scale = _row_grad_setup(
            target_ptr, weight_ptr, weight_sum_ptr, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_lse_ptr,
            grad_lse_stride, rows, n_rows, seq_len, num_classes, ignore_index, eps, z_loss, ACC, HAS_WEIGHT,
            HAS_GRAD_LSE, SHIFT, STATS)
        nll, p_scale, g_h, entropy = _row_extras(grad_logprob_ptr, grad_logprob_stride, grad_entropy_ptr,
                                                 grad_entropy_stride, stats_ptr, rows, rows < n_rows, active, nll,
                                                 p_scale, ACC, STATS, HAS_GRAD_LOGPROB, HAS_GRAD_ENTROPY)
        x = _logits_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, rows, cols, n_rows,
                         num_classes, D, ACC, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        grad = _grad_tile(x, cols, col_mask, y, ignored, in_range, active, weight_ptr, m, log_s, w_y, weight_sum, nll,
                          smooth, lse_term, p_scale, g_h, entropy, inv_softcap, softcap_scale, inv_softcap_scale,
                          inv_temperature, ACC, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_GRAD_ENTROPY)
        if BIAS_GRAD:
            acc_b += tl.sum(grad, axis=0)  # db sums G in fp32, before any rounding
        if WEIGHT_GRAD:
            if _keep_tile(grad, filter_eps, FILTER):
                xd = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + dcols[None, :] * stride_xd,
                             mask=(rows < n_rows)[:, None] & d_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(_dot_operand(grad, G_ROUND_DTYPE, GRAD_DOT_DTYPE)), xd.to(GRAD_DOT_DTYPE), acc,
                             input_precision=GRAD_INPUT_PRECISION)
    if WEIGHT_GRAD:
        out = dw_ptr + cols.to(tl.int64)[:, None] * D + dcols[None, :]  # dW is contiguous
        tl.store(out, cast_rtne(acc, dw_ptr.dtype.element_ty), mask=col_mask[:, None] & d_mask[None, :])
    if BIAS_GRAD:
        tl.store(db_ptr + cols, cast_rtne(acc_b, db_ptr.dtype.element_ty), mask=col_mask & (pid_d == 0))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _operands(dtype: torch.dtype, precision: str) -> str:
    """The config set (_FWD_CONFIGS) of the logits products for inputs of ``dtype``."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if precision == "tf32" else "ieee"


def _autotuned(kernel, config_sets, names):
    """The kernel autotuned over the config set of its operands (keyed on INPUT_PRECISION too: torch's
    TF32 setting may change between calls with the same shapes and dtypes)."""
    if _INTERPRET:
        return kernel
    configs, positions = [], {}
    for kind, tiles in config_sets.items():
        positions[kind] = tuple(range(len(configs), len(configs) + len(tiles)))
        configs += [triton.Config(dict(zip(names, c[:len(names)])), num_stages=c[-2], num_warps=c[-1]) for c in tiles]

    # Picks from the configs it is given, by position: under torch.compile, Dynamo traces this function
    # and turns its result back into the configs it handed in.
    def prune(configs, named_args, **kwargs):
        return [configs[i] for i in positions[_operands(named_args["x_ptr"].dtype, kwargs["INPUT_PRECISION"])]]

    return triton.autotune(configs=configs, key=["D", "num_classes", "INPUT_PRECISION"],
                           prune_configs_by={"early_config_prune": prune})(kernel)


_FWD_NAMES = ("BLOCK_N", "BLOCK_V", "BLOCK_K")
_BWD_NAMES = ("BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_DO")
_fwd_kernel = _autotuned(_lce_fwd_kernel, _FWD_CONFIGS, _FWD_NAMES)
_dx_kernel = _autotuned(_lce_bwd_dx_kernel, _BWD_CONFIGS, _BWD_NAMES)
_dw_kernel = _autotuned(_lce_bwd_dw_kernel, _BWD_CONFIGS, _BWD_NAMES)


def _blocks(names) -> dict:
    """Explicit block sizes under the interpreter; autotuned (empty) on a GPU."""
    return {k: INTERPRET_BLOCKS[k] for k in names} if _INTERPRET else {}


def _launch_options() -> dict:
    return {"num_warps": 1} if _INTERPRET else {}


def _dot_dtypes(dtype: torch.dtype):
    """(DOT_DTYPE, INPUT_PRECISION) of the logits products and (GRAD_DOT_DTYPE, G_ROUND_DTYPE,
    GRAD_INPUT_PRECISION) of the gradient products, for parameters of ``dtype`` (see the module
    docstring, Precision)."""
    if dtype not in _TL_DTYPE:
        raise RuntimeError(f"fusedloss: the fused Triton linear cross-entropy takes float32, bfloat16 or float16, "
                           f"got {dtype}")
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET else "ieee"
        return tl.float32, precision, tl.float32, tl.float32, precision
    fp32_tc = "ieee" if _INTERPRET else "tf32"
    dot = tl.float32 if _INTERPRET else _TL_DTYPE[dtype]
    if dtype == torch.bfloat16:
        return dot, "ieee", dot, tl.bfloat16, "ieee"
    return dot, "ieee", tl.float32, tl.float32, fp32_tc


_SM_COUNT: dict = {}


def _vocab_splits(n_rows: int, num_classes: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, columns per split): enough programs for the GPU when the rows are few (two per SM,
    counted with BLOCK_N = 64, the smallest of the tensor-core sets), each split at least one
    _SPLIT_ALIGN-column block. Under the interpreter four programs' worth (that exercises the merge at
    test sizes)."""
    align = INTERPRET_BLOCKS["BLOCK_V"] if _INTERPRET else _SPLIT_ALIGN
    if _INTERPRET or device.type != "cuda":
        target, min_block_n = 4, INTERPRET_BLOCKS["BLOCK_N"]
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        target, min_block_n = 2 * _SM_COUNT[index], 64
    row_blocks = triton.cdiv(max(n_rows, 1), min_block_n)
    vocab_blocks = triton.cdiv(num_classes, align)
    splits = max(1, min(vocab_blocks, triton.cdiv(target, row_blocks)))
    per_split = triton.cdiv(triton.cdiv(num_classes, splits), align) * align
    return triton.cdiv(num_classes, per_split), per_split


def _flags(linear_bias, weight, label_smoothing, softcap, seq_len) -> dict:
    return dict(HAS_BIAS=linear_bias is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
                HAS_SOFTCAP=softcap > 0.0, SHIFT=seq_len > 0)


def linear_cross_entropy_fwd(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    seq_len: int,
    extras: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (N,), lse (N,), stats (N, 2) = (m, log_s), float32, and (0,) twice; with ``extras``
    stats (N, 4) = (m, log_s, logprob, entropy) and logprob (N,), entropy (N,) as tensors of their own.

    input (N, D) and linear_weight (V, D) of one dtype, any strides; target (N,) int64 contiguous;
    linear_bias (V,); weight (V,) float32 contiguous. seq_len > 0 turns the shift on: row r scores
    target[r + 1] unless r is the last position of its sequence (r % seq_len == seq_len - 1). Ignored
    rows give zeros; a target outside [0, V) that is not ignore_index gives NaNs.
    """
    n_rows, D = input.shape
    num_classes = linear_weight.shape[0]
    device = input.device
    loss = torch.empty((n_rows,), dtype=torch.float32, device=device)
    lse = torch.empty((n_rows,), dtype=torch.float32, device=device)
    stats = torch.empty((n_rows, 4 if extras else 2), dtype=torch.float32, device=device)
    logprob = torch.empty((n_rows if extras else 0,), dtype=torch.float32, device=device)
    entropy = torch.empty((n_rows if extras else 0,), dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss, lse, stats, logprob, entropy
    dot, precision, *_ = _dot_dtypes(input.dtype)
    n_splits, per_split = _vocab_splits(n_rows, num_classes, device)
    part = torch.empty((n_splits, 6 if extras else 5, n_rows), dtype=torch.float32, device=device)
    stand_in = target  # read-only stand-in for absent tensors, never read
    scalars = _scalar_args(label_smoothing, z_loss, softcap, temperature)
    flags = _flags(linear_bias, weight, label_smoothing, softcap, seq_len)
    blocks = _blocks(_FWD_NAMES)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]), n_splits)

    torch.library.wrap_triton(_fwd_kernel)[grid](
        input, input.stride(0), input.stride(1), linear_weight, linear_weight.stride(0), linear_weight.stride(1),
        linear_bias if linear_bias is not None else stand_in, target, weight if weight is not None else stand_in,
        part, n_rows, D, num_classes, max(seq_len, 1), ignore_index, per_split, *scalars,
        **flags, DOT_DTYPE=dot, INPUT_PRECISION=precision, HAS_ENTROPY=extras, **blocks, **_launch_options())
    torch.library.wrap_triton(_lce_fwd_merge_kernel)[(triton.cdiv(n_rows, _MERGE_BLOCK),)](
        part, target, weight if weight is not None else stand_in, loss, lse, stats,
        logprob if extras else loss, entropy if extras else loss, n_rows, num_classes,
        max(seq_len, 1), ignore_index, n_splits, *scalars[:4],
        HAS_WEIGHT=flags["HAS_WEIGHT"], HAS_SMOOTHING=flags["HAS_SMOOTHING"], SHIFT=flags["SHIFT"], EXTRAS=extras,
        BLOCK=_MERGE_BLOCK, num_warps=4)
    return loss, lse, stats, logprob, entropy


def linear_cross_entropy_bwd(
    grad_loss: Tensor,
    grad_lse: Tensor | None,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    seq_len: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    grad_filter: float,
    grad_logprob: Tensor | None = None,
    grad_entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_loss_i loss_i + grad_lse_i lse_i (+ grad_logprob_i logprob_i + grad_entropy_i
    entropy_i) for input, linear_weight and linear_bias in their dtypes, contiguous (shape (0,) where not
    asked for). grad_loss, grad_lse, grad_logprob and grad_entropy are (N,) float32 with any stride (a
    mean's expanded scalar has stride 0); grad_entropy needs the forward's (N, 4) stats (extras)."""
    if grad_entropy is not None and stats.shape[1] != 4:
        raise RuntimeError("fusedloss: the entropy's gradient needs the forward's (N, 4) stats (extras=True)")
    n_rows, D = input.shape
    num_classes = linear_weight.shape[0]
    device = input.device
    bias_grad = bias_grad and linear_bias is not None
    dx = torch.empty((n_rows, D) if input_grad else (0,), dtype=input.dtype, device=device)
    dw = torch.empty((num_classes, D) if weight_grad else (0,), dtype=linear_weight.dtype, device=device)
    db_dtype = linear_bias.dtype if linear_bias is not None else input.dtype
    db = torch.empty((num_classes,) if bias_grad else (0,), dtype=db_dtype, device=device)
    if n_rows == 0:
        # no rows: zero weight and bias gradients (no program would write them)
        return dx, dw.zero_(), db.zero_()
    if D == 0 and not bias_grad:
        return dx, dw, db
    dot, precision, grad_dot, g_round, grad_precision = _dot_dtypes(input.dtype)
    stand_in = target
    weight_sum = weight.sum() if weight is not None else stand_in  # W = sum_j w_j on device, no sync
    scalars = _scalar_args(label_smoothing, z_loss, softcap, temperature)
    flags = _flags(linear_bias, weight, label_smoothing, softcap, seq_len)
    has_grad_lse = grad_lse is not None
    grad_lse_arg = grad_lse if has_grad_lse else grad_loss
    grad_logprob_arg = grad_logprob if grad_logprob is not None else grad_loss
    grad_entropy_arg = grad_entropy if grad_entropy is not None else grad_loss
    common = dict(**flags, HAS_GRAD_LSE=has_grad_lse, HAS_GRAD_LOGPROB=grad_logprob is not None,
                  HAS_GRAD_ENTROPY=grad_entropy is not None, STATS=stats.shape[1], FILTER=grad_filter > 0.0,
                  DOT_DTYPE=dot, GRAD_DOT_DTYPE=grad_dot, G_ROUND_DTYPE=g_round, INPUT_PRECISION=precision,
                  GRAD_INPUT_PRECISION=grad_precision, **_blocks(_BWD_NAMES), **_launch_options())
    head = (input, input.stride(0), input.stride(1), linear_weight, linear_weight.stride(0), linear_weight.stride(1),
            linear_bias if linear_bias is not None else stand_in, target, weight if weight is not None else stand_in,
            weight_sum, stats, grad_loss, grad_loss.stride(0), grad_lse_arg, grad_lse_arg.stride(0), grad_logprob_arg,
            grad_logprob_arg.stride(0), grad_entropy_arg, grad_entropy_arg.stride(0))
    tail = (n_rows, D, num_classes, max(seq_len, 1), ignore_index, float(grad_filter), *scalars)
    if input_grad and D > 0:
        def grid_dx(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_DO"]))

        torch.library.wrap_triton(_dx_kernel)[grid_dx](*head, dx, *tail, **common)
    if (weight_grad and D > 0) or bias_grad:
        # bias alone: one program per class block (the D blocks would only repeat its recomputation)
        d_blocks = weight_grad and D > 0

        def grid_dw(meta):
            return (triton.cdiv(num_classes, meta["BLOCK_V"]), triton.cdiv(D, meta["BLOCK_DO"]) if d_blocks else 1)

        torch.library.wrap_triton(_dw_kernel)[grid_dw](
            *head, dw if weight_grad else stand_in, db if bias_grad else stand_in, *tail,
            WEIGHT_GRAD=weight_grad and D > 0, BIAS_GRAD=bias_grad, **common)
    return dx, dw, db
