"""Losses over ``torch.distributed`` process groups (NCCL on GPUs, gloo on CPUs).

- :func:`vocab_parallel_cross_entropy`: each rank holds a contiguous slice of the classes of the same rows
  (tensor-parallel LM head); the loss equals :func:`fusedloss.cross_entropy` on the full logits.
- :func:`vocab_parallel_linear_cross_entropy`: the same for ``input @ weight_shard.T + bias_shard``, chunked
  over rows: neither the full nor the local ``(N, V)`` logits ever exist.
- :func:`info_nce`: keys (and, for the symmetric loss, queries) gathered from every rank with gradient.
- :func:`siglip_loss`: SigLIP's sigmoid loss against the keys gathered from every rank with gradient.

Importing this module needs no process group; calling a function without one raises. The functions run
eagerly (their collectives sit inside ``torch.autograd.Function``s, which torch.compile does not trace).

Vocab-parallel math. Row i has logits z_ij over V = sum_r V_r classes, rank r holding j in
[start_r, start_r + V_r), the target y_i, class weights w_j (all 1 without ``weight``), eps the label
smoothing and lambda the z-loss. The loss is the one of cross_entropy_math.h, term (3):
  loss_i = (1 - eps) w_y (lse_i - z_iy) + eps / V * sum_j w_j (lse_i - z_ij) + lambda lse_i^2
  1. Each rank runs the fused forward kernel on its shard: per row m_r = max_j z_ij, log_s_r =
     log sum_j exp(z_ij - m_r), and, with label smoothing, sum_wd_r = sum_j w_j (z_ij - m_r).
  2. all-reduce MAX of m_r: the global row max M.
  3. one all-reduce SUM of the columns  s_r = exp((m_r - M) + log_s_r),  z_iy and w_y on the rank that owns
     y (0 elsewhere), the owner count (1 on the owner),  sum_wd_r + W_r (m_r - M)  (everything relative to
     M, never to the raw logits: logits of 1e30 keep their log-sums), and the shard's V_r and W_r = sum w_j.
     Then log_S = log sum_r s_r, lse = M + log_S, and the loss follows on every rank, identically.
  4. backward, no communication: d loss_i / d z_ij = p_ij (A_i + 2 lambda lse_i) - c_ij, p_ij = exp((z_ij - M)
     - log_S), A_i = (1 - eps) w_y + eps W / V, c_ij = eps w_j / V + [j == y] (1 - eps) w_y; the target
     element in the kernel's expm1 form (cross_entropy_math.h (4)), so p_y ~ 1 does not cancel.
The local gradient (4) is written with PyTorch ops in the accumulation dtype (in place over one buffer,
four passes), not with the backward kernel: the kernel normalizes smoothing by its own class count and
has no "target on another rank" row, and the corrections that would fix both after the fact are exact
only before the gradient is rounded to bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fusedloss import _backend, _checks
from fusedloss import functional as _functional
from fusedloss.ops import cross_entropy as _ce
from fusedloss.ops import linear_cross_entropy as _lce
from fusedloss.ops._common import acc_dtype

__all__ = ["info_nce", "siglip_loss", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

# Encoding of the local kernel call's targets: every live row gets class 0 of the shard (the forward's
# stats do not depend on the target), rows ignored globally get _SKIP, which the call treats as ignored.
_SKIP = -1
# Rows of the local gradient computed per step when it is rounded to bf16/fp16 (an fp32 buffer of at
# most this many bytes); fp32/fp64 gradients are computed in their own output buffer, all at once.
_GRAD_CHUNK_BYTES = 32 << 20


def _group_info(fn: str, group) -> tuple[int, int]:
    """(rank in group, group size), or a clear error when torch.distributed cannot run."""
    if not dist.is_available():
        raise RuntimeError(f"fusedloss.distributed.{fn}: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"fusedloss.distributed.{fn} needs an initialized process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def _reduce_scatter(output: Tensor, input: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.14
    fn(output, input, op=dist.ReduceOp.SUM, group=group)


def _all_gather(output: Tensor, input: Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


# --- vocab-parallel cross-entropy ---------------------------------------------------------------------

def _vocab_start(n_local: int, start, rank: int, world: int, device: torch.device, group) -> Tensor:
    """The shard's first global class as a 0-dim int64 tensor on ``device`` (no host sync): the given
    start, or the sum of the slice sizes of the lower ranks (one all_gather of sizes)."""
    if start is not None:
        if isinstance(start, Tensor):
            if start.dim() != 0 or start.is_floating_point() or start.is_complex() or start.dtype == torch.bool:
                raise TypeError(f"vocab_start must be an int or a 0-dim integer tensor, got {start.dtype} "
                                f"of shape {tuple(start.shape)}")
            return start.to(device=device, dtype=torch.int64)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"vocab_start must be an int >= 0, got {start!r}")
        return torch.tensor(start, dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group)
    return sizes[:rank].sum()


def _stats_kernel(name: str):
    """(x (n, c) in its dtype, live (n,) bool, w (c,) acc or None, smoothing) -> per-row (m, log_s, sum_wd)
    of the shard in the accumulation dtype, sum_wd None without smoothing. Rows not live give anything
    finite or not: they are masked later."""
    if name == "reference":
        def stats(x, live, w, smoothing):
            xa = x.to(acc_dtype(x.dtype))
            m = xa.amax(1)
            d = xa - m.unsqueeze(1)
            log_s = d.exp().sum(1).log()
            sum_wd = None
            if smoothing:
                sum_wd = (d * w).sum(1) if w is not None else d.sum(1)
            return m, log_s, sum_wd
        return stats

    op = _ce.KERNELS.fwd(name)

    def stats(x, live, w, smoothing):
        c = x.shape[1]
        t = torch.where(live, 0, _SKIP).to(torch.int64)
        # With label_smoothing = 1 the kernel's loss is (1 / c) (W_r log_s - sum_wd) (its term (3) without
        # the target's part), so the row's weighted logit sum comes out of the fused pass: sum_wd =
        # W_r log_s - c loss. Both terms are of the size of the row's spread around its max.
        loss, _, st = op(x, t, w, _SKIP, 1.0 if smoothing else 0.0, 0.0, 0.0, 1.0)
        m, log_s = st[:, 0], st[:, 1]
        sum_wd = None
        if smoothing:
            w_sum = w.sum() if w is not None else float(c)
            sum_wd = w_sum * log_s - c * loss
        return m, log_s, sum_wd

    return stats


def _shard_stats(x: Tensor, y_local: Tensor, owned: Tensor, live: Tensor, w: Tensor | None, smoothing: bool,
                 stats_fn) -> list:
    """Step 1 on one block of rows: [m, log_s, sum_wd or None, z_y (0 where not owned)]."""
    n, c = x.shape
    acc = acc_dtype(x.dtype)
    if c == 0:  # an empty shard: it adds no mass and owns no target
        zeros = x.new_zeros((n,), dtype=acc)
        return [torch.full_like(zeros, float("-inf")), zeros, zeros if smoothing else None, zeros]
    m, log_s, sum_wd = stats_fn(x, live, w, smoothing)
    z_y = x.gather(1, y_local.clamp(0, c - 1).unsqueeze(1)).squeeze(1).to(acc)
    return [m, log_s, sum_wd, torch.where(owned, z_y, 0.0)]


def _owned_weight(w, y_local, owned, n: int, c: int, acc, device) -> Tensor | None:
    """w[y] on the rank that owns row i's target, 0 elsewhere (None without class weights)."""
    if w is None:
        return None
    if c == 0:
        return torch.zeros((n,), dtype=acc, device=device)
    return torch.where(owned, w[y_local.clamp(0, c - 1)], 0.0)


