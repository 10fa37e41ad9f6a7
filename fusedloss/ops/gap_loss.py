"""The gap hinge loss op's contract with PyTorch: fakes of the C++ ops, the Triton twins, autograd.

``GAP_LOSS``, the public-level op ``fusedloss::gap_loss`` (what fusedloss.functional calls), is the
forward kernel and the reduction by reduce_rows (its mean counts the kept rows), autograd in C++
(csrc/autograd.cpp); its Triton twin ``fusedloss::gap_loss_triton`` has the same schema.

``fusedloss::gap_loss_fwd`` returns the per-row loss (accumulation dtype); ``gap_loss_bwd`` the
input's gradient from the per-row upstream gradient. Nothing is saved but the inputs: the backward
recomputes the gaps in the same single pass that writes the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype, no_context, no_double_backward, triton_kernels_present

FWD = "fusedloss::gap_loss_fwd"
BWD = "fusedloss::gap_loss_bwd"


def _fwd_fake(input, target, weight, margin, p, ignore_index, class_normalize, max_mode):
    return input.new_empty((input.shape[0],), dtype=acc_dtype(input.dtype))


def _bwd_fake(grad_loss, input, target, weight, margin, p, ignore_index, class_normalize, max_mode):
    return input.new_empty(input.shape)


def _setup_context(ctx, inputs, output):
    input, target, weight, *scalars = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.scalars = tuple(scalars)


def _backward_with(bwd_op):
    def backward(ctx, grad_loss):
        input, target, weight = ctx.saved_tensors
        grad = bwd_op(grad_loss, input, target, weight, *ctx.scalars)
        return grad, None, None, None, None, None, None, None

    return backward


if _backend.extension_loaded():
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_fake(BWD)(_bwd_fake)
    torch.library.register_autograd(FWD, _backward_with(torch.ops.fusedloss.gap_loss_bwd),
                                    setup_context=_setup_context)
    torch.library.register_autograd(BWD, no_double_backward("gap_loss"), setup_context=no_context)

TRITON_REGISTERED = False
if triton_kernels_present("gap_loss"):
    from torch.library import triton_op

    @triton_op("fusedloss::gap_loss_fwd_triton", mutates_args={})
    def gap_loss_fwd_triton(input: Tensor, target: Tensor, weight: Tensor | None, margin: float, p: int,
                            ignore_index: int, class_normalize: bool, max_mode: bool) -> Tensor:
        from fusedloss.triton import gap_loss as kernels

        return kernels.gap_loss_fwd(input, target, weight, margin, p, ignore_index, class_normalize, max_mode)

    @triton_op("fusedloss::gap_loss_bwd_triton", mutates_args={})
    def gap_loss_bwd_triton(grad_loss: Tensor, input: Tensor, target: Tensor, weight: Tensor | None, margin: float,
                            p: int, ignore_index: int, class_normalize: bool, max_mode: bool) -> Tensor:
        from fusedloss.triton import gap_loss as kernels

        return kernels.gap_loss_bwd(grad_loss, input, target, weight, margin, p, ignore_index, class_normalize,
                                    max_mode)

    gap_loss_fwd_triton.register_autograd(_backward_with(torch.ops.fusedloss.gap_loss_bwd_triton),
                                          setup_context=_setup_context)
    gap_loss_bwd_triton.register_autograd(no_double_backward("gap_loss"), setup_context=no_context)
    TRITON_REGISTERED = True


def forward_op(backend: str):
    """The forward op (with autograd) that runs ``backend``'s kernels."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.gap_loss_fwd
    if backend == "triton":
        if not TRITON_REGISTERED:
            raise RuntimeError("fusedloss: the Triton gap_loss kernels are not available in this install")
        return torch.ops.fusedloss.gap_loss_fwd_triton
    raise ValueError(f"no gap_loss kernel op for backend {backend!r}")


# --- the public-level op -------------------------------------------------------------------------

SCHEMA = ("(Tensor input, Tensor target, Tensor? weight, float margin, int p, int ignore_index, bool class_normalize, "
          "bool max_mode, int reduction) -> (Tensor loss, Tensor mass)")


def _fake(input, target, weight, margin, p, ignore_index, class_normalize, max_mode, reduction):
    acc = acc_dtype(input.dtype)
    none = reduction == _registry.NONE
    return (input.new_empty((input.shape[0],) if none else (), dtype=acc),
            input.new_empty((0,) if none else (), dtype=acc))


def _triton_impl(input, target, weight, margin, p, ignore_index, class_normalize, max_mode, reduction):
    from fusedloss.ops.cross_entropy import reduce_triton
    from fusedloss.triton import gap_loss as kernels

    loss = kernels.gap_loss_fwd(input, target, weight, margin, p, ignore_index, class_normalize, max_mode)
    return reduce_triton(loss, target, None, ignore_index, reduction)


def _triton_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    input, target, weight, *scalars, reduction = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(input, target, weight, output[1])
    ctx.scalars = tuple(scalars)
    ctx.reduction = reduction


def _triton_backward(ctx, grad_loss, _grad_mass):
    input, target, weight, mass = ctx.saved_tensors
    g = _registry.row_grad(grad_loss, mass, ctx.reduction, input.shape[0], mass)
    grad = torch.ops.fusedloss.gap_loss_bwd_triton(g, input, target, weight, *ctx.scalars)
    return grad, None, None, None, None, None, None, None, None


GAP_LOSS = _registry.KernelOp("gap_loss", SCHEMA, _fake, triton_module="gap_loss", triton_impl=_triton_impl,
                              setup_context=_triton_setup_context, backward=_triton_backward)
