"""Pure-PyTorch losses: the test oracle (run in float64) and the ``"reference"`` backend.

Written for clarity, not speed: they materialize everything the fused kernels avoid. They share no
code with the kernels, so a test comparing the two checks two independent derivations. Inputs in
bf16/fp16 are computed in float32, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def transform_logits(x: Tensor, softcap: float | None, temperature: float) -> Tensor:
    """z = softcap * tanh(x / softcap) / temperature (the softcap first, then the temperature)."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _checked_on_host(target: Tensor) -> bool:
    """Whether targets may be read on the host to raise an IndexError: CPU tensors in eager mode only.
    Under torch.compile that read would be a data-dependent branch (a graph break, an error with
    fullgraph=True), so there the rows are masked on device as elsewhere."""
    return target.device.type == "cpu" and target.numel() > 0 and not torch.compiler.is_compiling()


def _out_of_range(target: Tensor, ignored: Tensor, C: int) -> Tensor:
    """Targets outside [0, C) that are not ignore_index: an IndexError for CPU tensors in eager mode;
    elsewhere (no host sync) the mask of their rows, whose loss becomes NaN, as the GPU kernels do."""
    bad = ~ignored & ((target < 0) | (target >= C))
    if _checked_on_host(target) and bool(bad.any()):
        raise IndexError(f"target {int(target[bad][0])} is out of range for {C} classes")
    return bad


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_lse: bool = False,
    return_logprob: bool = False,
    return_entropy: bool = False,
):
    """Softmax cross-entropy with torch's semantics plus z-loss, softcap, temperature and token weights.

    Per element with class-index targets (0 where ``target == ignore_index``):
      (1 - eps) * w[y] * (lse - z_y) + eps / C * sum_j w[j] * (lse - z_j) + z_loss * lse**2
    ``mean`` divides the sum by sum of w[y] over non-ignored elements (their count without weights).
    With probability targets t: -sum_j w[j] * t'_j * (z_j - lse) + z_loss * lse**2, with
    t' = (1 - eps) * t + eps / C, and ``mean`` divides by the number of elements.
    ``token_weight`` u (the target's shape for class indices, the input's without the class dim for
    probabilities) multiplies each element's loss and its term of the mean's denominator.
    ``return_lse``, ``return_logprob`` (log softmax(z)[y], class indices only) and ``return_entropy``
    (-sum_j p_j log p_j) add per-element tensors in that order, 0 where ignored.
    """
    cdim = 0 if input.dim() == 1 else 1
    C = input.shape[cdim]
    x = input.to(_compute_dtype(input.dtype))
    z = transform_logits(x, softcap, temperature)
    lse = torch.logsumexp(z, dim=cdim)
    # log_softmax, not z - lse: at |z| ~ 1e30 the lse rounds to z's ulp and z - lse loses the whole
    # answer (log C for equal logits); log_softmax subtracts the max first, as torch's loss does.
    logp = torch.log_softmax(z, dim=cdim)
    w_shape = [1] * x.dim()
    w_shape[cdim] = C
    w = weight.to(x.dtype).view(w_shape) if weight is not None else None

    u = token_weight.to(x.dtype) if token_weight is not None else None
    # 0 log 0 = 0 for a -inf logit (a masked class), as the kernels; logp is zeroed there before the
    # product so that its backward sees no 0 * -inf either.
    entropy = -(logp.exp() * logp.masked_fill(logp == float("-inf"), 0.0)).sum(cdim) if return_entropy else None

    if target.is_floating_point():  # class probabilities, same shape as input
        if return_logprob:
            raise ValueError("return_logprob needs class-index targets")
        t = target.to(x.dtype)
        if label_smoothing > 0:
            t = t * (1 - label_smoothing) + label_smoothing / C
        wt = t * w if w is not None else t
        loss = -(wt * logp).sum(cdim)
        if z_loss > 0:
            loss = loss + z_loss * lse**2
        if u is not None:
            loss = loss * u.view(loss.shape)
        if reduction == "mean":
            count = u.sum() if u is not None else x.numel() // C
            out = loss.sum() / count if x.numel() else loss.sum() / 0.0
        else:
            out = loss.sum() if reduction == "sum" else loss
        return _with_extras(out, lse if return_lse else None, None, entropy)

    ignored = target == ignore_index
    bad = _out_of_range(target, ignored, C)
    safe = target.masked_fill(ignored | bad, 0)
    nll = -logp.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    w_y = torch.take(weight.to(x.dtype), safe) if weight is not None else torch.ones_like(nll)
    loss = (1 - label_smoothing) * w_y * nll
    if label_smoothing > 0:
        smooth = -(logp * w).sum(cdim) if w is not None else -logp.sum(cdim)
        loss = loss + label_smoothing / C * smooth
    if z_loss > 0:
        loss = loss + z_loss * lse**2
    loss = loss.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    lse = lse.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    if u is not None:
        u = u.view(loss.shape).masked_fill(ignored, 0.0)
        loss = loss * u
        w_y = w_y * u
    if reduction == "mean":
        out = loss.sum() / (w_y * ~ignored).sum()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    logprob = (-nll).masked_fill(ignored, 0.0).masked_fill(bad, float("nan")) if return_logprob else None
    if entropy is not None:
        entropy = entropy.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    return _with_extras(out, lse if return_lse else None, logprob, entropy)