def _combine(m, log_s, sum_wd, z_y, owned, w_y, n_local: int, w_local_sum, live, *, group, eps: float,
             z_loss: float, has_weight: bool):
    """Steps 2-3: the two all-reduces and the per-row loss. Returns (loss (N,), (M, log_S, Z_y, W_y), (V, W)):
    the per-row tensors the gradient needs (log_S is +inf on rows not live, so their p_ij are 0; W_y is
    w[y] on live rows, 0 elsewhere) and the global class count and weight mass, 0-dim."""
    acc = m.dtype
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp((m - M) + log_s)
    cols = [s, z_y, owned.to(acc)]
    if has_weight:
        cols.append(w_y)
    if sum_wd is not None:
        # An empty shard (W_r = 0, m_r = -inf) adds nothing: not 0 * -inf.
        shift = (m - M) * w_local_sum if n_local else torch.zeros_like(m)
        cols.append(sum_wd + shift)
    w_scalar = w_local_sum if isinstance(w_local_sum, Tensor) else torch.tensor(float(w_local_sum), dtype=acc,
                                                                                 device=m.device)
    # V_r summed in the accumulation dtype: exact up to 2**24 classes in fp32; beyond, V is off by at most
    # one part in 2**24, a relative change of the smoothing weight eps / V below fp32's rounding.
    extras = torch.stack([torch.tensor(float(n_local), dtype=acc, device=m.device), w_scalar.to(acc)])
    buf = torch.cat([torch.stack(cols, 1).reshape(-1), extras])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    k = len(cols)
    per_row = buf[:-2].view(-1, k)
    V, W = buf[-2], buf[-1]
    S, Z_y, own = per_row[:, 0], per_row[:, 1], per_row[:, 2]
    W_y = per_row[:, 3] if has_weight else own
    log_S = torch.log(S)
    lse = M + log_S
    loss = (1.0 - eps) * W_y * ((M - Z_y) + log_S)
    if sum_wd is not None:
        loss = loss + eps / V * (W * log_S - per_row[:, -1])
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    # A live row whose target no rank owns (out of [0, V), or shards that overlap or leave gaps) gets NaN,
    # as the CUDA kernels give for an out-of-range target; CPU tensors raise (no sync there), on every rank
    # alike since own is the same everywhere after the all-reduce.
    bad = live & (own != 1)
    if own.device.type == "cpu" and own.numel() and not torch.compiler.is_compiling() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"fusedloss.distributed: row {i}'s target is owned by {int(own[i])} ranks, expected 1: "
                         f"the target is out of [0, V) = [0, {int(V)}) (and not ignore_index), or the ranks' "
                         "vocab_start / slice sizes overlap or leave gaps")
    loss = torch.where(bad, float("nan"), loss)
    loss = torch.where(live, loss, 0.0)
    log_S_grad = torch.where(live, log_S, float("inf"))
    return loss, (M, log_S_grad, Z_y, W_y), (V, W)


