"""Triton twin of fusedloss::reduce_rows: torch's sum and mean of per-row losses (the math, and why it
accumulates in float64, is in csrc/include/fusedloss/reduce_math.h).

Deterministic without atomics: each program sums a contiguous span of rows in BLOCK lanes (a lane
takes every BLOCK-th row of the span, in order) and reduces its lanes with tl.sum; with one program
it writes the result, with several it writes partials that a one-program launch merges in program
order. Launched through torch.library.wrap_triton, as every kernel here, so that torch.compile traces
the triton_ops that call it.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024
SINGLE_PROGRAM_ROWS = 1 << 16
MAX_PROGRAMS = 1024


@triton.jit
def _reduce_rows_kernel(loss_ptr, target_ptr, weight_ptr, token_weight_ptr, partial_ptr, out_ptr, mass_ptr, n_rows,
                        span, num_weights, ignore_index, HAS_WEIGHT: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr,
                        MEAN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * span
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    mass = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, span, BLOCK):
        rows = lo + start + lanes
        inside = (rows < n_rows) & (start + lanes < span)
        y = tl.load(target_ptr + rows, mask=inside, other=ignore_index)
        kept = inside & (y != ignore_index)
        term = tl.load(loss_ptr + rows, mask=kept, other=0.0).to(tl.float64)
        w = tl.full([BLOCK], 1.0, tl.float64)
        if HAS_WEIGHT:
            # an out-of-range target has a NaN loss already; its weight is read at a clamped index
            yc = tl.minimum(tl.maximum(y, 0), num_weights - 1)
            w = tl.load(weight_ptr + yc, mask=kept, other=0.0).to(tl.float64)
        if HAS_TOKEN_WEIGHT:
            u = tl.load(token_weight_ptr + rows, mask=kept, other=0.0).to(tl.float64)
            term = u * term
            w = u * w
        total += tl.where(kept, term, 0.0)
        mass += tl.where(kept, w, 0.0)
    s = tl.sum(total, axis=0)
    m = tl.sum(mass, axis=0)
    if FINAL:
        if MEAN:
            tl.store(out_ptr, s / m)
        else:
            tl.store(out_ptr, s)
        tl.store(mass_ptr, m)
    else:
        tl.store(partial_ptr + pid, s)
        tl.store(partial_ptr + tl.num_programs(0) + pid, m)


@triton.jit
def _merge_partials_kernel(partial_ptr, out_ptr, mass_ptr, programs, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    inside = lanes < programs
    s = tl.sum(tl.load(partial_ptr + lanes, mask=inside, other=0.0), axis=0)
    m = tl.sum(tl.load(partial_ptr + programs + lanes, mask=inside, other=0.0), axis=0)
    if MEAN:
        tl.store(out_ptr, s / m)
    else:
        tl.store(out_ptr, s)
    tl.store(mass_ptr, m)


def reduce_rows(loss: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                token_weight: torch.Tensor | None, ignore_index: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum or mean, mass) as 0-dim tensors of ``loss``'s dtype; arguments as fusedloss::reduce_rows."""
    n = loss.shape[0]
    out = loss.new_empty(())
    mass = loss.new_empty(())
    programs = 1 if n <= SINGLE_PROGRAM_ROWS else min(MAX_PROGRAMS, triton.cdiv(n, SINGLE_PROGRAM_ROWS // 8))
    span = max(n, 1) if programs == 1 else triton.cdiv(n, programs)
    partial = loss.new_empty((2, programs), dtype=torch.float64) if programs > 1 else out
    nw = weight.shape[0] if weight is not None else 1
    torch.library.wrap_triton(_reduce_rows_kernel)[(programs,)](
        loss, target, weight if weight is not None else loss, token_weight if token_weight is not None else loss,
        partial, out, mass, n, span, nw, ignore_index, HAS_WEIGHT=weight is not None,
        HAS_TOKEN_WEIGHT=token_weight is not None, MEAN=mean, FINAL=programs == 1, BLOCK=BLOCK)
    if programs > 1:
        torch.library.wrap_triton(_merge_partials_kernel)[(1,)](partial, out, mass, programs, MEAN=mean, BLOCK=MAX_PROGRAMS)
    return out, mass
