"""The cross-entropy op's whole contract with PyTorch.

- ``CROSS_ENTROPY``, the public-level op ``fusedloss::cross_entropy`` (what fusedloss.functional calls):
  the forward kernel, the reduction (mean, sum) by the reduce_rows kernel, autograd in C++
  (csrc/autograd.cpp); its Triton twin ``fusedloss::cross_entropy_triton`` (same schema, autograd
  below). Kernels: csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu, fusedloss/triton/cross_entropy.py.
- ``KERNELS``: the row kernels ``fusedloss::cross_entropy_fwd`` / ``_bwd`` (schemas in
  csrc/registration.cpp, CPU and CUDA kernels in csrc/) and their Triton twins, registered by
  :class:`fusedloss.ops._registry.KernelPair`, with one autograd for both: the backward op consumes
  the per-row stats saved by the forward. The chunk loops and the distributed ops call them.
- ``fusedloss::cross_entropy_fwd_grad_`` (C++) / ``fusedloss::cross_entropy_fwd_grad_triton_``: the row
  kernel of chunked linear cross-entropy, forward and gradient in one pass, the gradient written over
  the logits (mutates_args={"logits"}). No autograd: it is called under no_grad, and torch.library
  registers no autograd formula for a mutating op (calling it on tensors that require grad is an error).

Forward returns per-row (loss, lse, stats) in the accumulation dtype (float32; float64 for float64
logits), stats = (max, log_s) per row for the backward; the reduction is left to the caller, on device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype, triton_kernels_present

FWD_GRAD = "fusedloss::cross_entropy_fwd_grad_"
FWD_GRAD_TRITON = "fusedloss::cross_entropy_fwd_grad_triton_"


def _fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, temperature, extras=False):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n, 4 if extras else 2), dtype=acc))


def _bwd_fake(grad_loss, grad_lse, logits, target, weight, stats, ignore_index, label_smoothing, z_loss, softcap,
              temperature, grad_logprob=None, grad_entropy=None):
    return logits.new_empty(logits.shape)


def _fwd_grad_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, temperature):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, temperature, *_ = inputs
    _, _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, target, weight, stats)
    ctx.scalars = (ignore_index, label_smoothing, z_loss, softcap, temperature)


def _backward_with(bwd_op):
    def backward(ctx, grad_loss, grad_lse, _grad_stats):
        logits, target, weight, stats = ctx.saved_tensors
        if grad_loss is None:  # only the returned lse was used
            grad_loss = stats.new_zeros(stats.shape[0])
        return bwd_op(grad_loss, grad_lse, logits, target, weight, stats, *ctx.scalars)

    return backward


KERNELS = _registry.KernelPair(
    "cross_entropy",
    fwd_schema="(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, float z_loss, "
               "float softcap, float temperature, bool extras=False) -> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
               "int ignore_index, float label_smoothing, float z_loss, float softcap, float temperature, "
               "Tensor? grad_logprob=None, Tensor? grad_entropy=None) -> Tensor",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="cross_entropy")

if _backend.extension_loaded():
    torch.library.register_fake(FWD_GRAD)(_fwd_grad_fake)

if triton_kernels_present("cross_entropy"):
    from torch.library import triton_op

    @triton_op(FWD_GRAD_TRITON, mutates_args={"logits"})
    def cross_entropy_fwd_grad_triton_(logits: Tensor, target: Tensor, weight: Tensor | None,
                                       grad_scale: Tensor | None, ignore_index: int, label_smoothing: float,
                                       z_loss: float, softcap: float, temperature: float) -> tuple[Tensor, Tensor]:
        from fusedloss.triton import cross_entropy as kernels

        return kernels.cross_entropy_fwd_grad_(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                                               z_loss, softcap, temperature)


def fwd_grad_op(backend: str):
    """The in-place forward + gradient op that runs ``backend``'s kernels (no autograd; see above).

    Called as ``op(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
    temperature) -> (loss, lse)``; ``"reference"`` gives fusedloss.reference.fwd_grad_reference, which
    has the same signature and works on any device.
    """
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.cross_entropy_fwd_grad_
    if backend == "triton":
        return torch.ops.fusedloss.cross_entropy_fwd_grad_triton_
    if backend == "reference":
        from fusedloss.reference import fwd_grad_reference

        return fwd_grad_reference
    raise ValueError(f"no cross-entropy forward + gradient op for backend {backend!r}")


# --- the public-level op -------------------------------------------------------------------------

SCHEMA = ("(Tensor logits, Tensor target, Tensor? weight, Tensor? token_weight, int ignore_index, int reduction, "
          "float label_smoothing, float z_loss, float softcap, float temperature, bool extras=False) -> (Tensor loss, "
          "Tensor lse, Tensor stats, Tensor mass, Tensor logprob, Tensor entropy)")


def _mass_fake(like: Tensor, reduction: int) -> Tensor:
    return like.new_empty((0,) if reduction == _registry.NONE else ())


def _fake(logits, target, weight, token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature,
          extras=False):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    loss = logits.new_empty((n,) if reduction == _registry.NONE else (), dtype=acc)
    extra = (n,) if extras else (0,)
    return (loss, logits.new_empty((n,), dtype=acc), logits.new_empty((n, 4 if extras else 2), dtype=acc),
            _mass_fake(loss.new_empty(()), reduction), loss.new_empty(extra), loss.new_empty(extra))


def extras_of(stats: Tensor, extras: bool) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) as outputs of their own (an output may not alias another): columns 2 and 3
    of the (N, 4) stats, or two empty (0,) tensors."""
    if not extras:
        return stats.new_empty((0,)), stats.new_empty((0,))
    return stats[:, 2].clone(memory_format=torch.contiguous_format), stats[:, 3].clone(
        memory_format=torch.contiguous_format)