def _grad_coefs(g: Tensor, live: Tensor, M, log_S, Z_y, W_y, V, W, eps: float, z_loss: float):
    """Per-row constants of step 4 for upstream gradient g: (p_scale, smooth, grad at the target)."""
    g = torch.where(live, g, 0.0)
    nll = g * (1.0 - eps) * W_y
    smooth = g * (eps / V)
    p_scale = nll + smooth * W
    lse_term = g * (2.0 * z_loss) * (M + log_S) if z_loss > 0 else None
    if lse_term is not None:
        p_scale = p_scale + torch.where(live, lse_term, 0.0)
    d = (Z_y - M) - log_S  # log p_y (-inf on rows not live)
    p_y = torch.exp(d)
    target = nll * torch.expm1(d) + smooth * (p_y * W - W_y)
    if lse_term is not None:
        target = target + torch.where(live, lse_term * p_y, 0.0)
    return p_scale, smooth, torch.where(live, target, 0.0)


def _logit_grad_(z: Tensor, rows: slice, M, log_S, p_scale, smooth, target_grad, y_local, owned, w) -> Tensor:
    """Overwrites z (rows of the shard's logits, accumulation dtype) with their gradient (step 4)."""
    if z.shape[1] == 0:
        return z
    z.sub_(M[rows].unsqueeze(1)).sub_(log_S[rows].unsqueeze(1)).exp_().mul_(p_scale[rows].unsqueeze(1))
    if smooth is not None:
        if w is None:
            z.sub_(smooth[rows].unsqueeze(1))
        else:
            z.addcmul_(smooth[rows].unsqueeze(1), w.unsqueeze(0), value=-1.0)
    idx = y_local[rows].clamp(0, z.shape[1] - 1).unsqueeze(1)
    z.scatter_(1, idx, torch.where(owned[rows].unsqueeze(1), target_grad[rows].unsqueeze(1), z.gather(1, idx)))
    return z


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, w, start, ignore_index, eps, z_loss, name, group):
        n, c = x.shape
        live = target != ignore_index
        y_local = target - start
        owned = live & (y_local >= 0) & (y_local < c)
        stats = _shard_stats(x, y_local, owned, live, w, eps > 0, _stats_kernel(name))
        w_y = _owned_weight(w, y_local, owned, n, c, acc_dtype(x.dtype), x.device)
        w_sum = w.sum() if w is not None else float(c)
        loss, saved, (V, W) = _combine(*stats, owned, w_y, c, w_sum, live, group=group, eps=eps, z_loss=z_loss,
                                       has_weight=w is not None)
        ctx.save_for_backward(x, w, live, y_local, owned, *saved, V, W)
        ctx.scalars = (eps, z_loss)
        W_y = saved[3]
        ctx.mark_non_differentiable(W_y)
        return loss, W_y

    @staticmethod
    def backward(ctx, grad_loss, _grad_w_y):
        x, w, live, y_local, owned, M, log_S, Z_y, W_y, V, W = ctx.saved_tensors
        eps, z_loss = ctx.scalars
        acc = acc_dtype(x.dtype)
        p_scale, smooth, target_grad = _grad_coefs(grad_loss.to(acc), live, M, log_S, Z_y, W_y, V, W, eps, z_loss)
        smooth = smooth if eps > 0 else None
        n, c = x.shape
        grad = torch.empty((n, c), dtype=x.dtype, device=x.device)
        if x.dtype == acc:  # the gradient's own buffer holds the intermediate values
            grad.copy_(x)
            _logit_grad_(grad, slice(None), M, log_S, p_scale, smooth, target_grad, y_local, owned, w)
        else:
            step = max(1, _GRAD_CHUNK_BYTES // max(1, c * torch.empty((), dtype=acc).element_size()))
            for lo in range(0, n, step):
                rows = slice(lo, min(n, lo + step))
                grad[rows] = _logit_grad_(x[rows].to(acc), rows, M, log_S, p_scale, smooth, target_grad, y_local,
                                          owned, w)
        return grad, None, None, None, None, None, None, None, None


def _check_ce_args(reduction, label_smoothing, z_loss, ignore_index):
    _checks.reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return _checks.in_closed_unit("label_smoothing", label_smoothing), _checks.non_negative("z_loss", z_loss)


def _check_target(target: Tensor, expected: torch.Size, input_name: str, input: Tensor) -> None:
    _checks.tensor("target", target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold int64 global class indices, got dtype {target.dtype} (probability "
                        "targets are not supported by the vocab-parallel losses)")
    if target.shape != expected:
        raise ValueError(f"target must have shape {tuple(expected)} for {input_name} of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    _checks.same_device("target", target, input_name, input)


def _reduce(loss: Tensor, w_y: Tensor, live: Tensor, reduction: str, shape, has_weight: bool,
            token_weight: Tensor | None) -> Tensor:
    mass = w_y if has_weight else live.to(loss.dtype)
    if token_weight is not None:
        loss = loss * token_weight
        mass = mass * torch.where(live, token_weight, 0.0)
    if reduction == "none":
        return loss.view(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    # torch's mean: divided by the weight mass of the non-ignored targets (their count without weights),
    # each weighted by its token weight; 0 / 0 = NaN when every row is ignored, as torch.
    return total / mass.sum()


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy over logits whose class dimension is split across the ranks of ``group``.

    Rank r holds ``logits_shard`` ``(N, V_r)`` (or ``(V_r,)`` with a 0-dim target): classes ``[vocab_start,
    vocab_start + V_r)`` of the same N rows on every rank. Slices may be uneven (an empty one too) and
    must tile ``[0, V)``; ``vocab_start=None`` derives them from the slice sizes in rank order (one small
    all_gather per call; pass it to save that). ``target`` holds global class indices, the same on every
    rank. ``weight`` is this rank's slice of the class weights, ``(V_r,)``, like the logits.
    ``token_weight`` (the target's shape, the same on every rank) as in :func:`fusedloss.cross_entropy`.

    Every rank returns the same value, equal to :func:`fusedloss.cross_entropy` on the full ``(N, V)``
    logits with the same arguments (label smoothing normalized by the global V; torch's weighted mean).
    Backward needs no communication: each rank's gradient is exactly its columns of the full gradient
    (every rank calls backward on its copy of the loss; with DDP on top nothing changes, the shards are
    distinct parameters' inputs). Communication: two all-reduces of N-sized vectors (a MAX and a SUM of 3
    to 5 columns); no (N, V) gather.

    A live target that no rank owns (outside ``[0, V)`` and not ``ignore_index``) raises IndexError on
    every rank for CPU tensors and gives a NaN loss for that row on GPUs (no host sync), as the CUDA
    kernels of :func:`fusedloss.cross_entropy` do. The shard's statistics come from the fused forward kernel
    of ``backend`` (see the module docstring for the gradient). Loss in float32 for fp16/bf16/fp32 input,
    gradient in the input's dtype.
    """
    rank, world = _group_info("vocab_parallel_cross_entropy", group)
    _checks.floating("logits_shard", logits_shard)
    eps, z_loss = _check_ce_args(reduction, label_smoothing, z_loss, ignore_index)
    if logits_shard.dim() not in (1, 2):
        raise ValueError(f"logits_shard must be (N, V_r) or (V_r,), got shape {tuple(logits_shard.shape)}")
    _check_target(target, logits_shard.shape[:-1], "logits_shard", logits_shard)
    c = logits_shard.shape[-1]
    weight = _checks.class_weight(weight, c, logits_shard)
    name = _backend.resolve(backend, logits_shard.device)
    rows = logits_shard.unsqueeze(0) if logits_shard.dim() == 1 else logits_shard
    if c > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    flat_target = target.reshape(-1).to(torch.int64)
    acc = acc_dtype(logits_shard.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None
    start = _vocab_start(c, vocab_start, rank, world, logits_shard.device, group)
    u = _checks.token_weight(token_weight, target.shape, logits_shard, acc)
    loss, w_y = _VocabParallelCE.apply(rows, flat_target, w, start, ignore_index, eps, z_loss, name, group)
    return _reduce(loss, w_y, flat_target != ignore_index, reduction, target.shape, w is not None, u)


# --- vocab-parallel linear cross-entropy ----------------------------------------------------------------

class _VocabParallelLinearCE(torch.autograd.Function):
    """Chunks of rows: the forward computes each chunk's logits for the statistics of step 1 and drops them;
    the backward recomputes them, turns them into their gradient G_c in place and runs the gradient GEMMs
    (dX_c = G_c W_r, dW_r += G_c^T X_c, db_r += column sums of G_c), then all-reduces dX when asked."""

    @staticmethod
    def forward(ctx, x, weight_shard, bias, target, w, start, ignore_index, eps, z_loss, chunk, name, group,
                reduce_input_grad):
        n, d = x.shape
        c = weight_shard.shape[0]
        acc = acc_dtype(x.dtype)
        mixed = _lce._mixed_precision(x)
        op_dtype = x.dtype if mixed else acc
        live = target != ignore_index
        y_local = target - start
        owned = live & (y_local >= 0) & (y_local < c)
        stats_fn = _stats_kernel(name)
        w_op = weight_shard.to(op_dtype)
        b_acc = bias.to(acc) if bias is not None else None
        logits_buf = torch.empty((chunk, c), dtype=acc, device=x.device)
        parts = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits = _chunk_logits(x[lo:hi].to(op_dtype), w_op, b_acc, logits_buf[: hi - lo], mixed, acc)
            parts.append(_shard_stats(logits, y_local[lo:hi], owned[lo:hi], live[lo:hi], w, eps > 0, stats_fn))
        if parts:
            m, log_s, sum_wd, z_y = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
        else:
            empty = x.new_zeros((0,), dtype=acc)
            m, log_s, sum_wd, z_y = empty, empty, empty if eps > 0 else None, empty
        w_y = _owned_weight(w, y_local, owned, n, c, acc, x.device)
        w_sum = w.sum() if w is not None else float(c)
        loss, saved, (V, W) = _combine(m, log_s, sum_wd, z_y, owned, w_y, c, w_sum, live, group=group, eps=eps,
                                       z_loss=z_loss, has_weight=w is not None)
        ctx.save_for_backward(x, weight_shard, bias, w, live, y_local, owned, *saved, V, W)
        ctx.scalars = (eps, z_loss, chunk, mixed, reduce_input_grad)
        ctx.group = group
        ctx.mark_non_differentiable(saved[3])
        return loss, saved[3]

    @staticmethod
    def backward(ctx, grad_loss, _grad_w_y):
        x, weight_shard, bias, w, live, y_local, owned, M, log_S, Z_y, W_y, V, W = ctx.saved_tensors
        eps, z_loss, chunk, mixed, reduce_input_grad = ctx.scalars
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, d = x.shape
        c = weight_shard.shape[0]
        acc = acc_dtype(x.dtype)
        op_dtype = x.dtype if mixed else acc
        p_scale, smooth, target_grad = _grad_coefs(grad_loss.to(acc), live, M, log_S, Z_y, W_y, V, W, eps, z_loss)
        smooth = smooth if eps > 0 else None
        w_op = weight_shard.to(op_dtype)
        b_acc = bias.to(acc) if bias is not None else None
        logits_buf = torch.empty((chunk, c), dtype=acc, device=x.device)
        g_buf = torch.empty((chunk, c), dtype=op_dtype, device=x.device) if mixed else None
        gx = torch.empty((n, d), dtype=acc, device=x.device) if need_x else None
        gw = torch.zeros((c, d), dtype=acc, device=x.device) if need_w else None
        gb = torch.zeros((c,), dtype=acc, device=x.device) if need_b and bias is not None else None
        mm_kw = {"out_dtype": acc} if mixed else {}
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            xc = x[lo:hi].to(op_dtype)
            g = _chunk_logits(xc, w_op, b_acc, logits_buf[: hi - lo], mixed, acc)
            _logit_grad_(g, slice(lo, hi), M, log_S, p_scale, smooth, target_grad, y_local, owned, w)
            if gb is not None:
                gb += g.sum(0)
            if g_buf is not None:
                g = g_buf[: hi - lo].copy_(g)  # cuBLAS takes one operand dtype (as the linear_cross_entropy op)
            if gx is not None:
                torch.mm(g, w_op, out=gx[lo:hi], **mm_kw)
            if gw is not None:
                torch.addmm(gw, g.T, xc, out=gw, **mm_kw)
        if gx is not None and reduce_input_grad:
            # The input is the same on every rank; its gradient is the sum of every shard's G_r W_r.
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=ctx.group)
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight_shard.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None, None, None, None, None, None, None, None,
                None)


def _chunk_logits(xc: Tensor, w_op: Tensor, b_acc: Tensor | None, out: Tensor, mixed: bool, acc) -> Tensor:
    if out.shape[1] == 0:
        return out
    mm_kw = {"out_dtype": acc} if mixed else {}
    if b_acc is None:
        return torch.mm(xc, w_op.T, out=out, **mm_kw)
    return torch.addmm(b_acc, xc, w_op.T, out=out, **mm_kw)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    group=None,
    vocab_start: int | Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    chunk_size: int | None = None,
    reduce_input_grad: bool = True,
    backend: str | None = None,
) -> Tensor:
    """``vocab_parallel_cross_entropy(input @ weight_shard.T + linear_bias, target, ...)`` without the logits.

    A vocab-sharded LM head: ``input`` ``(N, D)`` (or ``(D,)`` with a 0-dim target), the same on every rank;
    ``weight_shard`` ``(V_r, D)`` and ``linear_bias`` ``(V_r,)`` this rank's rows of the head, classes
    ``[vocab_start, vocab_start + V_r)`` (default: from the slice sizes in rank order); ``weight`` the
    ``(V_r,)`` class weights of the slice. Other arguments (``token_weight`` too) and the result as
    :func:`vocab_parallel_cross_entropy`.

    Rows run in chunks of ``chunk_size`` (None: the size linear_cross_entropy would pick for this shard):
    only a chunk's logits exist at a time, never the ``(N, V_r)`` ones. The forward computes each chunk's
    logits once for the fused statistics kernel; the backward recomputes them (one GEMM more than the
    single-GPU linear_cross_entropy, which computes its gradients in the forward: here the gradient needs
    the global log-sum-exp, known only after the all-reduces that follow the last chunk).

    Gradients: ``weight_shard`` and ``linear_bias`` get exactly their rows of the full head's gradient, with
    no communication. The input's gradient is a sum over all shards: with ``reduce_input_grad=True`` the
    backward all-reduces it, so every rank gets the full gradient of its (replicated) input; pass False
    when the model already all-reduces it (a Megatron-style "copy to tensor-parallel region" before the
    head), and each rank then gets only its shard's part.
    """
    rank, world = _group_info("vocab_parallel_linear_cross_entropy", group)
    _checks.floating("input", input)
    _checks.floating("weight_shard", weight_shard)
    eps, z_loss = _check_ce_args(reduction, label_smoothing, z_loss, ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if input.dim() not in (1, 2):
        raise ValueError(f"input must be (N, D) or (D,), got shape {tuple(input.shape)}")
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard must be (V_r, D), got shape {tuple(weight_shard.shape)}")
    c, d = weight_shard.shape
    if input.shape[-1] != d:
        raise ValueError(f"input has {input.shape[-1]} features (last dim) but weight_shard has {d} "
                         f"(shape {tuple(weight_shard.shape)}): they must match")
    _checks.same_device("weight_shard", weight_shard, "input", input)
    if weight_shard.dtype != input.dtype:
        raise TypeError(f"weight_shard has dtype {weight_shard.dtype} but input has {input.dtype}; cast them to one "
                        "dtype")
    if linear_bias is not None:
        _checks.floating("linear_bias", linear_bias)
        if linear_bias.shape != (c,):
            raise ValueError(f"linear_bias must have shape ({c},) (one per class of the shard), got "
                             f"{tuple(linear_bias.shape)}")
        _checks.same_device("linear_bias", linear_bias, "input", input)
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias has dtype {linear_bias.dtype} but input has {input.dtype}; cast them "
                            "to one dtype")
    _check_target(target, input.shape[:-1], "input", input)
    weight = _checks.class_weight(weight, c, input)
    name = _backend.resolve(backend, input.device)
    rows = input.reshape(-1, d)
    n = rows.shape[0]
    flat_target = target.reshape(-1).to(torch.int64)
    acc = acc_dtype(input.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None
    chunk = chunk_size or _lce.auto_chunk_size(n, d, max(c, 1), input.device, input.dtype)
    chunk = max(1, min(chunk, max(n, 1)))
    start = _vocab_start(c, vocab_start, rank, world, input.device, group)
    u = _checks.token_weight(token_weight, target.shape, input, acc)
    loss, w_y = _VocabParallelLinearCE.apply(rows, weight_shard, linear_bias, flat_target, w, start, ignore_index,
                                             eps, z_loss, chunk, name, group, bool(reduce_input_grad))
    return _reduce(loss, w_y, flat_target != ignore_index, reduction, target.shape, w is not None, u)


# --- gathered InfoNCE ------------------------------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 with gradient; sizes (the rows of every rank) may differ.

    Every rank's loss depends on every rank's rows, so the gradient of rank r's rows is the sum over ranks
    of the gradients their losses send to the gathered copy of those rows: a reduce-scatter SUM. (An
    average, or keeping only the local loss's part, is the classic mistake: off by the world size, or
    missing the other ranks' terms.)"""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        world, most = len(sizes), max(sizes)
        src = x.contiguous()
        if x.shape[0] < most:  # gloo and NCCL gather equal shapes: pad, then drop the padding
            src = torch.cat([src, src.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
        out = x.new_empty((world * most,) + tuple(x.shape[1:]))
        _all_gather(out, src, group)
        if all(s == most for s in sizes):
            return out
        return torch.cat([out[r * most: r * most + s] for r, s in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        most = max(sizes)
        grad = grad.contiguous()
        if any(s != most for s in sizes):
            padded = grad.new_zeros((len(sizes) * most,) + tuple(grad.shape[1:]))
            for r, piece in enumerate(grad.split(sizes)):
                padded[r * most: r * most + sizes[r]] = piece
            grad = padded
        out = grad.new_empty((most,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, grad, ctx.group)
        return out[: sizes[rank]], None, None, None


def _batch_sizes(query: Tensor, key: Tensor, batch_sizes, world: int, group) -> list[tuple[int, int]]:
    if batch_sizes is not None:
        sizes = [(int(q), int(k)) for q, k in batch_sizes]
        if len(sizes) != world:
            raise ValueError(f"batch_sizes must give (N_r, M_r) for each of the {world} ranks, got {len(sizes)}")
        return sizes
    local = torch.tensor([query.shape[0], key.shape[0]], dtype=torch.int64, device=query.device)
    every = torch.empty(2 * world, dtype=torch.int64, device=query.device)
    _all_gather(every, local, group)
    flat = every.tolist()  # the shapes of the gather: needed on the host (a sync on GPUs)
    return [(flat[2 * r], flat[2 * r + 1]) for r in range(world)]


def info_nce(
    query: Tensor,
    key: Tensor,
    labels: Tensor | None = None,
    *,
    query_groups: Tensor | None = None,
    key_groups: Tensor | None = None,
    group=None,
    temperature: float | Tensor = 0.07,
    normalize: bool = True,
    symmetric: bool = False,
    reduction: str = "mean",
    batch_sizes=None,
    backend: str | None = None,
) -> Tensor:
    """InfoNCE of this rank's queries against the keys of every rank of ``group``.

    Rank r holds ``query`` ``(N_r, D)`` and ``key`` ``(M_r, D)``. The keys are all-gathered with gradient (in
    rank order: K = cat of every rank's keys) and each local query is scored against all of them with
    :func:`fusedloss.info_nce`: the other ranks' keys are extra negatives. Positives: ``labels`` ``(N_r,)``
    index this rank's own keys (default ``arange(N_r)``, needs ``M_r >= N_r``) and are offset by the number
    of keys on the lower ranks. ``symmetric=True`` (needs ``M_r == N_r`` and default labels) gathers the
    queries too and averages with the key -> query direction of this rank's keys against all queries.

    Contract (tested): with equal batch sizes and ``reduction="mean"``, ``sum_r loss_r / world_size`` equals
    ``fusedloss.info_nce`` on the concatenated batch (labels concatenated with their offsets). With uneven
    batches, ``"mean"`` is the mean over this rank's queries; ``sum_r loss_r(reduction="sum") / sum_r N_r``
    is then the global mean. Gradients: if every rank backpropagates ``loss_r / world_size`` (the terms of
    that sum), each rank's gradients of its own ``query`` and ``key`` equal the matching rows of the
    single-process gradients; the gather's backward sums what every rank's loss sends to each rank's rows
    (a reduce-scatter). Under DDP backpropagate ``loss_r`` itself: each rank's gradients are then
    world_size times its rows of the single-process ones, and DDP's average over ranks gives exactly the
    single-process parameter gradients.

    Several positives (``query_groups`` ``(N_r,)``, ``key_groups`` ``(M_r,)``, as :func:`fusedloss.info_nce`):
    the key groups are gathered with the keys, so a query's positives are every key of its group on any
    rank. ``"mean"`` is then the mean over this rank's queries that have a positive; with ``"sum"`` on every
    rank, ``sum_r loss_r`` over the global count of such queries is the single-process mean.

    A learnable ``temperature`` (0-dim tensor requiring grad, one copy per rank) gets the gradient of this
    rank's loss only: the sum of those over ranks is the single-process gradient (DDP's all-reduce
    averages them, consistent with the above when each rank backpropagates ``loss_r``).

    ``batch_sizes``: ``[(N_0, M_0), (N_1, M_1), ...]`` for every rank when known; None gathers them (one
    tiny all_gather and, on GPUs, a host sync per call). Communication: one all_gather of the keys (of
    queries and keys for symmetric) forward, one reduce-scatter of their gradient backward, in float32 for
    fp16/bf16 inputs (see below). The loss is float32 for fp16/bf16/fp32 inputs, gradients in their dtype.
    """
    rank, world = _group_info("info_nce", group)
    _checks.query_key(query, key)
    _checks.reduction(reduction)
    n, m = query.shape[0], key.shape[0]
    grouped = query_groups is not None or key_groups is not None
    if grouped:
        query_groups, key_groups = _functional._group_ids(query_groups, key_groups, labels, symmetric, query, n, m)
    if symmetric and labels is not None:
        raise ValueError("symmetric=True uses the default labels (query i pairs with key i); got labels")
    if labels is None and m < n and not grouped:
        raise ValueError(f"the default labels arange(N) need at least as many keys as queries on each rank, got "
                         f"N={n} queries and M={m} keys; pass labels")
    sizes = _batch_sizes(query, key, batch_sizes, world, group)
    if (n, m) != sizes[rank]:
        raise ValueError(f"batch_sizes[{rank}] is {sizes[rank]} but this rank has N={n} queries and M={m} keys")
    if symmetric and any(q != k for q, k in sizes):
        raise ValueError(f"symmetric=True needs as many keys as queries on every rank, got (N_r, M_r) = {sizes}")
    offset = sum(k for _, k in sizes[:rank])
    acc = acc_dtype(query.dtype)
    if grouped:
        # fp16/bf16 rows travel in float32, as below; the group ids travel with their keys.
        all_k = _GatherRows.apply(key.to(acc), [m_r for _, m_r in sizes], rank, group)
        all_groups = _GatherRows.apply(key_groups, [m_r for _, m_r in sizes], rank, group)
        return _functional.info_nce(query.to(acc), all_k, query_groups=query_groups, key_groups=all_groups,
                                    temperature=temperature, normalize=normalize, reduction=reduction,
                                    backend=backend)
    labels = _checks.key_labels(labels, query, n, m, keys="this rank's keys")
    if labels is None:
        labels = torch.arange(n, device=query.device)
    global_labels = labels + offset
    kw = dict(temperature=temperature, normalize=normalize, reduction="none", backend=backend)
    # fp16/bf16 rows travel in float32 (fusedloss.info_nce computes in float32 anyway): the gradient that
    # comes back is then summed over ranks in float32 and rounded to the input dtype once, by autograd,
    # instead of once per rank and again in the sum.
    q, k = query.to(acc), key.to(acc)
    if symmetric:
        # One collective for both: the backward then has one reduce-scatter, whose order across ranks
        # cannot depend on the order autograd visits two of them.
        both = _GatherRows.apply(torch.cat([q, k], 1), [n_r for n_r, _ in sizes], rank, group)
        all_q, all_k = both.split(q.shape[1], dim=1)
        loss = 0.5 * (_functional.info_nce(q, all_k, global_labels, **kw)
                      + _functional.info_nce(k, all_q, global_labels, **kw))
    else:
        all_k = _GatherRows.apply(k, [m_r for _, m_r in sizes], rank, group)
        loss = _functional.info_nce(q, all_k, global_labels, **kw)
    return _functional._reduce_info_nce(loss, reduction, n)


def siglip_loss(
    query: Tensor,
    key: Tensor,
    *,
    group=None,
    temperature: float | Tensor = 10.0,
    bias: float | Tensor = -10.0,
    normalize: bool = True,
    labels: Tensor | None = None,
    reduction: str = "mean",
    batch_sizes=None,
    backend: str | None = None,
) -> Tensor:
    """SigLIP's sigmoid loss of this rank's queries against the keys of every rank of ``group``.

    As :func:`info_nce`: rank r holds ``query`` ``(N_r, D)`` and ``key`` ``(M_r, D)``; the keys are
    all-gathered with gradient (in rank order) and each local query is scored against all of them with
    :func:`fusedloss.siglip_loss`: the other ranks' keys are negatives (open_clip's SigLipLoss over every
    rank's texts). ``labels`` ``(N_r,)`` index this rank's own keys (default the diagonal, needs
    ``M_r >= N_r``) and are offset by the number of keys on the lower ranks. ``"mean"`` divides by this
    rank's N_r (open_clip's normalization).

    Contract (tested): with equal batch sizes and ``reduction="mean"``, ``sum_r loss_r / world_size`` equals
    :func:`fusedloss.siglip_loss` on the concatenated batch (labels concatenated with their offsets); its
    gradients, with every rank backpropagating ``loss_r / world_size``, are the single-process ones (the
    gather's backward is a reduce-scatter SUM). A learnable ``temperature`` / ``bias`` (one copy per rank)
    gets the gradient of this rank's loss only; their sum over ranks is the single-process gradient.
    ``batch_sizes`` and the communication (float32 rows for fp16/bf16 inputs) are as for :func:`info_nce`.
    """
    rank, world = _group_info("siglip_loss", group)
    _checks.query_key(query, key)
    _checks.reduction(reduction)
    n, m = query.shape[0], key.shape[0]
    if labels is None and m < n:
        raise ValueError(f"the default labels (query i's positive is key i) need at least as many keys as queries "
                         f"on each rank, got N={n} queries and M={m} keys; pass labels")
    sizes = _batch_sizes(query, key, batch_sizes, world, group)
    if (n, m) != sizes[rank]:
        raise ValueError(f"batch_sizes[{rank}] is {sizes[rank]} but this rank has N={n} queries and M={m} keys")
    offset = sum(k for _, k in sizes[:rank])
    # The local labels checked against this rank's keys (IndexError on CPU), then moved to the gathered
    # keys' numbering.
    labels = _checks.key_labels(labels, query, n, m)
    global_labels = (labels if labels is not None else torch.arange(n, device=query.device)) + offset
    acc = acc_dtype(query.dtype)
    all_k = _GatherRows.apply(key.to(acc), [m_r for _, m_r in sizes], rank, group)
    return _functional.siglip_loss(query.to(acc), all_k, temperature=temperature, bias=bias, normalize=normalize,
                                   labels=global_labels, reduction=reduction, backend=backend)
