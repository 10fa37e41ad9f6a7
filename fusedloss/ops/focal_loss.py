"""The focal loss op's whole contract with PyTorch.

- ``FOCAL_LOSS``, the public-level op ``fusedloss::focal_loss`` (what fusedloss.functional calls): the
  forward kernel, the reduction by reduce_rows, autograd in C++ (csrc/autograd.cpp); its Triton twin
  ``fusedloss::focal_loss_triton`` (same schema, autograd below).
- ``fusedloss::focal_loss_fwd``: schema in csrc/registration.cpp, CPU and CUDA kernels in
  csrc/{cpu,cuda}/cross_entropy.*; its fake kernel is registered here.
- ``fusedloss::focal_loss_fwd_triton``: the Triton kernel as a triton_op, so that torch.compile
  traces into it.
- autograd for both: the focal gradient is the cross-entropy gradient ``softmax - onehot(y)`` times
  a per-row coefficient (derived in csrc/include/fusedloss/cross_entropy_math.h, (6)), which the
  forward returns as ``coef``. The backward is therefore the cross-entropy backward op of the same
  backend, unchanged, with ``grad_loss * coef`` and no weights (the weights are inside ``coef``).

Forward returns per-row (loss, stats, coef) in the accumulation dtype (float32; float64 for float64
logits), stats = (max, log_s) as cross_entropy_fwd's; the reduction is left to the caller, on device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype, triton_kernels_present

FWD = "fusedloss::focal_loss_fwd"
FWD_TRITON = "fusedloss::focal_loss_fwd_triton"


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
        grad = ce_bwd_op(grad_loss * coef, None, logits, target, None, stats, ctx.ignore_index, 0.0, 0.0, 0.0, 1.0)
        return grad, None, None, None, None

    return backward


if _backend.extension_loaded():
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_autograd(FWD, _backward_with(torch.ops.fusedloss.cross_entropy_bwd),
                                    setup_context=_setup_context)

TRITON_REGISTERED = False
if triton_kernels_present("cross_entropy"):
    from torch.library import triton_op

    # The backward uses cross_entropy_bwd_triton, registered by fusedloss.ops.cross_entropy (under the
    # same condition as this block).
    from fusedloss.ops import cross_entropy as _ce  # noqa: F401

    @triton_op(FWD_TRITON, mutates_args={})
    def focal_loss_fwd_triton(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                              gamma: float) -> tuple[Tensor, Tensor, Tensor]:
        from fusedloss.triton import cross_entropy as kernels

        return kernels.focal_loss_fwd(logits, target, weight, ignore_index, gamma)

    focal_loss_fwd_triton.register_autograd(_backward_with(torch.ops.fusedloss.cross_entropy_bwd_triton),
                                            setup_context=_setup_context)
    TRITON_REGISTERED = True


def forward_op(backend: str):
    """The forward op (with autograd) that runs ``backend``'s kernels."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.focal_loss_fwd
    if backend == "triton":
        return torch.ops.fusedloss.focal_loss_fwd_triton
    raise ValueError(f"no focal loss kernel op for backend {backend!r}")


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
    grad = torch.ops.fusedloss.cross_entropy_bwd_triton(g, None, logits, target, None, stats, ctx.ignore_index, 0.0,
                                                        0.0, 0.0, 1.0)
    return grad, None, None, None, None, None, None, None


# The Triton twin's backward uses cross_entropy_bwd_triton, registered by fusedloss.ops.cross_entropy.
from fusedloss.ops import cross_entropy as _ce  # noqa: E402,F401

FOCAL_LOSS = _registry.KernelOp("focal_loss", SCHEMA, _fake, triton_module="cross_entropy", triton_impl=_triton_impl,
                                setup_context=_triton_setup_context, backward=_triton_backward)
