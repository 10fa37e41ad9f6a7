"""The functional API: checks arguments, picks a backend, reshapes, calls the op, reduces on device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedloss import _backend, _checks, reference
from fusedloss.ops import cross_entropy as _ce
from fusedloss.ops import focal_loss as _fl
from fusedloss.ops import gap_loss as _gap
from fusedloss.ops import info_nce as _nce
from fusedloss.ops import kl_div as _kl
from fusedloss.ops import linear_cross_entropy as _lce
from fusedloss.ops import linear_kl_div as _lkl
from fusedloss.ops import siglip as _sig
from fusedloss.ops import soft_cross_entropy as _soft
from fusedloss.ops._common import acc_dtype
from fusedloss.ops._registry import REDUCTION

__all__ = ["cross_entropy", "focal_loss", "gap_loss", "info_nce", "linear_cross_entropy", "kl_div_logits", "jsd_logits",
           "linear_kl_div", "linear_jsd", "siglip_loss"]


def _reduce_rows_triton(loss: Tensor, reduction: str, out_shape: torch.Size, target: Tensor, weight: Tensor | None,
                        ignore_index: int, token_weight: Tensor | None) -> Tensor:
    """The reduction of per-row losses with autograd, for the one op whose kernels return rows (the fused
    Triton linear cross-entropy); the others reduce in their kernels. The mean's denominator comes from
    the reduction kernel (it depends on the target and the weights only: no gradient through it)."""
    weighted = loss if token_weight is None else loss * token_weight
    if reduction == "none":
        return weighted.view(out_shape)
    if reduction == "sum":
        return weighted.sum()
    # the kernel weighs the rows itself: it gets the unweighted ones (only its mass is used)
    _, mass = _ce.reduce_triton(loss.detach(), target, weight, ignore_index, REDUCTION["mean"], token_weight)
    return weighted.sum() / mass


def _class_rows(input: Tensor, C: int) -> Tensor:
    """input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` as ``(rows, C)`` with unit class stride, the
    layout the row kernels take: the class dimension moves last (free for channels-last input, one
    copy otherwise)."""
    if input.dim() == 1:
        rows = input.unsqueeze(0)
    elif input.dim() == 2:
        rows = input
    else:
        rows = input.movedim(1, -1).reshape(-1, C)
    if C > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def _flat_target(target: Tensor) -> Tensor:
    """Class indices as the contiguous int64 vector the kernels take (free when they are one)."""
    if target.dtype == torch.int64 and target.dim() == 1 and target.is_contiguous():
        return target
    return target.reshape(-1).to(torch.int64).contiguous()


def _unbatched_target(target: Tensor, expected: torch.Size, input: Tensor) -> Tensor:
    """The class-index target of ``input`` with the shape ``expected`` (input's without the class dim).
    An unbatched ``(C,)`` input also takes a ``(1,)`` target, as torch's cross_entropy and nll_loss do
    (the result is 0-dim there too)."""
    if target.shape != expected:
        if input.dim() == 1 and target.shape == (1,):
            return target.view(())
        raise ValueError(f"target must have shape {tuple(expected)} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    return target


def _acc_weight(weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Class weights in the accumulation dtype, contiguous, as the kernels take them."""
    if weight is None:
        return None
    return weight.to(acc_dtype(dtype)).contiguous()


def _soft_cross_entropy(name: str, input: Tensor, target: Tensor, weight: Tensor | None, u: Tensor | None,
                        expected: torch.Size, reduction: str, label_smoothing: float, z_loss: float,
                        softcap: float | None, temperature: float, return_lse: bool, return_entropy: bool):
    """cross_entropy with probability targets (target of the input's shape) on a kernel backend: both
    tensors as (rows, C) with unit class stride, the target in the input's dtype or the accumulation
    dtype (any other float dtype is cast to the latter, with autograd). ``u``: the checked token weights
    (flat), ``expected``: the per-element shape (the input's without the class dim). The entropy comes
    from the same kernel pass."""
    C = input.shape[0 if input.dim() == 1 else 1]
    acc = acc_dtype(input.dtype)
    if target.dtype != input.dtype and target.dtype != acc:
        target = target.to(acc)
    rows, trows = _class_rows(input, C), _class_rows(target, C)
    loss, lse, entropy = _soft.soft_cross_entropy(name, rows, trows, _acc_weight(weight, input.dtype), u, reduction,
                                                  label_smoothing, z_loss, softcap or 0.0, temperature, return_entropy)
    if input.dim() != 2:  # (C,) and (N, C, d1, ...): per element in the target's shape without the class dim
        lse = lse.view(expected)
        entropy = None if entropy is None else entropy.view(expected)
        loss = loss.view(expected) if reduction == "none" else loss
    if not (return_lse or return_entropy):
        return loss
    return (loss, *(t for t in (lse if return_lse else None, entropy) if t is not None))


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
    backend: str | None = None,
):
    """Fused softmax cross-entropy; a drop-in for ``torch.nn.functional.cross_entropy``.

    input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``; target class indices (input's shape without the
    class dimension; ``(1,)`` too for ``(C,)`` input, as torch) or class probabilities (input's shape).
    Extras: ``z_loss`` adds ``z_loss * lse**2`` per element, ``softcap`` maps logits to
    ``softcap * tanh(x / softcap)`` first, ``temperature`` then divides them, ``return_lse=True`` also
    returns the per-element lse (float32, 0 where ignored). The loss is float32 for fp16/bf16/fp32
    input (float64 for float64); the gradient has the input's dtype.

    ``return_logprob=True`` adds the per-element log-probability of the target (``log_softmax`` of the
    transformed logits at the target: the loss without weights, smoothing or z-loss, negated) and
    ``return_entropy=True`` the per-element entropy of that softmax, both float32 (float64 for float64
    input), 0 where ignored, differentiable (an entropy bonus trains through them), computed in the same
    pass over each row. The extra outputs come in the order ``(loss, lse, logprob, entropy)``, each only
    when asked for. Probability targets take ``return_entropy`` but not ``return_logprob``.

    ``token_weight`` (the target's shape, floating, finite, no gradient) multiplies each element's loss;
    ``mean`` then divides by the sum of ``token_weight * weight[target]`` over the kept elements (of
    ``token_weight`` for probability targets), which is torch's mean when every token weight is 1.

    Both kinds of target run the fused kernels of the chosen backend. With probability targets the
    loss is torch's ``-sum_j weight[j] * t'_j * log p_j`` with ``t' = (1 - label_smoothing) * t +
    label_smoothing / C`` (targets need not sum to 1), plus ``z_loss * lse**2``; ``mean`` divides by the
    number of elements (not by a weight sum; by the sum of ``token_weight`` when given), as torch does;
    ``ignore_index`` is refused; the target gets a gradient when it requires one (in its dtype; a
    float32 target of 16-bit logits is read in float32).
    """
    # The checks in the order of their errors; the common case (2-D input, int64 targets, CPU or
    # CUDA) reads each tensor attribute once: at these sizes each read is a fair share of the call.
    _checks.floating("input", input)
    _checks.tensor("target", target)
    _checks.reduction(reduction)
    label_smoothing, z_loss, softcap, temperature = _checks.ce_options(label_smoothing, z_loss, softcap, temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    C, expected = _checks.class_input(input, target)
    ndim, shape = input.dim(), input.shape
    weight = _checks.class_weight(weight, C, input)
    name = _backend.resolve_for(backend, input)
    if name != "reference":
        _checks.no_forward_ad("cross_entropy", input, target, weight, token_weight)
    target_dtype = target.dtype
    if target_dtype.is_floating_point:
        if target.shape != shape:
            raise ValueError(f"probability targets must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if ignore_index != -100:
            raise ValueError("ignore_index is not supported with probability targets (as in torch)")
        if return_logprob:
            raise ValueError("return_logprob needs class-index targets (a probability target has no target class)")
        u = _checks.token_weight(token_weight, expected, input, acc_dtype(input.dtype))
        if name == "reference":
            return reference.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                           temperature=temperature, token_weight=u, return_lse=return_lse,
                                           return_entropy=return_entropy)
        return _soft_cross_entropy(name, input, target, weight, u, expected, reduction, label_smoothing, z_loss,
                                   softcap, temperature, return_lse, return_entropy)
    if target_dtype is not torch.int64 and (target_dtype == torch.bool or target_dtype.is_complex):
        raise TypeError(f"target must hold int64 class indices or float probabilities, got dtype {target.dtype}")
    target_shape = target.shape
    target = _unbatched_target(target, expected, input)
    u = None if token_weight is None else _checks.token_weight(token_weight, target_shape, input,
                                                               acc_dtype(input.dtype))
    if name == "reference":
        # int64 as the kernels take them (torch's gather refuses uint8 and int16 indices)
        return reference.cross_entropy(input, target.to(torch.int64), weight, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                       softcap=softcap, temperature=temperature,
                                       token_weight=None if u is None else u.view(target.shape),
                                       return_lse=return_lse, return_logprob=return_logprob,
                                       return_entropy=return_entropy)

    rows = input if ndim == 2 and input.is_contiguous() else _class_rows(input, C)
    flat_target = _flat_target(target)
    w = None if weight is None else _acc_weight(weight, input.dtype)
    extras = return_logprob or return_entropy

    out, lse, _, _, logprob, entropy = _ce.CROSS_ENTROPY.call(name)(
        rows, flat_target, w, u, ignore_index, REDUCTION[reduction], label_smoothing, z_loss, softcap or 0.0,
        temperature, extras)
    if ndim != 2 and reduction == "none":  # 2-D input: the rows are already the target's shape
        out = out.view(expected)
    if not (return_lse or extras):
        return out
    asked = (lse if return_lse else None, logprob if return_logprob else None, entropy if return_entropy else None)
    return (out, *(t if ndim == 2 else t.view(expected) for t in asked if t is not None))


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
    backend: str | None = None,
) -> Tensor:
    """Multi-class focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), fused in the
    cross-entropy row kernels.

    Per element, with p = softmax(input) along the class dimension and y the target class:
    ``weight[y] * alpha_y * (1 - p_y) ** gamma * (-log p_y)``, 0 where ``target == ignore_index``.

    - ``gamma``: a float >= 0. ``gamma=0`` with ``alpha=None`` is ``cross_entropy(input, target, weight)``.
    - ``alpha``: ``None`` (alpha_y = 1), a float >= 0 that scales every class alike, or a ``(C,)``
      tensor indexed by the target class (alpha_y = alpha[y]), the multi-class form of the paper's
      alpha-balancing. (torchvision's ``sigmoid_focal_loss`` alpha, alpha for positives and
      1 - alpha for negatives, belongs to the binary sigmoid form; it is not this one.)
    - ``weight``: ``(C,)`` class weights, as in ``cross_entropy``.
    - ``reduction``: ``"none"`` (the target's shape), ``"sum"``, or ``"mean"``: the sum divided by
      ``sum(weight[y])`` over the non-ignored elements (their count without ``weight``), which is
      ``cross_entropy``'s weighted mean. alpha enters the numerator only, weight both; every element
      ignored gives NaN, as in torch.
    - ``token_weight``: per-element weights of the target's shape, as in ``cross_entropy`` (they
      multiply each element's loss and its ``weight[y]`` in the mean's denominator).

    input ``(C,)`` with a 0-dim (or ``(1,)``) target, ``(N, C)`` with target ``(N,)``, or
    ``(N, C, d1, ...)`` with target ``(N, d1, ...)``; class-index targets only. The loss is float32
    for fp16/bf16/fp32 input (float64 for float64); the gradient has the input's dtype. Only ``input`` gets a gradient
    (``weight`` and ``alpha`` are constants). Targets are checked against ``[0, C)`` on the CPU
    backend; the GPU backends give NaN for that element instead.
    """
    _checks.floating("input", input)
    _checks.tensor("target", target)
    _checks.reduction(reduction)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    if type(gamma) is not float:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a float >= 0, got {type(gamma).__name__}")
        gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"gamma must be a finite float >= 0, got {gamma}")
    C, expected = _checks.class_input(input, target)
    ndim = input.dim()
    if isinstance(alpha, Tensor):
        _checks.floating("alpha", alpha)
        if alpha.dim() != 1 or alpha.shape[0] != C:
            raise ValueError(f"alpha must be a float or a tensor of shape ({C},) (one per class), got shape "
                             f"{tuple(alpha.shape)}")
        _checks.same_device("alpha", alpha, "input", input)
    elif alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be None, a float or a ({C},) tensor, got {type(alpha).__name__}")
        alpha = float(alpha)
        if not (math.isfinite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha}")
    weight = _checks.class_weight(weight, C, input)
    target_dtype = target.dtype
    if target_dtype is not torch.int64 and (target_dtype.is_floating_point or target_dtype == torch.bool
                                             or target_dtype.is_complex):
        raise TypeError(f"target must hold int64 class indices (focal_loss takes no probability targets), got dtype "
                        f"{target.dtype}")
    target_shape = target.shape
    target = _unbatched_target(target, expected, input)
    u = None if token_weight is None else _checks.token_weight(token_weight, target_shape, input,
                                                               acc_dtype(input.dtype))
    name = _backend.resolve_for(backend, input)
    if name != "reference":
        _checks.no_forward_ad("focal_loss", input, alpha, weight, u)
    if name == "reference":
        return reference.focal_loss(input, target, gamma, alpha, weight=weight, ignore_index=ignore_index,
                                    reduction=reduction, token_weight=None if u is None else u.view(target.shape))

    rows = input if ndim == 2 and input.is_contiguous() else _class_rows(input, C)
    flat_target = _flat_target(target)
    factor = w = None
    if weight is not None or alpha is not None:
        acc = acc_dtype(input.dtype)
        w = weight.detach().to(acc) if weight is not None else None
        # The kernels take one per-class factor a_y = weight[y] * alpha_y; weight alone is the mean's
        # denominator.
        factor = w
        if isinstance(alpha, Tensor):
            factor = alpha.detach().to(acc) if factor is None else factor * alpha.detach().to(acc)
        elif alpha is not None:
            factor = torch.full((C,), alpha, dtype=acc, device=input.device) if factor is None else factor * alpha
        factor = factor.contiguous()

    out = _fl.FOCAL_LOSS.call(name)(rows, flat_target, factor, w, u, ignore_index, REDUCTION[reduction], gamma)[0]
    return out.view(expected) if ndim != 2 and reduction == "none" else out


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: Tensor | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    options=None,
    return_lse: bool = False,
    return_logprob: bool = False,
    return_entropy: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without the (N, V) logits.

    A drop-in for ``torch.nn.functional.linear_cross_entropy`` (torch 2.14) for class-index targets:
    the same arguments (``ignore_index=None`` means -100, as there), plus ``z_loss`` and ``softcap`` of
    :func:`cross_entropy`. input ``(N, D)`` or ``(D,)`` (with a 0-dim or ``(1,)`` target); extra leading
    dims ``(*, D)`` with target ``(*)`` are accepted too (torch takes 1-D and 2-D input only).
    linear_weight ``(V, D)``, linear_bias ``(V,)``, both in the input's dtype and on its device.

    Rows are processed in chunks of ``chunk_size`` (None: a size picked from N, D, V, the device and the
    dtype): per chunk a BLAS/cuBLAS matmul, the fused cross-entropy row kernel and, when gradients are
    needed, the gradient matmuls. For ``mean``/``sum`` the gradients are computed in the same pass as the
    loss and kept until the backward (one (V, D) fp32 weight gradient, accumulated across chunks), so a
    second backward through the same graph (``retain_graph=True``) raises; ``none`` recomputes the logits
    in its backward. The loss is float32 for bf16/fp16 input, the gradients have the parameters' dtypes.

    ``options`` (torch's ``LinearCrossEntropyOptions``) is accepted for drop-in use: its
    ``batch_chunk_size`` serves as ``chunk_size`` when that is None; its other fields (accumulation
    dtype and policy, chunking method, allow_retain_graph) do not apply: fusedloss always accumulates in
    fp32 and picks its own chunk size. Probability targets and K-dimensional ``linear_weight`` (torch's
    ``out_features``) are not supported (they raise): use ``cross_entropy`` on the logits for those.

    ``shift=1`` (a causal LM's labels): input ``(B, T, D)`` with target ``(B, T)`` (or ``(N, D)`` with
    ``(N,)``, one sequence), position t is scored against target t + 1 of its sequence and the last
    position of each sequence is ignored; nothing of ``input`` is copied (the chunked paths shift the
    int64 targets, the fused kernel indexes them). ``return_lse=True`` returns ``(loss, lse)``, lse per
    element (the target's shape), float32, 0 where ignored; differentiable on the triton backend,
    returned without gradient by the chunked cpu/cuda/reference-row paths. ``token_weight`` (the
    target's shape) weighs each element's loss as in :func:`cross_entropy`; with ``shift=1`` the weight
    of target t + 1 goes with it, as the target does.

    ``return_logprob=True`` / ``return_entropy=True`` add the per-element log-probability of the target
    and the entropy of the softmax (after softcap), as in :func:`cross_entropy`: float32 (float64 for
    float64 input), the target's shape, 0 where ignored, differentiable, in the order ``(loss, lse,
    logprob, entropy)``, each only when asked for; computed in the same pass over each chunk of logits.
    Their gradients are only known in the backward, so with them the backward recomputes each chunk's
    logits (one more GEMM per chunk for ``mean``/``sum``, whose gradients are otherwise made in the
    forward). The fused Triton kernels compute them in registers, next to the loss.

    The ``triton`` backend runs the fused kernels of fusedloss/triton/linear_cross_entropy.py (float32,
    bfloat16, float16; logits only in registers, ``chunk_size`` unused); float64 takes the chunked path.
    """
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    _checks.tensor("target", target)
    _checks.reduction(reduction)
    label_smoothing, z_loss, softcap, _ = _checks.ce_options(label_smoothing, z_loss, softcap, 1.0)
    ignore_index = -100 if ignore_index is None else _checks.integer("ignore_index", ignore_index)
    if isinstance(shift, bool) or shift not in (0, 1):
        raise ValueError(f"shift must be 0 or 1 (score position t against target t + shift), got {shift!r}")
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    ndim = input.dim()
    if ndim == 0:
        raise ValueError("input must be (D,), (N, D) or (*, D); got a 0-dim tensor")
    if linear_weight.dim() != 2:
        if linear_weight.dim() > 2:
            raise NotImplementedError(f"linear_weight must be (V, D); K-dimensional weights (torch's out_features) "
                                      f"are not supported, got shape {tuple(linear_weight.shape)}")
        raise ValueError(f"linear_weight must be (V, D), got shape {tuple(linear_weight.shape)}")
    V, D = linear_weight.shape
    shape = input.shape
    if shape[-1] != D:
        raise ValueError(f"input has {input.shape[-1]} features (last dim) but linear_weight has {D} "
                         f"(shape {tuple(linear_weight.shape)}): they must match")
    if V == 0:
        raise ValueError(f"linear_weight has no classes: shape {tuple(linear_weight.shape)}")
    _checks.same_device("linear_weight", linear_weight, "input", input)
    dtype = input.dtype
    if linear_weight.dtype != dtype:
        raise TypeError(f"linear_weight has dtype {linear_weight.dtype} but input has {input.dtype}; "
                        "cast them to one dtype")
    if linear_bias is not None:
        _checks.floating("linear_bias", linear_bias)
        if linear_bias.shape != (V,):
            raise ValueError(f"linear_bias must have shape ({V},) (one per class), got {tuple(linear_bias.shape)}")
        _checks.same_device("linear_bias", linear_bias, "input", input)
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias has dtype {linear_bias.dtype} but input has {input.dtype}; "
                            "cast them to one dtype")
    expected = shape[:-1]
    target_dtype = target.dtype
    if target_dtype.is_floating_point:
        raise NotImplementedError("linear_cross_entropy takes class-index targets; for probability targets "
                                  "use cross_entropy(input @ linear_weight.T, target)")
    if target_dtype is not torch.int64 and (target_dtype == torch.bool or target_dtype.is_complex):
        raise TypeError(f"target must hold int64 class indices, got dtype {target.dtype}")
    target_shape = target.shape
    target = _unbatched_target(target, expected, input)
    _checks.same_device("target", target, "input", input)
    weight = _checks.class_weight(weight, V, input)
    u = None if token_weight is None else _checks.token_weight(token_weight, target_shape, input, acc_dtype(dtype))
    name = _backend.resolve_for(backend, input)
    if name != "reference":
        _checks.no_forward_ad("linear_cross_entropy", input, linear_weight, linear_bias, weight, u)
    if name == "reference":
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                              reduction=reduction, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                              shift=shift, return_lse=return_lse, return_logprob=return_logprob,
                                              return_entropy=return_entropy,
                                              token_weight=None if u is None else u.view(target.shape))
    if u is not None and shift:  # each weight goes with its target: position t takes target t + 1's
        u = reference.shift_target(u.view(target.shape), 0).reshape(-1)

    # not reshape(-1, D): that is ambiguous when D = 0
    rows = input if ndim == 2 else input.reshape(target.numel(), D)
    flat_target = _flat_target(target)
    w = None if weight is None else _acc_weight(weight, dtype)
    extras = return_logprob or return_entropy
    if name == "triton" and dtype in _lce.FUSED_DTYPES:
        # the fused kernels: per-row loss and lse, the reduction here on device; the shift by index math
        seq_len = (target.shape[-1] if target.dim() else 1) if shift else 0
        loss, lse, _, logprob, entropy = torch.ops.fusedloss.linear_cross_entropy_fwd_triton(
            rows, linear_weight, flat_target, linear_bias, w, ignore_index, label_smoothing, z_loss, softcap or 0.0,
            1.0, seq_len, extras)
        kept = reference.shift_target(target, ignore_index).reshape(-1) if shift else flat_target
        out = _reduce_rows_triton(loss, reduction, expected, kept, w, ignore_index, u)
        if not (return_lse or extras):
            return out
        asked = (lse if return_lse else None, logprob if return_logprob else None,
                 entropy if return_entropy else None)
        return (out, *(t.view(expected) for t in asked if t is not None))
    if shift:
        flat_target = reference.shift_target(target, ignore_index).reshape(-1).to(torch.int64).contiguous()
    if not chunk_size:
        chunk_size = _lce.auto_chunk_size(rows.shape[0], D, V, input.device, dtype)
    loss, lse, _, _, logprob, entropy = _lce.LINEAR_CROSS_ENTROPY.call(name)(
        rows, linear_weight, flat_target, linear_bias, w, u, ignore_index, REDUCTION[reduction], label_smoothing,
        z_loss, softcap or 0.0, chunk_size, extras)
    if ndim != 2 and reduction == "none":  # 2-D input: the rows are already the target's shape
        loss = loss.view(expected)
    if not (return_lse or extras):
        return loss
    asked = (lse if return_lse else None, logprob if return_logprob else None, entropy if return_entropy else None)
    return (loss, *(t if ndim == 2 else t.view(expected) for t in asked if t is not None))


GAP_MODES = ("sum", "max")


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
    backend: str | None = None,
) -> Tensor:
    """Multi-class gap hinge: per sample ``sum_{j != y} max(0, x_j - x_y + margin) ** p``.

    Times ``weight[y]`` when given; ``mean`` averages over samples whose target is not
    ``ignore_index``. ``class_normalize=True`` divides each sample by C, which makes it equal to
    ``torch.nn.functional.multi_margin_loss``. ``mode="max"`` keeps only the largest violation
    (Crammer-Singer). input ``(C,)`` with a 0-dim target, or ``(N, C)`` with target ``(N,)``; and
    every other form ``torch.nn.functional.multi_margin_loss`` takes: a 0-dim input (one class), ``(C,)``
    or ``(1, C)`` input with a 0-dim or ``(1,)`` target. ``reduction="none"`` has the target's shape.
    """
    _checks.floating("input", input)
    _checks.tensor("target", target)
    _checks.reduction(reduction)
    if type(p) is not int and (isinstance(p, bool) or not isinstance(p, (int, float))) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    p = int(p)  # torch's multi_margin_loss takes p=1.0 too
    if mode not in GAP_MODES:
        raise ValueError(f"mode must be one of {GAP_MODES}, got {mode!r}")
    margin = _checks.real("margin", margin)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    ndim = input.dim()
    if ndim > 2:
        raise ValueError(f"input must be (C,) or (N, C) (or 0-dim: one class), got shape {tuple(input.shape)}")
    shape = input.shape
    C = shape[-1] if ndim else 1
    if C == 0:
        raise ValueError(f"input has no classes: shape {tuple(input.shape)}")
    target_dtype = target.dtype
    if target_dtype is not torch.int64 and (target_dtype.is_floating_point or target_dtype == torch.bool
                                             or target_dtype.is_complex):
        raise TypeError(f"target must hold int64 class indices, got dtype {target.dtype}")
    # torch's multi_margin_loss shapes: one sample for 0-dim or (C,) input (and for (1, C)), whose target is
    # 0-dim or (1,); N samples for (N, C), target (N,). reduction="none" returns the target's shape.
    n = shape[0] if ndim == 2 else 1
    target_dim = target.dim()
    if target_dim > 1 or target.numel() != n:
        expected = "() or (1,)" if n == 1 else f"({n},)"
        raise ValueError(f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    _checks.same_device("target", target, "input", input)
    weight = _checks.class_weight(weight, C, input)
    name = _backend.resolve_for(backend, input)
    if name != "reference":
        _checks.no_forward_ad("gap_loss", input, weight)
    if name == "reference":
        return reference.gap_loss(input, target.to(torch.int64), margin, p=p, weight=weight, ignore_index=ignore_index,
                                  reduction=reduction, class_normalize=class_normalize, mode=mode)

    if ndim == 2 and input.is_contiguous():
        rows = input
    else:
        rows = input.reshape(1, C) if ndim < 2 else input
        if C > 1 and rows.stride(1) != 1:
            rows = rows.contiguous()
    flat_target = _flat_target(target)
    w = None if weight is None else _acc_weight(weight, input.dtype)
    out = _gap.GAP_LOSS.call(name)(rows, flat_target, w, margin, p, ignore_index, bool(class_normalize),
                                   mode == "max", REDUCTION[reduction])[0]
    # the kernel's rows have the target's shape when it is (N,) (or (1,) for one sample)
    return out.view(target.shape) if reduction == "none" and target_dim != 1 else out


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
    backend: str | None = None,
) -> Tensor:
    """InfoNCE (contrastive) loss of queries against keys, without the (N, M) similarity matrix.

    query ``(N, D)``, key ``(M, D)``, one floating dtype and device. ``labels`` ``(N,)`` (integer)
    gives each query's positive key (default ``arange(N)``, which needs ``M >= N``); every other key
    is a negative, so ``M > N`` adds negatives. Per query
    ``loss_i = -log softmax(sim(q_i, K) / temperature)[labels_i]``, sim the dot product of
    L2-normalized rows (``F.normalize``, gradients through it) when ``normalize``, the raw dot
    product otherwise.

    - ``temperature``: a float > 0, or a 0-dim floating tensor on the inputs' device that may require
      grad (learnable; its value is never read on the host, so its sign is not checked).
    - ``symmetric=True`` (needs ``M == N`` and default labels) averages, per index, with the
      key -> query direction ``-log softmax(sim(Q, k_i) / temperature)[i]`` (CLIP's loss).
    - Several positives per query: ``query_groups`` ``(N,)`` and ``key_groups`` ``(M,)`` (integer group
      ids, any values; both or neither; not with ``labels`` or ``symmetric``). Every key of the query's
      group is a positive and ``loss_i = -mean_{j in P(i)} log softmax(sim(q_i, K) / temperature)[j]``
      (supervised-contrastive, Khosla et al. 2020's "out" form); a query whose group has no key is
      left out: 0 with ``"none"``, and ``"mean"`` divides by the number of queries with a positive (NaN
      when none has one, as torch's mean over nothing).
    - ``reduction``: ``"none"`` returns the ``(N,)`` per-query losses (with ``symmetric``, the average
      of the two directions at each index); ``"mean"`` their sum divided by N; ``"sum"`` their sum.

    The loss is float32 for fp16/bf16/fp32 inputs (float64 for float64); gradients have the inputs'
    dtype. The two parts of each row's gradient (the softmax's and the positive logit's) nearly
    cancel, so every backend sums them in float32 and rounds once. The ``triton`` backend takes
    fp16/bf16 rows as they are: the similarity tiles are products on the tensor cores with float32
    accumulation (exact products), scaled by the rows' float32 inverse norms when ``normalize``, with
    no float32 or normalized copy of the inputs. The ``cpu`` and ``cuda`` backends convert fp16/bf16
    rows to float32 first and normalize there (rounding unit rows back to bf16 would move each logit
    by up to ``2**-8 / temperature``). float32 inputs on ``triton`` follow torch's matmul setting, as
    torch's matmul does: IEEE products by default, TF32 where ``torch.backends.cuda.matmul.allow_tf32``.

    Kernels (cpu, cuda, triton) compute the log-sum-exps of ``S = Q K^T / temperature`` along rows
    (and columns) and the positive logits, streaming tiles of S (forward and backward); the loss
    ``lse - positive``, the symmetric average and the reduction are PyTorch ops on ``(N,)`` vectors.
    The temperature's gradient is summed in float64 with the positives inside the kernel, at least as
    accurate as plain PyTorch's float32 formulation. Labels are checked
    against ``[0, M)`` for CPU tensors (IndexError); elsewhere, without a host sync, a query whose
    label is out of range gets a NaN loss (and NaN gradients), as cross_entropy does on GPU.
    """
    _checks.query_key(query, key)
    _checks.reduction(reduction)
    N = query.shape[0]
    M = key.shape[0]
    temperature = _checks.temperature(temperature, query, "query")
    if query_groups is not None or key_groups is not None:
        query_groups, key_groups = _group_ids(query_groups, key_groups, labels, symmetric, query, N, M)
    else:
        labels = _checks.key_labels(labels, query, N, M)
    if symmetric:
        if labels is not None:
            raise ValueError("symmetric=True uses the default labels (query i pairs with key i); got labels")
        if M != N:
            raise ValueError(f"symmetric=True needs as many keys as queries, got N={N} and M={M}")
    name = _backend.resolve_for(backend, query)
    if name != "reference":
        _checks.no_forward_ad("info_nce", query, key, temperature)
    labels, label_ok = _labels_in_range(labels, M)
    if name == "reference":
        if query_groups is not None:
            return reference.info_nce(query, key, query_groups=query_groups, key_groups=key_groups,
                                      temperature=temperature, normalize=normalize, reduction=reduction)
        loss = reference.info_nce(query, key, labels, temperature=temperature, normalize=normalize,
                                  symmetric=symmetric, reduction="none")
        return _reduce_info_nce(_nan_where_not(label_ok, loss), reduction, N)

    # The gradient of a query is scale * (sum_j P_ij k_j - k_{labels_i}), two nearly equal terms that
    # the kernels sum in float32 before one rounding. Triton takes fp16/bf16 rows as they are (their
    # products are exact in float32) and normalizes inside its kernels (NORMED: the rows' float32
    # norms scale the tiles; the normalization's backward runs in float32 before the gradient's one
    # rounding). The C++ kernels take float32 copies, normalized, and autograd casts the gradient back
    # once: rounding unit rows to bf16 first would move each logit by up to 2**-8 / temperature.
    acc = acc_dtype(query.dtype)
    q, k, raw = _kernel_rows(query, key, normalize, name)
    pair = _nce.NORMED if raw and normalize else _nce.KERNELS
    if isinstance(temperature, Tensor):
        # float64: the temperature's gradient is summed in double and rounded once (see (3') in
        # csrc/include/fusedloss/info_nce_math.h), then autograd's division by -t^2 in float64.
        scale = torch.reciprocal(temperature.to(torch.float64))
    else:
        scale = torch.full((), 1.0 / temperature, dtype=acc, device=query.device)
    # A reduced loss that needs gradients, on CPU, one direction: the kernel makes the gradients in the
    # forward (3 GEMMs and one exp per similarity instead of 4 and two; csrc/cpu/info_nce.cpp) and the
    # backward scales them.
    wants = (q.requires_grad, k.requires_grad, scale.requires_grad)
    fused = _nce.fused_grad_call() if name == "cpu" and reduction != "none" and not symmetric else None
    if fused is not None and N > 0 and torch.is_grad_enabled() and any(wants):
        groups = query_groups is not None
        total, npos, *_ = fused(q, k, scale, query_groups if groups else labels, key_groups, *wants)
        if reduction == "sum":
            return total
        if groups:
            # No query with a positive: NaN as the mean over nothing, with the two-pass path's zero
            # gradients (a division by 0 would scale them to 0 * inf).
            count = (npos > 0).sum()
            return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
        return total / N
    # pos: each query's positive logit, from the kernel's own tile of S (the gradient of a sharp row
    # then cancels inside the kernel, element by element, as plain PyTorch's softmax - one_hot does).
    if query_groups is not None:
        lse_rows, _, pos, npos = pair.call(name)(q, k, scale, False, query_groups, key_groups)[:4]
        kept = npos > 0  # a query whose group has no key is left out (its pos is NaN)
        loss = torch.where(kept, lse_rows - pos, torch.zeros_like(lse_rows))
        return _reduce_info_nce(loss, reduction, kept.sum())
    lse_rows, lse_cols, pos, _ = pair.call(name)(q, k, scale, bool(symmetric), labels, None)[:4]
    loss = lse_rows - pos
    if symmetric:
        loss = 0.5 * (loss + (lse_cols - pos))
    return _reduce_info_nce(_nan_where_not(label_ok, loss), reduction, N)


def _kernel_rows(query: Tensor, key: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor, bool]:
    """query and key as the contrastive kernels take them (info_nce and siglip_loss), and whether they are
    the rows as given: fp16/bf16 rows on ``triton`` (its kernels normalize them inside, when asked);
    otherwise contiguous rows in the accumulation dtype, L2-normalized when asked."""
    if backend == "triton" and query.dtype in (torch.float16, torch.bfloat16):
        return query, key, True
    acc = acc_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return q.contiguous(), k.contiguous(), False


def _group_ids(query_groups, key_groups, labels, symmetric, query, n, m):
    """Checks info_nce's query_groups / key_groups; returns them as int64."""
    if labels is not None:
        raise ValueError("query_groups/key_groups and labels are exclusive: pass one way of naming positives")
    if symmetric:
        raise ValueError("symmetric=True is not defined with query_groups/key_groups (one positive per query)")
    out = []
    for name, ids, size in (("query_groups", query_groups, n), ("key_groups", key_groups, m)):
        if ids is None:
            other = "key_groups" if name == "query_groups" else "query_groups"
            raise ValueError(f"{other} needs {name}: pass both group-id tensors")
        _checks.tensor(name, ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer group ids (int64), got dtype {ids.dtype}")
        if ids.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(ids.shape)}")
        _checks.same_device(name, ids, "query", query)
        out.append(ids.to(torch.int64))
    return out


def _labels_in_range(labels: Tensor | None, m: int) -> tuple[Tensor | None, Tensor | None]:
    """Off the CPU the labels are not read on the host (that would sync): an out-of-range label gathers
    a clamped index instead of faulting on the device, and the mask it returns makes that query's loss
    NaN (:func:`_nan_where_not`), as the cross-entropy kernels do with such a target. CPU labels were
    checked (_checks.key_labels): (labels, None)."""
    if labels is None or labels.device.type == "cpu":
        return labels, None
    return labels.clamp(0, m - 1), (labels >= 0) & (labels < m)


def _nan_where_not(ok: Tensor | None, loss: Tensor) -> Tensor:
    return loss if ok is None else torch.where(ok, loss, torch.full_like(loss, float("nan")))


def _reduce_info_nce(loss: Tensor, reduction: str, n: int | Tensor) -> Tensor:
    """none / sum / mean of the per-query losses; the mean divides by n (the queries, or a device count
    of those with a positive)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n


# --- SigLIP (issue #17) ----------------------------------------------------------------------------


def _siglip_scalar(name: str, value, query: Tensor):
    """siglip_loss's temperature / bias: a finite real, or a 0-dim floating tensor on query's device (not
    read on the host)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        _checks.same_device(name, value, "query", query)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def siglip_loss(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 10.0,
    bias: float | Tensor = -10.0,
    normalize: bool = True,
    labels: Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """SigLIP's sigmoid pairwise loss (Zhai et al. 2023), as open_clip's ``SigLipLoss``, without the (N, M)
    logits.

    query ``(N, D)``, key ``(M, D)``, one floating dtype and device. The logits are
    ``z_ij = temperature * sim(q_i, k_j) + bias``, sim the dot product of L2-normalized rows
    (``F.normalize``, gradients through it) when ``normalize``, the raw dot product otherwise. The label
    is +1 for the pair ``(i, labels_i)`` and -1 for every other pair, and per query
    ``loss_i = -sum_j log sigmoid(label_ij * z_ij)``.

    - ``labels`` ``(N,)`` (integer) gives each query's positive key. ``None`` is the diagonal: key i is
      query i's positive, which needs ``M >= N`` (open_clip's square batch is ``M == N``; extra keys are
      extra negatives, as in :func:`info_nce`).
    - ``temperature`` (a multiplier of the similarity, SigLIP's ``t = exp(t')``) and ``bias``: finite
      floats, or 0-dim floating tensors on the inputs' device that may require grad (learnable; never
      read on the host, so their values are not checked).
    - ``reduction``: ``"none"`` the ``(N,)`` per-query losses; ``"mean"`` their sum divided by N (open_clip
      divides by the number of queries, not of pairs); ``"sum"`` their sum.

    The loss is float32 for fp16/bf16/fp32 inputs (float64 for float64); gradients have the inputs' dtype.
    fp16/bf16 rows are handled as :func:`info_nce` does: as they are on ``triton`` (tensor-core tiles,
    normalized inside the kernels, the gradient rounded once), converted to float32 first (normalized
    there) on ``cpu`` and ``cuda``. Kernels (cpu, cuda, triton) stream tiles of ``Q K^T``; each row's sum is
    float32 per tile and float64 across tiles; the gradients of temperature and bias are summed per row in
    float64, then over rows in a fixed order. Labels are checked against ``[0, M)`` for CPU tensors
    (IndexError); elsewhere, without a host sync, a query whose label is out of range gets a NaN loss
    (and NaN gradients), as :func:`info_nce` does.
    """
    _checks.query_key(query, key)
    _checks.reduction(reduction)
    N = query.shape[0]
    M = key.shape[0]
    temperature = _siglip_scalar("temperature", temperature, query)
    bias = _siglip_scalar("bias", bias, query)
    labels = _checks.key_labels(labels, query, N, M)
    name = _backend.resolve_for(backend, query)
    if name != "reference":
        _checks.no_forward_ad("siglip_loss", query, key, temperature, bias)
    labels, label_ok = _labels_in_range(labels, M)
    if name == "reference":
        loss = reference.siglip_loss(query, key, temperature=temperature, bias=bias, normalize=normalize,
                                     labels=labels, reduction="none")
        return _reduce_info_nce(_nan_where_not(label_ok, loss), reduction, N)
    q, k, raw = _kernel_rows(query, key, normalize, name)  # raw: the ROWS ops, normalized inside
    acc = acc_dtype(query.dtype)
    # A learnable temperature or bias goes to the kernels as float64: its gradient is then returned in
    # float64 (summed there) and rounded once by autograd to the parameter's dtype.
    scalars = []
    for value in (temperature, bias):
        if isinstance(value, Tensor):
            scalars.append(value.to(torch.float64))
        else:
            scalars.append(torch.full((), value, dtype=acc, device=query.device))
    if raw:
        loss = _sig.ROWS.fwd(name)(q, k, scalars[0], scalars[1], bool(normalize), labels)[0]
    else:
        loss = _sig.KERNELS.fwd(name)(q, k, scalars[0], scalars[1], labels)
    return _reduce_info_nce(_nan_where_not(label_ok, loss), reduction, N)


# --- distillation (issue #16, item 4) ------------------------------------------------------------

DISTILL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _distill_options(reduction, temperature, ignore_index, beta):
    """The options every distillation loss checks: returns (temperature, ignore_index, beta)."""
    if reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DISTILL_REDUCTIONS}, got {reduction!r}")
    temperature = _checks.positive("temperature", temperature)
    beta = _checks.in_closed_unit("beta", beta)
    return temperature, _checks.integer("ignore_index", ignore_index), beta


def _distill_target(target, lead, ref_name, ref, shape_note):
    """The optional class-index target of the rows: integer, the rows' leading shape, ref's device."""
    if target is None:
        return
    _checks.tensor("target", target)
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices (int64), got dtype {target.dtype}")
    if target.shape != lead:
        raise ValueError(f"target must have shape {tuple(lead)}{shape_note}, got {tuple(target.shape)}")
    _checks.same_device("target", target, ref_name, ref)


def _distill_args(student, teacher, target, temperature, ignore_index, reduction, beta):
    """Checks kl_div_logits / jsd_logits arguments; returns (C, rows of student, rows of teacher,
    flat target or None, temperature, ignore_index, beta)."""
    _checks.floating("student", student)
    _checks.floating("teacher", teacher)
    temperature, ignore_index, beta = _distill_options(reduction, temperature, ignore_index, beta)
    if student.dim() == 0:
        raise ValueError("student must have a class dimension (its last), got a 0-dim tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    _checks.same_device("teacher", teacher, "student", student)
    C = student.shape[-1]
    if C == 0:
        raise ValueError(f"student has no classes: shape {tuple(student.shape)}")
    _distill_target(target, student.shape[:-1], "student", student,
                    f" for student of shape {tuple(student.shape)}")
    return C, temperature, ignore_index, beta


def _distill(student, teacher, target, temperature, ignore_index, reduction, beta, jsd, backend):
    C, temperature, ignore_index, beta = _distill_args(student, teacher, target, temperature, ignore_index,
                                                       reduction, beta)
    name = _backend.resolve(backend, student.device)
    if name != "reference":
        _checks.no_forward_ad("jsd_logits" if jsd else "kl_div_logits", student, teacher)
    if name == "reference":
        fn = reference.jsd_logits if jsd else reference.kl_div_logits
        kwargs = {"beta": beta} if jsd else {}
        return fn(student, teacher, target, temperature=temperature, ignore_index=ignore_index,
                  reduction=reduction, **kwargs)
    # The kernels take one dtype: a teacher of another dtype is cast to the student's (with autograd).
    if teacher.dtype != student.dtype:
        teacher = teacher.to(student.dtype)
    s = _class_rows(student.reshape(-1, C) if student.dim() != 2 else student, C)
    t = _class_rows(teacher.reshape(-1, C) if teacher.dim() != 2 else teacher, C)
    flat = None if target is None else _flat_target(target)
    out = _kl.distill(name, s, t, flat, ignore_index, reduction, temperature, beta, jsd)
    return out.view(student.shape[:-1]) if reduction == "none" else out


def kl_div_logits(student: Tensor, teacher: Tensor, target: Tensor | None = None, *, temperature: float = 1.0,
                  ignore_index: int = -100, reduction: str = "batchmean", backend: str | None = None) -> Tensor:
    """Distillation loss KL(p_teacher || p_student) from two logits tensors, fused.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)`` over the last dimension; per row
    ``T**2 * sum_j p_j (log p_j - log q_j)`` (the ``T**2`` of Hinton et al. 2015 keeps the soft
    targets' gradients on the scale of a hard-label loss as T grows). Equal to
    ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction=...) * T**2``
    (a teacher probability of 0, from a -inf logit, contributes 0 instead of torch's NaN).

    - student and teacher ``(..., C)``, the same shape and device; a teacher of another dtype is cast
      to the student's. ``target`` (optional, integer, the leading shape): rows whose target is
      ``ignore_index`` are skipped (loss 0, no gradient, not counted).
    - ``reduction``: ``"batchmean"`` (sum over the kept rows / their number), ``"sum"``, ``"mean"``
      (divides by kept rows times C, as torch's kl_div ``"mean"`` counts elements), ``"none"`` (per
      row, the leading shape). No kept row: NaN for the means.
    - The loss is float32 for 16-bit inputs. Gradients flow to the student; the teacher gets one only
      if it requires grad. One pass over both rows forward, one backward
      (csrc/include/fusedloss/kl_div_math.h).
    """
    return _distill(student, teacher, target, temperature, ignore_index, reduction, 0.0, False, backend)


def jsd_logits(student: Tensor, teacher: Tensor, target: Tensor | None = None, *, beta: float = 0.5,
               temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
               backend: str | None = None) -> Tensor:
    """Generalized Jensen-Shannon divergence of softmax(teacher / T) and softmax(student / T), fused.

    Per row ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``; as
    Liger's JSD, ``beta=0`` is KL(p_t || p_s) and ``beta=1`` KL(p_s || p_t). No ``T**2`` factor.
    Shapes, ``target``, reductions and gradients as :func:`kl_div_logits`.
    """
    return _distill(student, teacher, target, temperature, ignore_index, reduction, beta, True, backend)


def _linear_distill(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias,
                    temperature, ignore_index, reduction, chunk_size, beta, jsd, backend):
    for name, value in (("student_input", student_input), ("student_weight", student_weight),
                        ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        _checks.floating(name, value)
        _checks.same_device(name, value, "student_input", student_input)
    temperature, ignore_index, beta = _distill_options(reduction, temperature, ignore_index, beta)
    if chunk_size is not None:
        chunk_size = _checks.integer("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_input.dim() == 0 or teacher_input.dim() == 0:
        raise ValueError("student_input and teacher_input must be (..., D) hidden states, got a 0-dim tensor")
    lead = student_input.shape[:-1]
    if teacher_input.shape[:-1] != lead:
        raise ValueError(f"teacher_input must have student_input's leading shape {tuple(lead)}, got "
                         f"{tuple(teacher_input.shape)}")
    for name, w, x in (("student_weight", student_weight, student_input), ("teacher_weight", teacher_weight,
                                                                            teacher_input)):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"{name} must be (V, D) with D = {x.shape[-1]}, got {tuple(w.shape)}")
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError("student_weight has no classes (V = 0)")
    if teacher_weight.shape[0] != V:
        raise ValueError(f"teacher_weight must have student_weight's {V} classes, got {teacher_weight.shape[0]}")
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            _checks.floating(name, b)
            _checks.same_device(name, b, "student_input", student_input)
            if b.shape != (V,):
                raise ValueError(f"{name} must have shape (V,) = ({V},), got {tuple(b.shape)}")
    _distill_target(target, lead, "student_input", student_input, "")
    name = _backend.resolve(backend, student_input.device)
    if name != "reference":
        _checks.no_forward_ad("linear_jsd" if jsd else "linear_kl_div", student_input, student_weight, teacher_input,
                              teacher_weight, student_bias, teacher_bias)
    if name == "reference":
        out = reference.linear_kl_div(student_input, student_weight, teacher_input, teacher_weight, target,
                                      student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
                                      ignore_index=ignore_index, reduction=reduction, beta=beta, jsd=jsd)
        return out
    xs = student_input.reshape(-1, student_input.shape[-1])
    xt = teacher_input.reshape(-1, teacher_input.shape[-1])
    # the matmuls and the row kernel take one dtype per head
    if student_weight.dtype != xs.dtype:
        student_weight = student_weight.to(xs.dtype)
    if teacher_weight.dtype != xt.dtype:
        teacher_weight = teacher_weight.to(xt.dtype)
    flat = None if target is None else _flat_target(target)
    out = _lkl.linear_distill(name, xs, student_weight, student_bias, xt, teacher_weight, teacher_bias, flat,
                              ignore_index, reduction, temperature, beta, jsd, chunk_size)
    return out.view(lead) if reduction == "none" else out


def linear_kl_div(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                  target: Tensor | None = None, *, student_bias: Tensor | None = None,
                  teacher_bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                  reduction: str = "batchmean", chunk_size: int | None = None, backend: str | None = None) -> Tensor:
    """:func:`kl_div_logits` of ``student_input @ student_weight.T + student_bias`` against
    ``teacher_input @ teacher_weight.T + teacher_bias``, without either ``(N, V)`` logits.

    Hidden states ``(N, D_s)`` / ``(N, D_t)`` (or ``(..., D)`` with one leading shape), weights
    ``(V, D_s)`` / ``(V, D_t)``. Rows are processed ``chunk_size`` at a time (default: about 8M logits
    per chunk); each chunk's logits, the fused row kernel and the gradients' matmuls, then the next.
    Gradients to the student's input, weight and bias, and to the teacher's where they require one.
    """
    return _linear_distill(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                           teacher_bias, temperature, ignore_index, reduction, chunk_size, 0.0, False, backend)


def linear_jsd(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
               target: Tensor | None = None, *, student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
               beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
               chunk_size: int | None = None, backend: str | None = None) -> Tensor:
    """:func:`jsd_logits` of the two heads' logits, chunked as :func:`linear_kl_div`."""
    return _linear_distill(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                           teacher_bias, temperature, ignore_index, reduction, chunk_size, beta, True, backend)
