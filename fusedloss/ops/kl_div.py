"""The distillation ops' contract with PyTorch (kl_div_logits, jsd_logits): fakes of the C++ kernel ops,
their Triton twins, autograd, and the reduction.

- ``KERNELS``: ``fusedloss::kl_div_fwd`` (schema in csrc/registration.cpp, kernels in
  csrc/{cpu,cuda}/kl_div.*): per-row loss and stats (N, 6) in the accumulation dtype;
  ``fusedloss::kl_div_bwd``: the student's gradient and, when asked, the teacher's; their Triton twins
  (fusedloss/triton/kl_div.py), registered by :class:`fusedloss.ops._registry.KernelPair`.
- autograd in Python for both kinds (unlike cross_entropy / focal / gap, whose public-level op has its
  autograd in C++ in csrc/autograd.cpp): the backward asks for the teacher's gradient only when the
  teacher requires one, so a frozen teacher costs no extra write.
- :func:`distill`: forward op, then the reduction on device in PyTorch ops (no host sync).
"""

from __future__ import annotations

from torch import Tensor

from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype


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
        return grad_s if ctx.needs_input_grad[0] else None, grad_t if teacher_grad else None

    return backward


KERNELS = _registry.KernelPair(
    "kl_div",
    fwd_schema="(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float temperature, float beta, "
               "bool jsd) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor stats, int ignore_index, "
               "float temperature, float beta, bool jsd, bool teacher_grad) -> (Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="kl_div")


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
    rows, _ = KERNELS.fwd(backend)(student, teacher, target, ignore_index, temperature, beta, jsd)
    return reduce(rows, target, ignore_index, reduction, student.shape[1])
