"""The probability-target cross-entropy's contract with PyTorch: fakes of the C++ kernel ops, their Triton
twins, autograd, and the reduction.

- ``fusedloss::soft_cross_entropy_fwd`` (schema in csrc/registration_soft_cross_entropy.cpp, kernels in
  csrc/{cpu,cuda}/soft_cross_entropy.*): per-row loss, lse, stats (N, 3) and, with ``entropy=True``, the
  per-row entropy of the softmax (stats then (N, 4)), in the accumulation dtype; loss, lse and entropy
  are differentiable. ``fusedloss::soft_cross_entropy_bwd``: the logits' gradient (through the loss, the
  lse and the entropy) and, when asked, the target's. With their Triton twins
  (fusedloss/triton/soft_cross_entropy.py): ``KERNELS``, a :class:`fusedloss.ops._registry.KernelPair`.
- autograd in Python for both kinds: the backward asks for the target's
  gradient only when the target requires one, so a constant target costs no extra write, and passes the
  entropy's gradient only when it has one.
- :func:`soft_cross_entropy`: forward op, then the reduction on device in PyTorch ops (no host sync).
"""

from __future__ import annotations

from torch import Tensor

from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype


def _fwd_fake(logits, target, weight, label_smoothing, z_loss, softcap, temperature, entropy=False):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n, 4 if entropy else 3), dtype=acc), logits.new_empty((n if entropy else 0,), dtype=acc))


def _bwd_fake(grad_loss, grad_lse, logits, target, weight, stats, label_smoothing, z_loss, softcap, temperature,
              target_grad, grad_entropy=None):
    return (logits.new_empty(logits.shape),
            target.new_empty(target.shape if target_grad else (0,)))


def _setup_context(ctx, inputs, output):
    logits, target, weight, label_smoothing, z_loss, softcap, temperature, *entropy = inputs
    _, _, stats, ent = output
    ctx.mark_non_differentiable(stats)
    if not (entropy and entropy[0]):
        ctx.mark_non_differentiable(ent)  # the (0,) placeholder
    ctx.save_for_backward(logits, target, weight, stats)
    ctx.scalars = (label_smoothing, z_loss, softcap, temperature)


def _backward_with(bwd_op):
    def backward(ctx, grad_loss, grad_lse, _grad_stats, grad_entropy):
        logits, target, weight, stats = ctx.saved_tensors
        target_grad = bool(ctx.needs_input_grad[1])
        acc = stats.dtype
        if grad_loss is None:
            grad_loss = stats.new_zeros(()).expand(stats.shape[0])
        # the (0,) entropy of entropy=False gets a (0,) gradient when something else is differentiated
        if grad_entropy is not None and stats.shape[1] != 4:
            grad_entropy = None
        grad_x, grad_t = bwd_op(grad_loss.to(acc), None if grad_lse is None else grad_lse.to(acc), logits, target,
                                weight, stats, *ctx.scalars, target_grad,
                                None if grad_entropy is None else grad_entropy.to(acc))
        return grad_x if ctx.needs_input_grad[0] else None, grad_t if target_grad else None

    return backward


KERNELS = _registry.KernelPair(
    "soft_cross_entropy",
    fwd_schema="(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, float z_loss, float softcap, "
               "float temperature, bool entropy=False) -> (Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
               "float label_smoothing, float z_loss, float softcap, float temperature, bool target_grad, "
               "Tensor? grad_entropy=None) -> (Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="soft_cross_entropy")


def soft_cross_entropy(backend: str, rows: Tensor, target: Tensor, weight: Tensor | None, token_weight: Tensor | None,
                       reduction: str, label_smoothing: float, z_loss: float, softcap: float, temperature: float,
                       entropy: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The loss of (N, C) logits rows against (N, C) probability rows (unit class stride, target in the
    logits' dtype or the accumulation dtype, weight (C,) in the accumulation dtype), reduced as torch
    does with probability targets: ``mean`` divides by the number of rows N (not by a weight sum), ``sum``,
    ``none`` per row. ``token_weight`` (N,) in the accumulation dtype multiplies each row's loss, and the
    mean then divides by its sum. Returns (loss, lse per row, entropy per row or None without ``entropy``:
    the softmax's, from the same pass, not weighed); all carry gradients."""
    loss, lse, _, ent = KERNELS.fwd(backend)(rows, target, weight, label_smoothing, z_loss, softcap, temperature,
                                            entropy)
    ent = ent if entropy else None
    if token_weight is not None:
        loss = loss * token_weight
    if reduction == "none":
        return loss, lse, ent
    total = loss.sum()
    if reduction == "sum":
        return total, lse, ent
    # N rows, a Python int: no host sync. No element gives 0 / 0 = NaN, as torch's mean of nothing.
    return total / (rows.shape[0] if token_weight is None else token_weight.sum()), lse, ent