def reduce_triton(loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: int,
                  token_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(reduced loss, mass) by the Triton reduction kernel; ``none`` keeps the rows (times the token
    weights when given)."""
    if reduction == _registry.NONE:
        return (loss if token_weight is None else loss * token_weight), loss.new_empty((0,))
    from fusedloss.triton import reduce as kernels

    return kernels.reduce_rows(loss, target, weight, token_weight, ignore_index, reduction == _registry.MEAN)


def _triton_impl(logits, target, weight, token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 temperature, extras=False):
    from fusedloss.triton import cross_entropy as kernels

    loss, lse, stats = kernels.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                                 softcap, temperature, extras)
    out, mass = reduce_triton(loss, target, weight, ignore_index, reduction, token_weight)
    return (out, lse, stats, mass, *extras_of(stats, extras))


def _triton_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, target, weight, token_weight, ignore_index, reduction, *scalars = inputs
    _, _, stats, mass, _, _ = output
    ctx.mark_non_differentiable(stats, mass)
    ctx.save_for_backward(logits, target, weight, stats, mass, token_weight)
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.scalars = tuple(scalars[:4])  # label_smoothing, z_loss, softcap, temperature (not extras)


def _triton_backward(ctx, grad_loss, grad_lse, _grad_stats, _grad_mass, grad_logprob, grad_entropy):
    logits, target, weight, stats, mass, token_weight = ctx.saved_tensors
    g = _registry.row_grad(grad_loss, mass, ctx.reduction, logits.shape[0], stats, token_weight)
    grad = KERNELS.bwd("triton")(g, grad_lse, logits, target, weight, stats, ctx.ignore_index,
                                                        *ctx.scalars, grad_logprob, grad_entropy)
    return grad


CROSS_ENTROPY = _registry.KernelOp("cross_entropy", SCHEMA, _fake, triton_module="cross_entropy",
                                   triton_impl=_triton_impl, setup_context=_triton_setup_context,
                                   backward=_triton_backward)
