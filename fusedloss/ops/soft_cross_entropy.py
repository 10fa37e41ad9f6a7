"""The probability-target cross-entropy's contract with PyTorch: fakes of the C++ kernel ops, their Triton
twins, autograd, and the reduction.

- ``fusedloss::soft_cross_entropy_fwd`` (schema in csrc/registration_soft_cross_entropy.cpp, kernels in
  csrc/{cpu,cuda}/soft_cross_entropy.*): per-row loss, lse, stats (N, 3) and, with ``entropy=True``, the
  per-row entropy of the softmax (stats then (N, 4)), in the accumulation dtype; loss, lse and entropy
  are differentiable. ``fusedloss::soft_cross_entropy_bwd``: the logits' gradient (through the loss, the
  lse and the entropy) and, when asked, the target's. Their Triton twins
  ``fusedloss::soft_cross_entropy_{fwd,bwd}_triton`` (fusedloss/triton/soft_cross_entropy.py) have the
  same schemas.
- autograd, registered here in Python with torch.library for both: the backward asks for the target's
  gradient only when the target requires one, so a constant target costs no extra write, and passes the
  entropy's gradient only when it has one.
- :func:`soft_cross_entropy`: forward op, then the reduction on device in PyTorch ops (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops._common import acc_dtype, no_context, no_double_backward, triton_kernels_present

FWD = "fusedloss::soft_cross_entropy_fwd"
BWD = "fusedloss::soft_cross_entropy_bwd"


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
        return (grad_x if ctx.needs_input_grad[0] else None, grad_t if target_grad else None,
                None, None, None, None, None, None)

    return backward


if _backend.extension_loaded() and hasattr(torch.ops.fusedloss, "soft_cross_entropy_fwd"):
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_fake(BWD)(_bwd_fake)
    torch.library.register_autograd(FWD, _backward_with(torch.ops.fusedloss.soft_cross_entropy_bwd),
                                    setup_context=_setup_context)
    torch.library.register_autograd(BWD, no_double_backward("soft_cross_entropy"), setup_context=no_context)
    CPP_REGISTERED = True
else:
    CPP_REGISTERED = False

TRITON_REGISTERED = False
if triton_kernels_present("soft_cross_entropy"):
    from torch.library import triton_op

    @triton_op("fusedloss::soft_cross_entropy_fwd_triton", mutates_args={})
    def soft_cross_entropy_fwd_triton(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                                      z_loss: float, softcap: float, temperature: float,
                                      entropy: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from fusedloss.triton import soft_cross_entropy as kernels

        return kernels.soft_cross_entropy_fwd(logits, target, weight, label_smoothing, z_loss, softcap, temperature,
                                              entropy)

    @triton_op("fusedloss::soft_cross_entropy_bwd_triton", mutates_args={})
    def soft_cross_entropy_bwd_triton(grad_loss: Tensor, grad_lse: Tensor | None, logits: Tensor, target: Tensor,
                                      weight: Tensor | None, stats: Tensor, label_smoothing: float, z_loss: float,
                                      softcap: float, temperature: float, target_grad: bool,
                                      grad_entropy: Tensor | None = None) -> tuple[Tensor, Tensor]:
        from fusedloss.triton import soft_cross_entropy as kernels

        return kernels.soft_cross_entropy_bwd(grad_loss, grad_lse, logits, target, weight, stats, label_smoothing,
                                              z_loss, softcap, temperature, target_grad, grad_entropy)

    soft_cross_entropy_fwd_triton.register_autograd(_backward_with(torch.ops.fusedloss.soft_cross_entropy_bwd_triton),
                                                    setup_context=_setup_context)
    soft_cross_entropy_bwd_triton.register_autograd(no_double_backward("soft_cross_entropy"),
                                                    setup_context=no_context)
    TRITON_REGISTERED = True


def forward_op(backend: str):
    """The forward op (with autograd) that runs ``backend``'s kernels."""
    if backend in ("cpu", "cuda"):
        if not CPP_REGISTERED:
            raise RuntimeError("fusedloss: the compiled extension holds no soft_cross_entropy op (rebuild it)")
        return torch.ops.fusedloss.soft_cross_entropy_fwd
    if backend == "triton":
        if not TRITON_REGISTERED:
            raise RuntimeError("fusedloss: the Triton soft_cross_entropy kernels are not available in this install")
        return torch.ops.fusedloss.soft_cross_entropy_fwd_triton
    raise ValueError(f"no soft_cross_entropy kernel op for backend {backend!r}")


def backward_op(backend: str):
    """The gradient op of ``backend``."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.soft_cross_entropy_bwd
    if backend == "triton":
        return torch.ops.fusedloss.soft_cross_entropy_bwd_triton
    raise ValueError(f"no soft_cross_entropy kernel op for backend {backend!r}")


def soft_cross_entropy(backend: str, rows: Tensor, target: Tensor, weight: Tensor | None, token_weight: Tensor | None,
                       reduction: str, label_smoothing: float, z_loss: float, softcap: float, temperature: float,
                       entropy: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The loss of (N, C) logits rows against (N, C) probability rows (unit class stride, target in the
    logits' dtype or the accumulation dtype, weight (C,) in the accumulation dtype), reduced as torch
    does with probability targets: ``mean`` divides by the number of rows N (not by a weight sum), ``sum``,
    ``none`` per row. ``token_weight`` (N,) in the accumulation dtype multiplies each row's loss, and the
    mean then divides by its sum. Returns (loss, lse per row, entropy per row or None without ``entropy``:
    the softmax's, from the same pass, not weighed); all carry gradients."""
    loss, lse, _, ent = forward_op(backend)(rows, target, weight, label_smoothing, z_loss, softcap, temperature,
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
