"""Chunked linear cross-entropy: ``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the
(N, V) logits. The op's whole contract with PyTorch.

- ``LINEAR_CROSS_ENTROPY``, the public-level op ``fusedloss::linear_cross_entropy`` (what
  fusedloss.functional calls for the cpu and cuda backends, and for float64 on the triton backend): the
  chunk loop ``fusedloss::linear_cross_entropy_chunks`` (csrc/linear_cross_entropy.cpp: BLAS/cuBLAS GEMMs
  and the fused cross-entropy row kernel), the reduction (reduce_rows), autograd in C++
  (csrc/autograd.cpp); its Triton twin runs ``chunked`` below, the same loop in Python over the Triton row
  kernel. Both are opaque to torch.compile (which traces around them with the fake kernels below).
- ``auto_chunk_size``: the rows per chunk, picked here and passed to the op.
- ``fusedloss::linear_cross_entropy_fwd_triton`` / ``_bwd_triton`` (the end of this file): the fused
  Triton kernels (logits only in registers) for 16- and 32-bit floats on the triton backend.

The math, with Z = X W^T + b (N, V) the logits, l_i = CE(Z_i, y_i), and L = sum_i s_i l_i for per-row
scales s_i (1 for sum, 1/denominator for mean, grad_output_i for none):
  1. G := dL/dZ, row i = s_i dl_i/dZ_i: what the row kernel writes over a chunk of logits, in place.
  2. dL/dX = G W: row-chunk by row-chunk, no accumulation.
  3. dL/dW = G^T X = sum over chunks c of G_c^T X_c: accumulated in fp32 (fp64 for fp64 input).
  4. dL/db = sum_i G_i: column sums, accumulated likewise.
Chunks run over rows (tokens): a chunk's logits, G_c and nothing (N, V)-sized exists at any time.

mean/sum (C++ op): 1-4 run in the forward with s_i = 1 (the kernel's gradient rows stay in [-w, w]: no
fp16 underflow), and the backward multiplies the fp32 accumulators once by grad_output / denominator (mean)
or grad_output (sum), 0-dim tensors: no host sync. That is one matmul pass in total
instead of recomputing the logits in the backward. none: the forward computes the loss only; the backward
recomputes each chunk's logits and runs 1-4 with s_i = grad_output_i.

With the extras (``extras=True``: per-row logprob and entropy, cross_entropy_math.h (7)) any reduction
runs as none does: their gradients are only known in the backward, so the forward computes the loss and
the (N, 4) stats (max, log_s, logprob, entropy) per chunk, and the backward recomputes each chunk's logits
and takes G_c from the row backward (cross_entropy_bwd with the rows' grad_output, grad_logprob and
grad_entropy): one GEMM more than mean/sum without them, none's count with them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops import cross_entropy as _ce
from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype, no_context, no_double_backward, triton_kernels_present

COLS = "fusedloss::cross_entropy_fwd_grad_cols_"
CHUNKS = "fusedloss::linear_cross_entropy_chunks"
# CPU chunks of at least this many logits take the class-major loop (csrc/linear_cross_entropy.cpp, the same
# constant). Below it the
# GEMMs are too small for the layout to matter, and MKL's small-matrix path gives W @ X^T different bits
# with 1 and 2 threads (seen at V=7, D=4; every larger shape tried agreed), which would break the CPU
# backend's thread-count independence.
CLASS_MAJOR_MIN_LOGITS = 1 << 20

# chunk_size=None (see auto_chunk_size). CUDA: bytes of a chunk's logits. CPU: rows between the bounds,
# and the chunk's logits at most CPU_MAX_CHUNK_BYTES.
CHUNK_BYTES = {"cuda": (256 << 20, 256 << 20)}
CPU_CHUNK_ROWS = (256, 512)
CPU_MAX_CHUNK_BYTES = 512 << 20
MIN_CHUNK_ROWS = {"cpu": 32, "cuda": 128}


def auto_chunk_size(n: int, d: int, v: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk, from N, D, V, the device and the dtype.

    CPU: rows, not bytes, set the speed. Every chunk runs three GEMMs with the whole (V, D) head: the
    logits W X_c^T and dX_c = G_c W read W, and dW += G_c^T X_c reads and writes the whole fp32 weight
    gradient, so per chunk 4 V D floats stream through memory against 6 c V D flops: the chunk's rows c are
    the GEMMs' arithmetic intensity. Far below 256 rows that traffic and MKL's thin-matrix efficiency
    make the loop slower than the naive head (issue #19: an HF step at V=128256, D=512 took 16.7 s with
    32 rows, 10.5 s with 128, 9.5 s with 512, naive 9.9 s); bench/linear_cross_entropy_chunks.md has the
    measurements of this policy (0.94x to 1.44x the naive head's speed at the shapes measured).
    Memory: the naive head's peak is about (2 N V + V D + N D) floats (logits and their gradient, dW, dX),
    ours (c V + V D + N D), so a fifth of the naive peak allows c <= 0.4 N - 0.8 D: the rows are that,
    within 256..512, and the chunk's logits at most 512 MB (a huge V). Where 0.4 N - 0.8 D < 256 (few
    rows, a wide head) no chunk size reaches a fifth: dW alone, V D floats, is most of the naive peak,
    so speed decides (256 rows). One buffer is reused across chunks, so its page faults are paid once.
    CUDA, 256 MB: a chunk of >= 128 rows against V columns is thousands of cuBLAS tiles, enough to fill
    the GPU, and its GEMMs take long enough (about a millisecond at V=32000, D=4096) that the per-chunk
    launches of the row kernel and the casts are noise; 256 MB is small next to the GPU's memory and the
    weight gradient.
    The logits are in the accumulation dtype (fp32 for bf16/fp16 input), so that is the element size.
    Rows are a multiple of 32 (tensor-core and vector friendly), except the last chunk's.
    """
    kind = "cuda" if device.type == "cuda" else "cpu"
    elem = acc_dtype(dtype).itemsize
    if kind == "cpu":
        low, high = CPU_CHUNK_ROWS
        rows = min(max(int(0.4 * n - 0.8 * d) // 32 * 32, low), high)
        rows = min(rows, CPU_MAX_CHUNK_BYTES // max(1, v * elem) // 32 * 32)
    else:
        low, high = CHUNK_BYTES[kind]
        rows = min(max(n * d * elem, low), high) // max(1, v * elem) // 32 * 32
    rows = max(MIN_CHUNK_ROWS[kind], rows)
    return max(1, min(rows, n))


def _mixed_precision(input: Tensor) -> bool:
    """CUDA bf16/fp16 operands with fp32 results straight from cuBLAS (``torch.mm(..., out_dtype=)``,
    CUDA-only in torch 2.11 and 2.14). Elsewhere the operands are cast to the accumulation dtype: on CPU,
    bf16/fp16 GEMMs are emulated (6x slower than fp32 on this AVX2 machine), so fp32 is both faster and
    exact in the products."""
    return (input.device.type == "cuda" and input.dtype in (torch.float16, torch.bfloat16)
            and torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA"))


def _row_kernel(backend: str):
    """The fused row kernel (fusedloss::cross_entropy_fwd_grad_ of ``backend``): overwrites a chunk's
    logits with grad_scale_i * d loss_i / d logits_i, returns per-row (loss, lse)."""
    return _ce.fwd_grad_op(backend)


def _loss_kernel(backend: str):
    """Per-row loss of a chunk of logits without writing a gradient (the plain forward kernel)."""
    return _ce.KERNELS.fwd(backend)


def _bwd_kernel(backend: str):
    """The row backward (cross_entropy_bwd of ``backend``): the extras' gradients, from saved stats."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.cross_entropy_bwd
    return torch.ops.fusedloss.cross_entropy_bwd_triton


def chunked(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
            weight: Tensor | None, grad_scale: Tensor | None, ignore_index: int, label_smoothing: float,
            z_loss: float, softcap: float, chunk_size: int, input_grad: bool, weight_grad: bool, bias_grad: bool,
            backend: str, stats: Tensor | None = None, grad_logprob: Tensor | None = None,
            grad_entropy: Tensor | None = None, extras: bool = False):
    """The chunk loop. Returns (loss rows (N,), grad_input, grad_weight, grad_bias, lse rows (N,), stats) in
    the accumulation dtype, each gradient None unless asked for; grad_scale (N,) (None means 1) scales the
    rows' gradients.

    The extras (logprob, entropy), as csrc/linear_cross_entropy.cpp's loop: ``extras=True`` (no gradients)
    returns the (N, 4) stats of cross_entropy_fwd's extras (else stats is None); the backward passes them
    back as ``stats`` with ``grad_logprob`` / ``grad_entropy`` and gets the gradients from cross_entropy_bwd
    on recomputed logits (loss and lse are then None).

    input (N, D), linear_weight (V, D), target (N,) int64 contiguous, weight (V,) contiguous in the
    accumulation dtype. ``chunk_size`` 0 picks one (auto_chunk_size).
    """
    n, d = input.shape
    v = linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    device = input.device
    mixed = _mixed_precision(input)
    op_dtype = input.dtype if mixed else acc
    bias_grad = bias_grad and linear_bias is not None
    grads = input_grad or weight_grad or bias_grad
    if extras and grads:
        raise ValueError("chunked: extras=True makes no gradients (the backward's call passes the stats)")
    extras_bwd = grads and stats is not None
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(n, d, v, device, input.dtype)
    chunk = max(1, min(chunk, n))

    # On the cast path a bf16/fp16 head is copied to fp32 once per call (V*D*4 bytes, the size of its
    # weight gradient); fp32/fp64 heads are used as they are.
    w_op = linear_weight.to(op_dtype)
    b_acc = linear_bias.to(acc) if linear_bias is not None else None
    # One logits buffer for every chunk (the last one uses its first rows): CPU allocations of this
    # size are not cached by PyTorch, and a fresh one per chunk would pay its page faults each time.
    logits_buf = torch.empty((chunk, v), dtype=acc, device=device)
    dl_buf = torch.empty((chunk, v), dtype=op_dtype, device=device) if mixed and (input_grad or weight_grad) else None
    loss = None if extras_bwd else torch.empty((n,), dtype=acc, device=device)
    lse = None if extras_bwd else torch.empty((n,), dtype=acc, device=device)
    stats_out = torch.empty((n, 4), dtype=acc, device=device) if extras else None
    grad_input = torch.empty((n, d), dtype=acc, device=device) if input_grad else None
    grad_weight = torch.zeros((v, d), dtype=acc, device=device) if weight_grad else None
    grad_bias = torch.zeros((v,), dtype=acc, device=device) if bias_grad else None
    row_kernel = _row_kernel(backend) if grads and not extras_bwd else None
    bwd_kernel = _bwd_kernel(backend) if extras_bwd else None
    ones = torch.ones((1,), dtype=acc, device=device)
    loss_kernel = None if grads else _loss_kernel(backend)
    mm_kw = {"out_dtype": acc} if mixed else {}

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = input[start:stop].to(op_dtype)
        t = target[start:stop]
        logits = logits_buf[: stop - start]
        if b_acc is None:
            torch.mm(x, w_op.T, out=logits, **mm_kw)
        else:
            torch.addmm(b_acc, x, w_op.T, out=logits, **mm_kw)
        if not grads:
            rows = loss_kernel(logits, t, weight, ignore_index, label_smoothing, z_loss, softcap, 1.0, extras)
            loss[start:stop] = rows[0]
            lse[start:stop] = rows[1]
            if extras:
                stats_out[start:stop] = rows[2]
            continue
        scale = grad_scale[start:stop] if grad_scale is not None else None
        if extras_bwd:
            part = (lambda a: None if a is None else a[start:stop])
            g = bwd_kernel(ones.expand(stop - start) if scale is None else scale, None, logits, t, weight,
                           stats[start:stop], ignore_index, label_smoothing, z_loss, softcap, 1.0,
                           part(grad_logprob), part(grad_entropy))
        else:
            loss[start:stop], lse[start:stop] = row_kernel(logits, t, weight, scale, ignore_index, label_smoothing,
                                                           z_loss, softcap, 1.0)
            g = logits  # now G_c (step 1)
        if bias_grad:
            grad_bias += g.sum(0)
        if dl_buf is not None:
            # cuBLAS takes one operand dtype: G_c rounded to bf16/fp16 for steps 2-3 (as torch's own
            # chunked path does), products accumulated in fp32 by out_dtype.
            g = dl_buf[: stop - start].copy_(g)
        if input_grad:
            torch.mm(g, w_op, out=grad_input[start:stop], **mm_kw)
        if weight_grad:
            torch.addmm(grad_weight, g.T, x, out=grad_weight, **mm_kw)
    return loss, grad_input, grad_weight, grad_bias, lse, stats_out


def _cols_fake(logits_t, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, temperature):
    n = logits_t.shape[1]
    return logits_t.new_empty((n,)), logits_t.new_empty((n,))


def _chunks_fake(input, linear_weight, target, linear_bias, weight, grad_scale, ignore_index, label_smoothing,
                 z_loss, softcap, chunk_size, input_grad, weight_grad, bias_grad, stats=None, grad_logprob=None,
                 grad_entropy=None, extras=False):
    acc = acc_dtype(input.dtype)
    n, d = input.shape
    v = linear_weight.shape[0]
    rows = 0 if stats is not None and (input_grad or weight_grad or (bias_grad and linear_bias is not None)) else n
    return (input.new_empty((rows,), dtype=acc), input.new_empty((rows,), dtype=acc),
            input.new_empty((n, d) if input_grad else (0,), dtype=acc),
            input.new_empty((v, d) if weight_grad else (0,), dtype=acc),
            input.new_empty((v,) if bias_grad and linear_bias is not None else (0,), dtype=acc),
            input.new_empty((n, 4) if extras else (0,), dtype=acc))


if _backend.extension_loaded():
    torch.library.register_fake(COLS)(_cols_fake)
    torch.library.register_fake(CHUNKS)(_chunks_fake)


# --- the public-level op -------------------------------------------------------------------------
# fusedloss::linear_cross_entropy (schema in csrc/registration.cpp): the chunk loop
# (linear_cross_entropy_chunks, csrc/linear_cross_entropy.cpp), the reduction (reduce_rows) and, for
# mean/sum with gradients wanted, the gradients made in the same pass, scaled in the backward; autograd in
# C++ (csrc/autograd.cpp). Its Triton twin, for the triton backend's float64 (the fused Triton kernels
# below take 16- and 32-bit floats), runs ``chunked`` with the Triton row kernel and recomputes the
# logits in its backward.

SCHEMA = ("(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, "
          "Tensor? token_weight, int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
          "int chunk_size, bool extras=False) -> (Tensor loss, Tensor lse, Tensor mass, Tensor stats, Tensor logprob, "
          "Tensor entropy)")


def _fake(input, linear_weight, target, linear_bias, weight, token_weight, ignore_index, reduction, label_smoothing,
          z_loss, softcap, chunk_size, extras=False):
    n = input.shape[0]
    acc = acc_dtype(input.dtype)
    reduced = reduction != _registry.NONE
    extra = (n,) if extras else (0,)
    return (input.new_empty(() if reduced else (n,), dtype=acc), input.new_empty((n,), dtype=acc),
            input.new_empty(() if reduced else (0,), dtype=acc),
            input.new_empty((n, 4) if extras else (0,), dtype=acc), input.new_empty(extra, dtype=acc),
            input.new_empty(extra, dtype=acc))


def _triton_impl(input, linear_weight, target, linear_bias, weight, token_weight, ignore_index, reduction,
                 label_smoothing, z_loss, softcap, chunk_size, extras=False):
    rows, _, _, _, lse, stats = chunked(input, linear_weight, target, linear_bias, weight, None, ignore_index,
                                        label_smoothing, z_loss, softcap, chunk_size, False, False, False, "triton",
                                        extras=extras)
    out, mass = _ce.reduce_triton(rows, target, weight, ignore_index, reduction, token_weight)
    if not extras:
        stats = rows.new_empty((0,))
    return (out, lse, mass, stats, *_ce.extras_of(stats, extras))


def _triton_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    input, linear_weight, target, linear_bias, weight, token_weight, ignore_index, reduction, *scalars = inputs
    _, lse, mass, stats, _, _ = output
    ctx.mark_non_differentiable(lse, mass, stats)
    extras = len(scalars) > 4 and bool(scalars[4])
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, mass, token_weight,
                          stats if extras else None)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.scalars = tuple(scalars[:4])  # label_smoothing, z_loss, softcap, chunk_size (not extras)
    ctx.extras = extras


def _triton_backward(ctx, grad_loss, _grad_lse, _grad_mass, _grad_stats, grad_logprob=None, grad_entropy=None):
    none = (None,) * 13
    if grad_loss is None and grad_logprob is None and grad_entropy is None:
        return none
    input, linear_weight, target, linear_bias, weight, mass, token_weight, stats = ctx.saved_tensors
    need_gi, need_gw, need_gb = (ctx.needs_input_grad[i] for i in (0, 1, 3))
    g = _registry.row_grad(grad_loss, mass, ctx.reduction, input.shape[0], mass, token_weight)
    if not ctx.extras:
        grad_logprob = grad_entropy = None
    _, gi, gw, gb, _, _ = chunked(input, linear_weight, target, linear_bias, weight, g, ctx.ignore_index,
                                  *ctx.scalars, need_gi, need_gw, need_gb, "triton", stats, grad_logprob,
                                  grad_entropy)
    return (gi.to(input.dtype) if need_gi else None, gw.to(linear_weight.dtype) if need_gw else None, None,
            gb.to(linear_bias.dtype) if need_gb else None) + none[4:]


LINEAR_CROSS_ENTROPY = _registry.KernelOp("linear_cross_entropy", SCHEMA, _fake, triton_module="cross_entropy",
                                          triton_impl=_triton_impl, setup_context=_triton_setup_context,
                                          backward=_triton_backward)


# ================================================================================================
# The fused Triton backend (issue #18): fusedloss/triton/linear_cross_entropy.py, logits only in
# registers. Per-row outputs; the reduction (on device) and its gradient are the caller's autograd.
# - fusedloss::linear_cross_entropy_fwd_triton(input, linear_weight, target, linear_bias, weight,
#   ignore_index, label_smoothing, z_loss, softcap, temperature, seq_len, extras=False) -> (loss (N,),
#   lse (N,), stats (N, 2), logprob, entropy), float32; seq_len > 0 is shift=1 over sequences of that
#   length; extras: stats (N, 4) and logprob, entropy (N,) (else (0,)).
# - fusedloss::linear_cross_entropy_bwd_triton(grad_loss, grad_lse, ..., stats, ..., input_grad,
#   weight_grad, bias_grad, grad_filter, grad_logprob=None, grad_entropy=None) -> (grad_input,
#   grad_weight, grad_bias) in the parameters' dtypes (shape (0,) where not asked for). loss, lse,
#   logprob and entropy are differentiable.
# float32, bfloat16 and float16 only: float64 on the triton backend takes the chunked op above.
# ================================================================================================
FWD_TRITON = "fusedloss::linear_cross_entropy_fwd_triton"
BWD_TRITON = "fusedloss::linear_cross_entropy_bwd_triton"
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_REGISTERED = False

if triton_kernels_present("linear_cross_entropy"):
    from torch.library import triton_op

    @triton_op(FWD_TRITON, mutates_args={})
    def linear_cross_entropy_fwd_triton(input: Tensor, linear_weight: Tensor, target: Tensor,
                                        linear_bias: Tensor | None, weight: Tensor | None, ignore_index: int,
                                        label_smoothing: float, z_loss: float, softcap: float, temperature: float,
                                        seq_len: int, extras: bool = False
                                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from fusedloss.triton import linear_cross_entropy as kernels

        return kernels.linear_cross_entropy_fwd(input, linear_weight, target, linear_bias, weight, ignore_index,
                                                label_smoothing, z_loss, softcap, temperature, seq_len, extras)

    @triton_op(BWD_TRITON, mutates_args={})
    def linear_cross_entropy_bwd_triton(grad_loss: Tensor, grad_lse: Tensor | None, input: Tensor,
                                        linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
                                        weight: Tensor | None, stats: Tensor, ignore_index: int,
                                        label_smoothing: float, z_loss: float, softcap: float, temperature: float,
                                        seq_len: int, input_grad: bool, weight_grad: bool, bias_grad: bool,
                                        grad_filter: float, grad_logprob: Tensor | None = None,
                                        grad_entropy: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        from fusedloss.triton import linear_cross_entropy as kernels

        return kernels.linear_cross_entropy_bwd(grad_loss, grad_lse, input, linear_weight, target, linear_bias,
                                                weight, stats, ignore_index, label_smoothing, z_loss, softcap,
                                                temperature, seq_len, input_grad, weight_grad, bias_grad, grad_filter,
                                                grad_logprob, grad_entropy)

    def _setup_fwd_triton(ctx, inputs, output):
        (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap,
         temperature, seq_len, *extras) = inputs
        _, _, stats, _, _ = output
        ctx.set_materialize_grads(False)  # an unused output (lse, the extras) costs the backward nothing
        ctx.mark_non_differentiable(stats)
        ctx.extras = bool(extras and extras[0])
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, stats)
        ctx.scalars = (ignore_index, label_smoothing, z_loss, softcap, temperature, seq_len)

    def _backward_fwd_triton(ctx, grad_loss, grad_lse, _grad_stats, grad_logprob=None, grad_entropy=None):
        input, linear_weight, target, linear_bias, weight, stats = ctx.saved_tensors
        need_gi, need_gw, need_gb = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        if grad_loss is None:  # only the returned lse or extras were used
            grad_loss = stats.new_zeros(stats.shape[0])
        if not ctx.extras:
            grad_logprob = grad_entropy = None
        gi, gw, gb = torch.ops.fusedloss.linear_cross_entropy_bwd_triton(
            grad_loss, grad_lse, input, linear_weight, target, linear_bias, weight, stats, *ctx.scalars, need_gi,
            need_gw, need_gb, 0.0, grad_logprob, grad_entropy)
        return (gi if need_gi else None, gw if need_gw else None, None, gb if need_gb else None, None, None, None,
                None, None, None, None, None)

    linear_cross_entropy_fwd_triton.register_autograd(_backward_fwd_triton, setup_context=_setup_fwd_triton)
    linear_cross_entropy_bwd_triton.register_autograd(no_double_backward("linear_cross_entropy"),
                                                      setup_context=no_context)
    TRITON_REGISTERED = True
# ================================ end of the fused Triton backend ================================