def _with_extras(out: Tensor, *extras: Tensor | None):
    """``out`` alone, or ``(out, *extras)`` with the asked-for (not None) extras in order."""
    kept = tuple(e for e in extras if e is not None)
    return (out, *kept) if kept else out


def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: Tensor | None = None,
):
    """Multi-class focal loss (Lin et al. 2017) from its formula, by autograd through it.

    Per element (0 where ``target == ignore_index``), with p = softmax(input) along the class dim:
      w[y] * alpha_y * (1 - p_y)**gamma * (-log p_y)
    alpha_y is 1 (None), alpha (a float) or alpha[y] (a (C,) tensor). ``mean`` divides the sum by
    the sum of w[y] over non-ignored elements (their count without weights): alpha is not in the
    denominator. 1 - p_y is ``-expm1(log p_y)``; where it is exactly 0 (a row one-hot in the compute
    dtype), (1 - p_y)**gamma is taken as the constant 0 (1 for gamma = 0), whose gradient, 0, is the
    limit: autograd through q**gamma would give 0 * inf there for gamma < 1.
    """
    cdim = 0 if input.dim() == 1 else 1
    C = input.shape[cdim]
    x = input.to(_compute_dtype(input.dtype))
    logp_all = torch.log_softmax(x, dim=cdim)
    ignored = target == ignore_index
    bad = _out_of_range(target, ignored, C)
    safe = target.masked_fill(ignored | bad, 0)
    logp = logp_all.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    q = -torch.expm1(logp)
    if gamma == 0:
        focal = torch.ones_like(q)
    else:
        live = q > 0
        focal = torch.where(live, torch.where(live, q, 1.0) ** gamma, 0.0)
    loss = -focal * logp
    w_y = torch.take(weight.to(x.dtype), safe) if weight is not None else torch.ones_like(loss)
    loss = loss * w_y
    if isinstance(alpha, Tensor):
        loss = loss * torch.take(alpha.to(x.dtype), safe)
    elif alpha is not None:
        loss = loss * float(alpha)
    loss = loss.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    if token_weight is not None:
        u = token_weight.to(x.dtype).view(loss.shape).masked_fill(ignored, 0.0)
        loss = loss * u
        w_y = w_y * u
    if reduction == "mean":
        return loss.sum() / (w_y * ~ignored).sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def gap_loss(
    input: Tensor,
    target: Tensor,
    margin: float = 0.5,
    *,
    p: int = 1,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    class_normalize: bool = False,
    mode: str = "sum",
):
    """Multi-class gap hinge: per sample sum_{j != y} max(0, x_j - x_y + margin)**p (times weight[y]).

    ``mode="max"`` keeps only the term of the first class with the largest gap (Crammer-Singer); ``class_normalize`` divides by C
    (then it equals torch's multi_margin_loss); ``mean`` averages over non-ignored samples. A gap of
    exactly 0 (or NaN) counts as no violation, as in torch's kernels.
    """
    x = input.to(_compute_dtype(input.dtype))
    rows = x.reshape(1, -1) if x.dim() < 2 else x  # 0-dim: one sample of one class, as torch
    t = target.reshape(-1)
    C = rows.shape[1]
    ignored = t == ignore_index
    bad = _out_of_range(t, ignored, C)
    safe = t.masked_fill(ignored | bad, 0).unsqueeze(1)
    h = rows - rows.gather(1, safe) + margin
    term = torch.where(h > 0, h, torch.zeros_like(h)) ** p
    if mode == "max":
        # the first j != y with the largest gap (ties are common in bf16/fp16): the only class that
        # gets a gradient, besides y
        j = h.detach().scatter(1, safe, float("-inf")).argmax(1, keepdim=True)
        # C = 1: no j != y; an empty sum keeps the (zero) loss in the graph, as the kernels' zero gradient
        per = term.gather(1, j).squeeze(1) if C > 1 else term[:, :0].sum(1)
    else:
        per = term.scatter(1, safe, 0.0).sum(1)  # j != y
    if weight is not None:
        per = per * torch.take(weight.to(x.dtype), safe.squeeze(1))
    if class_normalize:
        per = per / C
    per = per.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    if reduction == "mean":
        return per.sum() / (~ignored).sum()
    if reduction == "sum":
        return per.sum()
    return per.reshape(target.shape)


