"""Modules that hold a loss's configuration and call the functional API; drop-in for torch's twins."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from fusedloss import functional as F

__all__ = ["CrossEntropyLoss", "GapLoss", "MultiMarginLoss"]


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` with the fused kernels, plus ``z_loss``, ``softcap`` and ``temperature``.

    Accepts torch's constructor signature (including the deprecated ``size_average``/``reduce``).
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                               temperature=self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None), ("temperature", 1.0),
                              ("backend", None)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(parts)


class GapLoss(nn.Module):
    """Multi-class gap hinge loss (see ``fusedloss.gap_loss``); margin 0.5 by default."""

    def __init__(
        self,
        margin: float = 0.5,
        p: int = 1,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        class_normalize: bool = False,
        mode: str = "sum",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.margin = margin
        self.p = p
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.class_normalize = class_normalize
        self.mode = mode
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.gap_loss(input, target, self.margin, p=self.p, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction, class_normalize=self.class_normalize, mode=self.mode,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, p={self.p}, reduction={self.reduction!r}, "
                f"class_normalize={self.class_normalize}, mode={self.mode!r}")


class MultiMarginLoss(GapLoss):
    """Drop-in for ``torch.nn.MultiMarginLoss`` (p=1, margin=1, class-normalized), fused."""

    def __init__(
        self,
        p: int = 1,
        margin: float = 1.0,
        weight: Tensor | None = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        *,
        backend: str | None = None,
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        super().__init__(margin=margin, p=p, weight=weight, reduction=reduction, class_normalize=True,
                         backend=backend)
