"""The gap hinge loss op's contract with PyTorch: fakes of the C++ ops, the Triton twins, autograd.

``GAP_LOSS``, the public-level op ``fusedloss::gap_loss`` (what fusedloss.functional calls), is the
forward kernel and the reduction by reduce_rows (its mean counts the kept rows), autograd in C++
(csrc/autograd.cpp); its Triton twin ``fusedloss::gap_loss_triton`` has the same schema.

``fusedloss::gap_loss_fwd`` returns the per-row loss (accumulation dtype); ``gap_loss_bwd`` the
input's gradient from the per-row upstream gradient. Nothing is saved but the inputs: the backward
recomputes the gaps in the same single pass that writes the gradient.
"""

from __future__ import annotations

from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype


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
        return bwd_op(grad_loss, input, target, weight, *ctx.scalars)

    return backward


KERNELS = _registry.KernelPair(
    "gap_loss",
    fwd_schema="(Tensor input, Tensor target, Tensor? weight, float margin, int p, int ignore_index, "
               "bool class_normalize, bool max_mode) -> Tensor",
    bwd_schema="(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, float margin, int p, "
               "int ignore_index, bool class_normalize, bool max_mode) -> Tensor",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="gap_loss")


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
    return KERNELS.bwd("triton")(g, input, target, weight, *ctx.scalars)


GAP_LOSS = _registry.KernelOp("gap_loss", SCHEMA, _fake, triton_module="gap_loss", triton_impl=_triton_impl,
                              setup_context=_triton_setup_context, backward=_triton_backward)
