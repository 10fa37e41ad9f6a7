"""The distillation ops' contract with PyTorch (kl_div_logits, jsd_logits): fakes of the C++ kernel ops,
their Triton twins, autograd, and the reduction.

- ``fusedloss::kl_div_fwd`` (schema in csrc/registration.cpp, kernels in csrc/{cpu,cuda}/kl_div.*):
  per-row loss and stats (N, 6) in the accumulation dtype; ``fusedloss::kl_div_bwd``: the student's
  gradient and, when asked, the teacher's. Their Triton twins ``fusedloss::kl_div_{fwd,bwd}_triton``
  (fusedloss/triton/kl_div.py) have the same schemas.
- autograd, registered here in Python with torch.library for both (unlike cross_entropy / focal /
  gap, whose public-level op has its autograd in C++ in csrc/autograd.cpp): the backward asks for the
  teacher's gradient only when the teacher requires one, so a frozen teacher costs no extra write.
- :func:`distill`: forward op, then the reduction on device in PyTorch ops (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops._common import acc_dtype, no_context, no_double_backward, triton_kernels_present

FWD = "fusedloss::kl_div_fwd"
BWD = "fusedloss::kl_div_bwd"


def _fwd_fake(student, teacher, target, ignore_index, temperature, beta, jsd):
    n = student.shape[0]
    acc = acc_dtype(student.dtype)
    return student.new_empty((n,), dtype=acc), student.new_empty((n, 6), dtype=acc)


def _bwd_fake(grad_loss, student, teacher, target, stats, ignore_index, temperature, beta, jsd, teacher_grad):
    return (student.new_empty(student.shape),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


def _setup_context(ctx, inputs, output):
    student, teacher, target, *scalars = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, teacher, target, stats)
    ctx.scalars = tuple(scalars)


def _backward_with(bwd_op):
    def backward(ctx, grad_loss, _grad_stats):
        student, teacher, target, stats = ctx.saved_tensors
        teacher_grad = bool(ctx.needs_input_grad[1])
        grad_s, grad_t = bwd_op(grad_loss, student, teacher, target, stats, *ctx.scalars, teacher_grad)
        return (grad_s if ctx.needs_input_grad[0] else None, grad_t if teacher_grad else None,
                None, None, None, None, None)

    return backward


if _backend.extension_loaded():
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_fake(BWD)(_bwd_fake)
    torch.library.register_autograd(FWD, _backward_with(torch.ops.fusedloss.kl_div_bwd), setup_context=_setup_context)
    torch.library.register_autograd(BWD, no_double_backward("kl_div"), setup_context=no_context)

TRITON_REGISTERED = False
if triton_kernels_present("kl_div"):
    from torch.library import triton_op

    @triton_op("fusedloss::kl_div_fwd_triton", mutates_args={})
    def kl_div_fwd_triton(student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int,
                          temperature: float, beta: float, jsd: bool) -> tuple[Tensor, Tensor]:
        from fusedloss.triton import kl_div as kernels

        return kernels.kl_div_fwd(student, teacher, target, ignore_index, temperature, beta, jsd)

    @triton_op("fusedloss::kl_div_bwd_triton", mutates_args={})
    def kl_div_bwd_triton(grad_loss: Tensor, student: Tensor, teacher: Tensor, target: Tensor | None, stats: Tensor,
                          ignore_index: int, temperature: float, beta: float, jsd: bool,
                          teacher_grad: bool) -> tuple[Tensor, Tensor]:
        from fusedloss.triton import kl_div as kernels

        return kernels.kl_div_bwd(grad_loss, student, teacher, target, stats, ignore_index, temperature, beta, jsd,
                                  teacher_grad)

    kl_div_fwd_triton.register_autograd(_backward_with(torch.ops.fusedloss.kl_div_bwd_triton),
                                        setup_context=_setup_context)
    kl_div_bwd_triton.register_autograd(no_double_backward("kl_div"), setup_context=no_context)
    TRITON_REGISTERED = True


def forward_op(backend: str):
    """The forward op (with autograd) that runs ``backend``'s kernels."""
    if backend in ("cpu", "cuda"):
        if not _backend.extension_loaded():
            raise RuntimeError("fusedloss: the compiled extension holds no kl_div op")
        return torch.ops.fusedloss.kl_div_fwd
    if backend == "triton":
        if not TRITON_REGISTERED:
            raise RuntimeError("fusedloss: the Triton kl_div kernels are not available in this install")
        return torch.ops.fusedloss.kl_div_fwd_triton
    raise ValueError(f"no kl_div kernel op for backend {backend!r}")


def backward_op(backend: str):
    """The gradient op of ``backend`` (the chunked linear twins call it directly)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fusedloss.kl_div_bwd
    if backend == "triton":
        return torch.ops.fusedloss.kl_div_bwd_triton
    raise ValueError(f"no kl_div kernel op for backend {backend!r}")


def reduce(rows: Tensor, target: Tensor | None, ignore_index: int, reduction: str, num_classes: int) -> Tensor:
    """The reduction of per-row losses (ignored rows already 0), on device, with autograd: none the rows;
    sum; batchmean the sum over the kept rows; mean over kept rows times C (torch's kl_div "mean" counts
    elements). No kept row gives 0 / 0 = NaN, as torch's mean of nothing."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        count = rows.shape[0] * (num_classes if reduction == "mean" else 1)
        return total / count
    kept = (target != ignore_index).sum().to(total.dtype)
    return total / (kept * num_classes if reduction == "mean" else kept)


def distill(backend: str, student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int,
            reduction: str, temperature: float, beta: float, jsd: bool) -> Tensor:
    """kl_div_logits (jsd False) / jsd_logits on (N, C) rows with unit class stride."""
    rows, _ = forward_op(backend)(student, teacher, target, ignore_index, temperature, beta, jsd)
    return reduce(rows, target, ignore_index, reduction, student.shape[1])