def fwd_grad_reference(logits: Tensor, target: Tensor, weight: Tensor | None, grad_scale: Tensor | None,
                       ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                       temperature: float) -> tuple[Tensor, Tensor]:
    """fusedloss::cross_entropy_fwd_grad_ by autograd on ``cross_entropy`` (reduction none).

    Writes grad_scale_i * d loss_i / d logits_i (grad_scale None means 1) over ``logits`` and returns
    the per-row loss and lse in the accumulation dtype (float32, float64 for float64 logits); 0 for
    ignored rows, whose gradient is 0. ``softcap`` 0 means no cap, as in the kernel ops.
    """
    with torch.enable_grad():
        x = logits.detach().to(_compute_dtype(logits.dtype)).requires_grad_()
        loss, lse = cross_entropy(x, target, weight, ignore_index=ignore_index, reduction="none",
                                  label_smoothing=label_smoothing, z_loss=z_loss,
                                  softcap=softcap if softcap > 0 else None, temperature=temperature,
                                  return_lse=True)
        scale = torch.ones_like(loss) if grad_scale is None else grad_scale.to(loss.dtype).expand_as(loss)
        (grad,) = torch.autograd.grad(loss, x, scale)
    logits.copy_(grad)
    return loss.detach(), lse.detach()


def info_nce(
    query: Tensor,
    key: Tensor,
    labels: Tensor | None = None,
    *,
    query_groups: Tensor | None = None,
    key_groups: Tensor | None = None,
    temperature: float | Tensor = 0.07,
    normalize: bool = True,
    symmetric: bool = False,
    reduction: str = "mean",
):
    """InfoNCE from its definition: the (N, M) logits, then cross-entropy along rows (and columns).

    logits = sim(Q, K) / temperature with sim the dot product of L2-normalized rows
    (``F.normalize``) when ``normalize``; loss_i = cross_entropy(logits_i, labels_i), labels
    ``arange(N)`` by default. ``symmetric`` (M == N, default labels) averages per index with the
    key -> query direction: cross_entropy(logits.T_j, j). ``mean`` divides by N.

    With ``query_groups`` / ``key_groups`` (supervised-contrastive positives): loss_i = -mean over the
    keys j of query i's group of log_softmax(logits_i)_j; a query whose group has no key is left out
    (0 with ``none``; ``mean`` divides by the number of queries with a positive).
    """
    dtype = _compute_dtype(query.dtype)
    q = query.to(dtype)
    k = key.to(dtype)
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(dtype)
    logits = (q @ k.T) / temperature
    N = q.shape[0]
    if query_groups is not None:
        positive = query_groups[:, None] == key_groups[None, :]
        count = positive.sum(1)
        log_p = torch.log_softmax(logits, 1)
        kept = count > 0
        loss = torch.where(kept, -(log_p * positive).sum(1) / count.clamp_min(1), torch.zeros_like(log_p[:, 0]))
        if reduction == "mean":
            return loss.sum() / kept.sum()
        return loss.sum() if reduction == "sum" else loss
    if labels is None:
        labels = torch.arange(N, device=q.device)
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, torch.arange(N, device=q.device), reduction="none"))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def siglip_loss(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 10.0,
    bias: float | Tensor = -10.0,
    normalize: bool = True,
    labels: Tensor | None = None,
    reduction: str = "mean",
):
    """SigLIP's sigmoid loss from its definition: the (N, M) logits z = temperature * sim(Q, K) + bias, the
    label matrix y (+1 at (i, labels_i), default the diagonal, -1 elsewhere), loss_i = -sum_j
    logsigmoid(y_ij z_ij); ``mean`` divides by N (open_clip's SigLipLoss)."""
    dtype = _compute_dtype(query.dtype)
    q = query.to(dtype)
    k = key.to(dtype)
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(dtype)
    if isinstance(bias, Tensor):
        bias = bias.to(dtype)
    logits = temperature * (q @ k.T) + bias
    N = q.shape[0]
    if labels is None:
        labels = torch.arange(N, device=q.device)
    y = -torch.ones_like(logits)
    y[torch.arange(N, device=q.device), labels] = 1.0
    loss = -F.logsigmoid(y * logits).sum(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    token_weight: Tensor | None = None,
    return_lse: bool = False,
    return_logprob: bool = False,
    return_entropy: bool = False,
):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) with the full (N, V) logits.

    input (D,), (N, D) or (*, D) with target input.shape[:-1]; linear_weight (V, D); linear_bias (V,).
    Computed in float32 for bf16/fp16 input (float64 stays float64), as the kernels do. ``shift=1``
    scores each position against the next target of its sequence (``shift_target``), and the token
    weights go with their targets; the extra outputs are ``cross_entropy``'s.
    """
    if shift:
        target = shift_target(target, ignore_index)
        if token_weight is not None:
            token_weight = shift_target(token_weight, 0)
    x = input.to(_compute_dtype(input.dtype))
    logits = x @ linear_weight.to(x.dtype).T
    if linear_bias is not None:
        logits = logits + linear_bias.to(x.dtype)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
              softcap=softcap, return_lse=return_lse, return_logprob=return_logprob, return_entropy=return_entropy)
    if logits.dim() == 2 or logits.dim() == 1:
        return cross_entropy(logits, target, weight, token_weight=token_weight, **kw)
    # (*, V) rows, class last
    u = token_weight.reshape(-1) if token_weight is not None else None
    out = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight, token_weight=u, **kw)
    out = out if isinstance(out, tuple) else (out,)
    first = out[0].view(target.shape) if reduction == "none" else out[0]
    rest = tuple(e.view(target.shape) for e in out[1:])
    return (first, *rest) if rest else first


def shift_target(target: Tensor, ignore_index: int) -> Tensor:
    """The targets of ``shift=1``: position t of each sequence (the last dim of ``target``) gets target t + 1;
    the last position, which has no next token, gets ``ignore_index``. A 0-dim target (one position) is
    ignored."""
    if target.dim() == 0:
        return torch.full_like(target, ignore_index)
    return torch.cat([target[..., 1:], torch.full_like(target[..., :1], ignore_index)], dim=-1)


def _distill_rows(student: Tensor, teacher: Tensor, temperature: float, beta: float, jsd: bool) -> Tensor:
    """Per-row divergence of softmax(teacher / T) and softmax(student / T) (see kl_div_logits)."""
    log_q = torch.log_softmax(student.to(_compute_dtype(student.dtype)) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(_compute_dtype(teacher.dtype)) / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()

    def kl(pa: Tensor, log_pa: Tensor, log_pb: Tensor) -> Tensor:
        # sum pa (log pa - log pb), a zero-probability term 0 (x log x -> 0), with no NaN in its gradient
        return (pa * (torch.where(pa > 0, log_pa, torch.zeros_like(log_pa)) - log_pb)).sum(-1)

    if not jsd:
        return kl(p, log_p, log_q) * temperature**2
    if beta == 0.0:
        return kl(p, log_p, log_q)
    if beta == 1.0:
        return kl(q, log_q, log_p)
    log_m = torch.log(beta * p + (1.0 - beta) * q)
    return beta * kl(p, log_p, log_m) + (1.0 - beta) * kl(q, log_q, log_m)


def _distill(student, teacher, target, temperature, ignore_index, reduction, beta, jsd):
    rows = _distill_rows(student, teacher, temperature, beta, jsd)
    C = student.shape[-1]
    if target is not None:
        kept = target.reshape(rows.shape) != ignore_index
        rows = torch.where(kept, rows, torch.zeros_like(rows))
        count = kept.sum()
    else:
        count = torch.tensor(rows.numel(), device=rows.device)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / count
    return total / (count * C)  # "mean": per element, as torch's kl_div


def kl_div_logits(student: Tensor, teacher: Tensor, target: Tensor | None = None, *, temperature: float = 1.0,
                  ignore_index: int = -100, reduction: str = "batchmean") -> Tensor:
    """KL(p_teacher || p_student) of softmax(teacher / T) and softmax(student / T) per row (the class
    dimension last), times T**2: ``F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True)
    * T**2``, with a zero-probability teacher term 0. Rows whose ``target`` is ``ignore_index`` count 0
    and are not counted; ``batchmean`` divides by the kept rows, ``mean`` by kept rows times C,
    ``none`` returns the rows."""
    return _distill(student, teacher, target, temperature, ignore_index, reduction, 0.0, False)


def jsd_logits(student: Tensor, teacher: Tensor, target: Tensor | None = None, *, beta: float = 0.5,
               temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean") -> Tensor:
    """Generalized Jensen-Shannon divergence ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, m =
    ``beta p_t + (1 - beta) p_s``; beta 0 is KL(p_t || p_s), beta 1 KL(p_s || p_t) (Liger's JSD). No
    T**2 factor. Reductions as kl_div_logits."""
    return _distill(student, teacher, target, temperature, ignore_index, reduction, float(beta), True)


def linear_kl_div(student_input, student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
                  teacher_bias=None, temperature=1.0, ignore_index=-100, reduction="batchmean", beta=0.0, jsd=False):
    """kl_div_logits (jsd_logits when ``jsd``) of the two heads' logits, materialized."""
    s = student_input.to(_compute_dtype(student_input.dtype)) @ student_weight.to(
        _compute_dtype(student_weight.dtype)).T
    t = teacher_input.to(_compute_dtype(teacher_input.dtype)) @ teacher_weight.to(
        _compute_dtype(teacher_weight.dtype)).T
    if student_bias is not None:
        s = s + student_bias.to(s.dtype)
    if teacher_bias is not None:
        t = t + teacher_bias.to(t.dtype)
    return _distill(s, t, target, temperature, ignore_index, reduction, float(beta), jsd)


def linear_jsd(student_input, student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
               teacher_bias=None, beta=0.5, temperature=1.0, ignore_index=-100, reduction="batchmean"):
    """jsd_logits of the two heads' logits, materialized."""
    return linear_kl_div(student_input, student_weight, teacher_input, teacher_weight, target,
                         student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, beta=beta, jsd=True)
