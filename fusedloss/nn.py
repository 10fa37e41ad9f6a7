"""Modules that hold a loss's configuration and call the functional API; drop-in for torch's twins."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from fusedloss import functional as F

__all__ = ["CrossEntropyLoss"]


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
