"""Triton kernels of the multi-class gap hinge loss (fusedloss::gap_loss_{fwd,bwd}_triton).

The per-row math follows csrc/include/fusedloss/gap_loss_math.h step by step, with its names:
  (1) h_j    = x_j - x_y + margin                       the gap of class j to the target
  (2) term_j = max(0, h_j)^p, 0 unless h_j > 0 (a NaN gap adds nothing)
  (3) loss   = scale * sum_{j != y} term_j               (mode "sum")
      loss   = scale * max_{j != y} term_j               (mode "max", Crammer-Singer)
      scale  = w_y / C with class_normalize, w_y otherwise
  (4) slope_j = [h_j > 0] (p = 1), 2 h_j [h_j > 0] (p = 2); with upstream g:
        d loss / d x_j = g scale slope_j   for j != y (mode "max": only the first j != y with the
                                           largest gap)
        d loss / d x_y = -sum_{j != y} d loss / d x_j

Accumulation is in float32 (float64 for float64 input); inside the kernels the accumulation dtype
is the element type of the forward's loss pointer and of the backward's grad_loss pointer. Sums
over a row have two levels, like the CPU kernel: a tree reduction (tl.sum) within a chunk of
BLOCK_SIZE classes, and a float64 scalar across chunks, so that the sum of ~20k equal slopes or
terms keeps ~1e-7 relative accuracy at any C.

Both kernels run one program per row. The forward loops over the row in chunks, masking the target
out (cols != y). The backward in mode "sum" is one streaming pass per row: each chunk's j != y
gradients are written as they are computed while their slopes are summed, and the target's
gradient -g scale sum(slopes) is written after the loop (no element is written twice, so there is
no ordering question between the threads of a program). Mode "max" needs the argmax before any
write, so its backward loops twice over the row: first the first j != y with the largest gap h_j
(a NaN gap counts as the largest, as torch.argmax does in fusedloss.reference; the gaps are
ordered through x_j, exactly), then the writes, each element once. The forward's max-mode value is
term(max h), the same j's term since rounding is monotonic.

Only kernels and their launch helpers live here; the ops are registered with
torch.library.triton_op in fusedloss/ops/gap_loss.py, and every launch goes through
torch.library.wrap_triton so that torch.compile can trace the enclosing op. No host syncs, no
.item(); no atomics (deterministic).
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

__all__ = ["gap_loss_fwd", "gap_loss_bwd"]

# Chunk sizes of the per-row loops. Each chunk costs a few block reductions (one sum, or a max and
# two index minima in mode "max"), so chunks are large; the backward also stores each chunk.
_FWD_MAX_BLOCK = 4096
_FWD_MAX_WARPS = 8
_BWD_MAX_BLOCK = 4096
_BWD_MAX_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Device helpers: the steps of gap_loss_math.h
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hinge_term(h, P: tl.constexpr):
    # (2): max(0, h)^p, 0 unless h > 0 (NaN gives 0).
    r = tl.where(h > 0.0, h, 0.0)
    if P == 1:
        return r
    else:
        return r * r


@triton.jit
def _hinge_slope(h, P: tl.constexpr):
    # (4): d term / d h, strict at the hinge: [h > 0] (p = 1), 2 h [h > 0] (p = 2).
    if P == 1:
        return tl.where(h > 0.0, 1.0, 0.0)
    else:
        return tl.where(h > 0.0, h, 0.0) * 2.0


@triton.jit
def _row_scale(w_y, num_classes, CLASS_NORMALIZE: tl.constexpr):
    # (3): scale = w_y / C with class_normalize, w_y otherwise.
    if CLASS_NORMALIZE:
        return w_y / tl.cast(num_classes, w_y.dtype)
    else:
        return w_y


@triton.jit
def _target_state(target_ptr, row, num_classes, ignore_index):
    # The row's target y: ignored (y == ignore_index), in range, active (in range and not ignored),
    # and y_safe, an index that is always in bounds to load with.
    y = tl.load(target_ptr + row)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < num_classes)
    active = in_range & (y != ignore_index)
    y_safe = tl.where(active, y, 0)
    return y, ignored, in_range, active, y_safe


@triton.jit
def _argmax_except_target(x_row, y, x_y, num_classes, active, ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # The first j != y with the largest gap h_j = x_j - x_y + margin, as torch.argmax finds it in
    # the reference: a NaN gap counts as larger than anything (the first NaN wins). The gaps are
    # ordered by x_j, which orders them exactly (the rounding of h in ACC could merge distinct gaps
    # into false ties); only an infinite x_y makes every gap that is not NaN equal (all +inf or all
    # -inf), and then the first of them wins. h_j is NaN exactly where x_j - x_y is (x_j or x_y
    # NaN, or x_j = x_y = +-inf). Returns num_classes when there is no such j (C = 1, or a row
    # that is not active).
    offsets = tl.arange(0, BLOCK_SIZE)
    x_y_finite = tl.abs(x_y) < float("inf")  # False for NaN too
    best_x = tl.full([], float("-inf"), ACC)
    best_j = tl.full([], 0, tl.int64) + num_classes
    nan_j = tl.full([], 0, tl.int64) + num_classes
    row_end = tl.where(active, num_classes, 0)
    for start in range(0, row_end, BLOCK_SIZE):
        cols = start + offsets
        valid = (cols < num_classes) & (cols != y)
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(ACC)
        d = x - x_y
        h_nan = d != d
        nan_j = tl.minimum(nan_j, tl.min(tl.where(valid & h_nan, cols, num_classes), axis=0).to(tl.int64))
        candidate = valid & ~h_nan
        key = tl.where(x_y_finite, x, 0.0)  # an infinite x_y: every gap that is not NaN ties
        chunk_x = tl.max(tl.where(candidate, key, float("-inf")), axis=0)
        chunk_j = tl.min(tl.where(candidate & (key == chunk_x), cols, num_classes), axis=0).to(tl.int64)
        # Chunks come in increasing column order: a later chunk replaces the best only when it is
        # strictly larger (or when there is no best yet, e.g. every x so far is -inf).
        take = (chunk_j < num_classes) & ((chunk_x > best_x) | (best_j >= num_classes))
        best_x = tl.where(take, chunk_x, best_x)
        best_j = tl.where(take, chunk_j, best_j)
    return tl.where(nan_j < num_classes, nan_j, best_j)


# ----------------------------------------------------------------------------------------------
# Forward: (1) + (2) + (3), one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gap_loss_fwd_kernel(
    input_ptr,
    input_row_stride,
    target_ptr,
    weight_ptr,
    loss_ptr,
    num_classes,
    ignore_index,
    margin_hi,
    margin_lo,
    P: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CLASS_NORMALIZE: tl.constexpr,
    MAX_MODE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    x_row = input_ptr + row * input_row_stride
    margin = param(margin_hi, margin_lo, ACC)

    y, ignored, in_range, active, y_safe = _target_state(target_ptr, row, num_classes, ignore_index)
    x_y = tl.load(x_row + y_safe, mask=active, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)
    scale = _row_scale(w_y, num_classes, CLASS_NORMALIZE)

    # (1) + (2) over the classes j != y, chunk by chunk: the sum of the terms (float64 across
    # chunks), or the largest gap (a NaN gap wins and then gives term 0, as in the reference).
    # Ignored rows and bad targets read nothing.
    total = tl.zeros([], tl.float64)
    max_h = tl.full([], float("-inf"), ACC)
    row_end = tl.where(active, num_classes, 0)
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, row_end, BLOCK_SIZE):
        cols = start + offsets
        valid = (cols < num_classes) & (cols != y)
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(ACC)
        h = x - x_y + margin
        if MAX_MODE:
            chunk_nan = tl.max(tl.where(valid & (h != h), 1, 0), axis=0) > 0
            chunk_max = tl.max(tl.where(valid, h, float("-inf")), axis=0)
            max_h = tl.where(chunk_nan | (max_h != max_h), float("nan"), tl.maximum(max_h, chunk_max))
        else:
            term = tl.where(valid, _hinge_term(h, P), 0.0)
            total += tl.sum(term, axis=0).to(tl.float64)

    # (3). With C = 1 there is no j != y: max_h stays -inf and its term is 0.
    if MAX_MODE:
        value = _hinge_term(max_h, P)
    else:
        value = total.to(ACC)
    loss = scale * value

    # Ignored rows: 0. A target outside [0, C) that is not ignore_index: NaN.
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)


# ----------------------------------------------------------------------------------------------
# Backward: (1) + (4), one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gap_loss_bwd_kernel(
    grad_loss_ptr,
    grad_loss_stride,
    input_ptr,
    input_row_stride,
    target_ptr,
    weight_ptr,
    grad_ptr,
    num_classes,
    ignore_index,
    margin_hi,
    margin_lo,
    P: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CLASS_NORMALIZE: tl.constexpr,
    MAX_MODE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    ACC: tl.constexpr = grad_loss_ptr.dtype.element_ty
    OUT: tl.constexpr = grad_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    x_row = input_ptr + row * input_row_stride
    grad_row = grad_ptr + row * num_classes  # the gradient is contiguous
    margin = param(margin_hi, margin_lo, ACC)

    y, ignored, in_range, active, y_safe = _target_state(target_ptr, row, num_classes, ignore_index)
    x_y = tl.load(x_row + y_safe, mask=active, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=active, other=0.0).to(ACC)
    else:
        w_y = tl.full([], 1.0, ACC)
    g = tl.load(grad_loss_ptr + row * grad_loss_stride).to(ACC)
    gscale = g * _row_scale(w_y, num_classes, CLASS_NORMALIZE)
    # What a row that is not active holds everywhere: zeros if ignored, NaNs for a bad target.
    fill = tl.where(ignored, 0.0, float("nan")).to(ACC)

    offsets = tl.arange(0, BLOCK_SIZE)
    if MAX_MODE:
        # (4) in mode "max": only j = the first argmax of h over j != y, and y = -that.
        j = _argmax_except_target(x_row, y, x_y, num_classes, active, ACC, BLOCK_SIZE)
        has_j = active & (j < num_classes)
        j_safe = tl.where(has_j, j, 0)
        x_j = tl.load(x_row + j_safe, mask=has_j, other=0.0).to(ACC)
        h_j = x_j - x_y + margin
        grad_j = tl.where(has_j, _hinge_slope(h_j, P) * gscale, 0.0)
        for start in range(0, num_classes, BLOCK_SIZE):
            cols = start + offsets
            grad = tl.where(cols == j, grad_j, tl.where(cols == y, -grad_j, 0.0))
            grad = tl.where(active, grad, fill)
            tl.store(grad_row + cols, cast_rtne(grad, OUT), mask=cols < num_classes)
    else:
        # (1) + (4) in mode "sum", one streaming pass: write g scale slope_j for each j != y while
        # summing slope_j (float64 across chunks), then write y's gradient after the loop. A row
        # that is not active writes its fill everywhere in the loop (y is not skipped then).
        skip = tl.where(active, y, -1)
        slopes = tl.zeros([], tl.float64)
        for start in range(0, num_classes, BLOCK_SIZE):
            cols = start + offsets
            in_row = cols < num_classes
            valid = in_row & (cols != y) & active
            x = tl.load(x_row + cols, mask=valid, other=0.0).to(ACC)
            h = x - x_y + margin
            slope = tl.where(valid, _hinge_slope(h, P), 0.0)
            slopes += tl.sum(slope, axis=0).to(tl.float64)
            grad = tl.where(active, slope * gscale, fill)
            tl.store(grad_row + cols, cast_rtne(grad, OUT), mask=in_row & (cols != skip))
        grad_y = -slopes.to(ACC) * gscale
        tl.store(grad_row + y_safe, cast_rtne(grad_y, OUT), mask=active)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_p(p: int) -> None:
    if p not in (1, 2):
        raise ValueError(f"fusedloss: p must be 1 or 2, got {p}")


def gap_loss_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    margin: float,
    p: int,
    ignore_index: int,
    class_normalize: bool,
    max_mode: bool,
) -> Tensor:
    """Per-row loss (N,) in the accumulation dtype: 0 where ignored, NaN for a bad target."""
    _check_p(p)
    n_rows, num_classes = input.shape
    loss = torch.empty((n_rows,), dtype=_acc_dtype(input.dtype), device=input.device)
    if n_rows == 0:
        return loss

    has_weight = weight is not None
    weight_arg = weight if has_weight else target  # a read-only stand-in, never read
    block, num_warps = _launch_config(num_classes, _FWD_MAX_BLOCK, _FWD_MAX_WARPS)

    torch.library.wrap_triton(_gap_loss_fwd_kernel)[(n_rows,)](
        input,
        input.stride(0),
        target,
        weight_arg,
        loss,
        num_classes,
        ignore_index,
        *_split_float(margin),
        P=int(p),
        HAS_WEIGHT=has_weight,
        CLASS_NORMALIZE=bool(class_normalize),
        MAX_MODE=bool(max_mode),
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return loss


def gap_loss_bwd(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    margin: float,
    p: int,
    ignore_index: int,
    class_normalize: bool,
    max_mode: bool,
) -> Tensor:
    """The (N, C) gradient of the input, contiguous, in the input's dtype."""
    _check_p(p)
    n_rows, num_classes = input.shape
    grad = torch.empty((n_rows, num_classes), dtype=input.dtype, device=input.device)
    if grad.numel() == 0:
        return grad

    acc = _acc_dtype(input.dtype)
    if grad_loss.dtype != acc:  # the kernel accumulates in grad_loss's element type
        grad_loss = grad_loss.to(acc)
    has_weight = weight is not None
    weight_arg = weight if has_weight else target  # a read-only stand-in, never read
    block, num_warps = _launch_config(num_classes, _BWD_MAX_BLOCK, _BWD_MAX_WARPS)

    torch.library.wrap_triton(_gap_loss_bwd_kernel)[(n_rows,)](
        grad_loss,
        grad_loss.stride(0),
        input,
        input.stride(0),
        target,
        weight_arg,
        grad,
        num_classes,
        ignore_index,
        *_split_float(margin),
        P=int(p),
        HAS_WEIGHT=has_weight,
        CLASS_NORMALIZE=bool(class_normalize),
        MAX_MODE=bool(max_mode),
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return grad
