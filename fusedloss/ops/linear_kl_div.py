"""The chunked linear twins of the distillation losses (linear_kl_div, linear_jsd).

Rows are processed ``chunk_size`` at a time: the chunk's student and teacher logits (two matmuls),
the fused row kernel of the backend (fusedloss::kl_div_fwd / _bwd, or their Triton twins), and the
gradients of the inputs, weights and biases from the chunk's logit gradients (matmuls). Neither
head's ``(N, V)`` logits, nor their gradients, ever exist: at most ``chunk_size x V`` of each.

When the loss is reduced (``batchmean``, ``sum``, ``mean``) and a gradient is needed, the forward
computes the gradients as it goes, with the reduction's row factor (1, 1 / kept rows, 1 / (kept rows
x V): device tensors, no host sync), and the backward only scales them by the incoming gradient:
each chunk's logits are computed once, as in the naive computation. With ``reduction="none"`` the
row factors are only known in the backward, which recomputes each chunk's logits.

Autograd is a torch.autograd.Function here (not a torch.library op): the chunk loop is host
control flow around the row kernels, which are torch.library ops with fakes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss.ops import kl_div as _kl
from fusedloss.ops._common import acc_dtype

# Elements of one chunk of logits: 8M (32 MB in fp32), about 256 rows at V = 32000. Large enough for
# the matmuls to run at full speed, small next to the (N, V) logits.
CHUNK_ELEMENTS = 1 << 23


def default_chunk(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def _logits(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.addmm(b.to(x.dtype), x, w.T) if b is not None else x @ w.T


class _Sweep:
    """One pass over the row chunks; with ``g_rows`` (N,) it also accumulates the gradients."""

    def __init__(self, backend, xs, ws, bs, xt, wt, bt, target, ignore_index, temperature, beta, jsd, chunk):
        self.fwd = _kl.KERNELS.fwd(backend)
        self.bwd = _kl.KERNELS.bwd(backend)
        self.xs, self.ws, self.bs, self.xt, self.wt, self.bt = xs, ws, bs, xt, wt, bt
        self.target = target
        self.scalars = (ignore_index, temperature, beta, jsd)
        self.chunk = chunk

    def run(self, g_rows: Tensor | None, needs: tuple[bool, ...]):
        xs, ws, bs, xt, wt, bt = self.xs, self.ws, self.bs, self.xt, self.wt, self.bt
        N = xs.shape[0]
        acc = acc_dtype(xs.dtype)
        rows = torch.empty(N, dtype=acc, device=xs.device)
        n_xs, n_ws, n_bs, n_xt, n_wt, n_bt = needs
        teacher_grad = n_xt or n_wt or n_bt
        grads = g_rows is not None and any(needs)
        g_xs = torch.empty_like(xs) if grads and n_xs else None
        g_xt = torch.empty_like(xt) if grads and n_xt else None
        # weight and bias gradients are sums over chunks: accumulated in the accumulation dtype
        g_ws = torch.zeros(ws.shape, dtype=acc, device=ws.device) if grads and n_ws else None
        g_wt = torch.zeros(wt.shape, dtype=acc, device=wt.device) if grads and n_wt else None
        g_bs = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if grads and n_bs else None
        g_bt = torch.zeros(wt.shape[0], dtype=acc, device=wt.device) if grads and n_bt else None
        for start in range(0, N, self.chunk):
            sl = slice(start, min(N, start + self.chunk))
            target = None if self.target is None else self.target[sl]
            s = _logits(xs[sl], ws, bs)
            t = _logits(xt[sl], wt, bt)
            if t.dtype != s.dtype:
                t = t.to(s.dtype)
            loss, stats = self.fwd(s, t, target, *self.scalars)
            rows[sl] = loss
            if not grads:
                continue
            gs, gt = self.bwd(g_rows[sl], s, t, target, stats, *self.scalars, teacher_grad)
            del s, t
            _head_grads(gs, sl, xs, ws, g_xs, g_ws, g_bs, acc)
            if teacher_grad:
                _head_grads(gt.to(xt.dtype), sl, xt, wt, g_xt, g_wt, g_bt, acc)
        out = (g_xs, _cast(g_ws, ws), _cast(g_bs, bs), g_xt, _cast(g_wt, wt), _cast(g_bt, bt))
        return rows, out


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, written in place (no temporary) when the dtypes agree."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b.to(a.dtype))


def _add_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b: in place by the BLAS (beta = 1) in float32; 16-bit products are formed in their
    dtype (fp32 accumulation inside the GEMM) and added to the float32 sum."""
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b.to(a.dtype)).to(acc.dtype)


def _head_grads(g: Tensor, sl: slice, x: Tensor, w: Tensor, g_x: Tensor | None, g_w: Tensor | None,
                g_b: Tensor | None, acc: torch.dtype) -> None:
    """One head's share of a chunk's logits gradient g = dL/dZ_c (Z = X W^T + b): dX_c = g W (written),
    dW += g^T X_c and db += column sums of g (accumulated); each only where its buffer exists."""
    if g_x is not None:
        _mm_into(g_x[sl], g, w)
    if g_w is not None:
        _add_mm(g_w, g.T, x[sl])
    if g_b is not None:
        g_b += g.sum(0, dtype=acc)


def _cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if g is None else g.to(like.dtype)


def _row_factor(target: Tensor | None, ignore_index: int, reduction: str, n_rows: int, vocab: int, like: Tensor):
    """d reduced / d row_i (as :func:`fusedloss.ops.kl_div.reduce`), an (N,) expanded device tensor."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    if reduction == "sum":
        return one.expand(n_rows)
    count = (one * n_rows) if target is None else (target != ignore_index).sum().to(like.dtype)
    if reduction == "mean":
        count = count * vocab
    return (one / count).expand(n_rows)


class LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, target, backend, ignore_index, reduction, temperature, beta, jsd,
                chunk):
        sweep = _Sweep(backend, xs, ws, bs, xt, wt, bt, target, ignore_index, temperature, beta, jsd, chunk)
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:6])
        N, V = xs.shape[0], ws.shape[0]
        acc = acc_dtype(xs.dtype)
        eager = reduction != "none" and any(needs)
        g_rows = _row_factor(target, ignore_index, reduction, N, V, torch.empty((), dtype=acc, device=xs.device)) \
            if eager else None
        rows, grads = sweep.run(g_rows, needs)
        ctx.reduction = reduction
        ctx.needs = needs
        if eager:
            ctx.grads = grads
        elif any(needs):
            ctx.sweep = sweep
        return _kl.reduce(rows, target, ignore_index, reduction, V)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            _, grads = ctx.sweep.run(grad_out.to(acc_dtype(ctx.sweep.xs.dtype)), ctx.needs)
            del ctx.sweep
        else:
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
            del ctx.grads
        return (*grads, None, None, None, None, None, None, None, None)


def linear_distill(backend, xs, ws, bs, xt, wt, bt, target, ignore_index, reduction, temperature, beta, jsd, chunk):
    """The loss of (N, Ds) / (N, Dt) hidden rows against (V, D*) heads; see the module's docstring."""
    chunk = default_chunk(xs.shape[0], ws.shape[0]) if chunk is None else chunk
    return LinearDistill.apply(xs, ws, bs, xt, wt, bt, target, backend, ignore_index, reduction, temperature, beta,
                               jsd, chunk)
