"""The focal loss op's whole contract with PyTorch.

- ``FOCAL_LOSS``, the public-level op ``fusedloss::focal_loss`` (what fusedloss.functional calls): the
  forward kernel, the reduction by reduce_rows, autograd in C++ (csrc/autograd.cpp); its Triton twin
  ``fusedloss::focal_loss_triton`` (same schema, autograd below).
- ``KERNELS``: the row kernel ``fusedloss::focal_loss_fwd`` (schema in csrc/registration.cpp, CPU and
  CUDA kernels in csrc/{cpu,cuda}/cross_entropy.*) and its Triton twin, registered by
  :class:`fusedloss.ops._registry.KernelPair`.
- autograd for both: the focal gradient is the cross-entropy gradient ``softmax - onehot(y)`` times
  a per-row coefficient (derived in csrc/include/fusedloss/cross_entropy_math.h, (6)), which the
  forward returns as ``coef``. The backward is therefore the cross-entropy backward op of the same
  backend, unchanged, with ``grad_loss * coef`` and no weights (the weights are inside ``coef``).

Forward returns per-row (loss, stats, coef) in the accumulation dtype (float32; float64 for float64
logits), stats = (max, log_s) as cross_entropy_fwd's; the reduction is left to the caller, on device.
"""

from __future__ import annotations

from fusedloss.ops import _registry
from fusedloss.ops import cross_entropy as _ce
from fusedloss.ops._common import acc_dtype


def _fwd_fake(logits, target, weight, ignore_index, gamma):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n, 2), dtype=acc), logits.new_empty((n,), dtype=acc)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, gamma = inputs
    _, stats, coef = output
    ctx.mark_non_differentiable(stats, coef)
    ctx.save_for_backward(logits, target, stats, coef)
    ctx.ignore_index = ignore_index


def _backward_with(ce_bwd_op):
    def backward(ctx, grad_loss, _grad_stats, _grad_coef):
        logits, target, stats, coef = ctx.saved_tensors
        # cross_entropy_bwd with no smoothing, z-loss, softcap (0: off) or temperature (1).
        return ce_bwd_op(grad_loss * coef, None, logits, target, None, stats, ctx.ignore_index, 0.0, 0.0, 0.0, 1.0)

    return backward


# The backward is cross_entropy_bwd (or its Triton twin) with the row factor coef.
KERNELS = _registry.KernelPair(
    "focal_loss",
    fwd_schema="(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float gamma) "
               "-> (Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake, setup_context=_setup_context, backward_with=_backward_with, triton_module="cross_entropy",
    grad_of=_ce.KERNELS)


# --- the public-level op -------------------------------------------------------------------------

SCHEMA = ("(Tensor logits, Tensor target, Tensor? factor, Tensor? weight, Tensor? token_weight, int ignore_index, "
          "int reduction, float gamma) -> (Tensor loss, Tensor stats, Tensor coef, Tensor mass)")


def _fake(logits, target, factor, weight, token_weight, ignore_index, reduction, gamma):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    loss = logits.new_empty((n,) if reduction == _registry.NONE else (), dtype=acc)
    mass = logits.new_empty((0,) if reduction == _registry.NONE else (), dtype=acc)
    return loss, logits.new_empty((n, 2), dtype=acc), logits.new_empty((n,), dtype=acc), mass


def _triton_impl(logits, target, factor, weight, token_weight, ignore_index, reduction, gamma):
    from fusedloss.ops.cross_entropy import reduce_triton
    from fusedloss.triton import cross_entropy as kernels

    loss, stats, coef = kernels.focal_loss_fwd(logits, target, factor, ignore_index, gamma)
    out, mass = reduce_triton(loss, target, weight, ignore_index, reduction, token_weight)
    return out, stats, coef, mass


def _triton_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, target, factor, weight, token_weight, ignore_index, reduction, gamma = inputs
    _, stats, coef, mass = output
    ctx.mark_non_differentiable(stats, coef, mass)
    ctx.save_for_backward(logits, target, stats, coef, mass, token_weight)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction


def _triton_backward(ctx, grad_loss, _grad_stats, _grad_coef, _grad_mass):
    logits, target, stats, coef, mass, token_weight = ctx.saved_tensors
    g = _registry.row_grad(grad_loss, mass, ctx.reduction, logits.shape[0], stats, token_weight) * coef
    grad = _ce.KERNELS.bwd("triton")(g, None, logits, target, None, stats, ctx.ignore_index, 0.0,
                                                        0.0, 0.0, 1.0)
    return grad


FOCAL_LOSS = _registry.KernelOp("focal_loss", SCHEMA, _fake, triton_module="cross_entropy", triton_impl=_triton_impl,
                                setup_context=_triton_setup_context, backward=_triton_backward)
