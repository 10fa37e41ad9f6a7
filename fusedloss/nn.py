"""Modules that hold a loss's configuration and call the functional API; drop-in for torch's twins."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from fusedloss import functional as F

__all__ = ["CrossEntropyLoss", "FocalLoss", "GapLoss", "InfoNCELoss", "LinearCrossEntropyLoss", "MultiMarginLoss",
           "KLDivLogitsLoss", "JSDLogitsLoss"]


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


class LinearCrossEntropyLoss(nn.Module):
    """Chunked linear cross-entropy (see ``fusedloss.linear_cross_entropy``), in two forms.

    - Options only (``LinearCrossEntropyLoss(reduction=..., ...)``): holds nothing but the loss options
      (and the class ``weight`` buffer); called as ``loss(input, linear_weight, target, linear_bias=None)``,
      the head living in the model.
    - torch 2.14's twin (``LinearCrossEntropyLoss(in_features, num_classes, bias=..., device=..., dtype=...)``):
      owns the head as ``self.linear`` (an ``nn.Linear``, initialized as torch's) and is called as
      ``loss(input, target)``, like ``torch.nn.LinearCrossEntropyLoss``. ``out_features`` other than
      ``()`` (K-dimensional loss) is not supported; ``options`` is accepted as in the functional form.
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int | None = None,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if (in_features is None) != (num_classes is None):
            raise ValueError("in_features and num_classes go together: pass both (the module owns the head, as "
                             "torch's) or neither (pass linear_weight when calling it)")
        if tuple(out_features) != ():
            raise NotImplementedError(f"out_features (K-dimensional loss) is not supported, got {out_features!r}")
        if in_features is not None:
            self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
            if weight is not None and tuple(weight.shape) != (num_classes,):
                raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        else:
            self.linear = None
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input: Tensor, *args: Tensor, linear_bias: Tensor | None = None) -> Tensor:
        if self.linear is not None:
            if len(args) != 1 or linear_bias is not None:
                raise TypeError("this LinearCrossEntropyLoss owns its head (in_features, num_classes): call it as "
                                "loss(input, target)")
            (target,) = args
            linear_weight, linear_bias = self.linear.weight, self.linear.bias
        else:
            if len(args) != 2:
                raise TypeError("call as loss(input, linear_weight, target, linear_bias=None) (or construct it "
                                "with in_features and num_classes to own the head)")
            linear_weight, target = args
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                                      chunk_size=self.chunk_size, options=self.options, backend=self.backend)

    def extra_repr(self) -> str:
        parts = []
        if self.linear is not None:
            parts.append(f"in_features={self.linear.in_features}, num_classes={self.linear.out_features}, "
                         f"bias={self.linear.bias is not None}")
        parts += [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None), ("chunk_size", None),
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


class FocalLoss(nn.Module):
    """Multi-class focal loss (see ``fusedloss.focal_loss``): gamma 2 by default.

    ``alpha`` (a ``(C,)`` tensor) and ``weight`` are buffers (they follow ``.to()``); a float alpha is
    a plain attribute.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Tensor | None = None,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.gamma = gamma
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, self.gamma, self.alpha, weight=self.weight, ignore_index=self.ignore_index,
                            reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"gamma={self.gamma}"]
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}" if not isinstance(self.alpha, Tensor) else
                         f"alpha=<tensor of {self.alpha.shape[0]}>")
        parts += [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


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


class InfoNCELoss(nn.Module):
    """InfoNCE / CLIP contrastive loss (see ``fusedloss.info_nce``); ``forward(query, key, labels=None)``.

    ``learnable_temperature=True`` keeps the temperature as CLIP does: a parameter
    ``logit_scale = log(1 / temperature)`` (initialized from ``temperature``), used as
    ``exp(min(logit_scale, log(100)))``: the scale is clamped at 100 inside the graph (no host sync;
    the parameter gets no gradient while it is above the clamp).
    """

    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        normalize: bool = True,
        symmetric: bool = False,
        reduction: str = "mean",
        learnable_temperature: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.normalize = normalize
        self.symmetric = symmetric
        self.reduction = reduction
        self.learnable_temperature = learnable_temperature
        self.backend = backend
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
            self.temperature = None
        else:
            self.logit_scale = None
            self.temperature = float(temperature)

    def current_temperature(self) -> float | Tensor:
        """The temperature the next forward uses: the float, or exp(-clamped logit_scale) in the graph."""
        if self.logit_scale is None:
            return self.temperature
        return torch.exp(-self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE))

    def forward(self, query: Tensor, key: Tensor, labels: Tensor | None = None) -> Tensor:
        return F.info_nce(query, key, labels, temperature=self.current_temperature(), normalize=self.normalize,
                          symmetric=self.symmetric, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        temp = "learnable" if self.learnable_temperature else f"{self.temperature}"
        parts = [f"temperature={temp}", f"normalize={self.normalize}", f"symmetric={self.symmetric}",
                 f"reduction={self.reduction!r}"]
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class KLDivLogitsLoss(nn.Module):
    """Distillation loss KL(p_teacher || p_student) from logits (see ``fusedloss.kl_div_logits``);
    ``forward(student, teacher, target=None)``."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
                 backend: str | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return F.kl_div_logits(student, teacher, target, temperature=self.temperature, ignore_index=self.ignore_index,
                               reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class JSDLogitsLoss(nn.Module):
    """Generalized Jensen-Shannon divergence from logits (see ``fusedloss.jsd_logits``);
    ``forward(student, teacher, target=None)``."""

    def __init__(self, beta: float = 0.5, *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str | None = None) -> None:
        super().__init__()
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return F.jsd_logits(student, teacher, target, beta=self.beta, temperature=self.temperature,
                            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}")
