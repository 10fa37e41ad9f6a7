"""Modules that hold a loss's configuration and call the functional API; drop-in for torch's twins."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from fusedloss import functional as F

__all__ = ["CrossEntropyLoss", "FocalLoss", "GapLoss", "InfoNCELoss", "LinearCrossEntropyLoss", "MultiMarginLoss",
           "KLDivLogitsLoss", "JSDLogitsLoss", "SigLIPLoss"]


class _Loss(nn.Module):
    """A loss module's options, declared once: ``OPTIONS`` maps each option the functional takes to its
    default. The instance keeps them as attributes (settable after construction, as torch's losses),
    ``_options()`` passes them to the functional by name, and ``extra_repr`` shows those in ``SHOWN`` and
    those that differ from their default."""

    OPTIONS: dict = {}
    SHOWN: tuple = ("reduction",)

    def _set_options(self, values: dict) -> None:
        for name in self.OPTIONS:
            setattr(self, name, values[name])

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self.OPTIONS}

    def _repr_parts(self) -> list:
        parts = []
        for name, value in self._options().items():
            default = self.OPTIONS[name]
            if name in self.SHOWN or type(value) is not type(default) or value != default:
                shown = f"<tensor of {value.shape[0]}>" if isinstance(value, Tensor) else repr(value)
                parts.append(f"{name}={shown}")
        return parts

    def extra_repr(self) -> str:
        return ", ".join(self._repr_parts())


class CrossEntropyLoss(_Loss):
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
        self._set_options(locals())

    OPTIONS = {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None,
               "temperature": 1.0, "backend": None}
    SHOWN = ("reduction", "ignore_index")

    def forward(self, input: Tensor, target: Tensor, *, token_weight: Tensor | None = None) -> Tensor:
        return F.cross_entropy(input, target, self.weight, token_weight=token_weight, **self._options())


class LinearCrossEntropyLoss(_Loss):
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
        ignore_index = -100 if ignore_index is None else ignore_index
        self._set_options(locals())

    OPTIONS = {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None,
               "chunk_size": None, "options": None, "backend": None}
    SHOWN = ("reduction", "ignore_index")

    def forward(self, input: Tensor, *args: Tensor, linear_bias: Tensor | None = None,
                token_weight: Tensor | None = None) -> Tensor:
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
                                      token_weight=token_weight, **self._options())

    def extra_repr(self) -> str:
        parts = []
        if self.linear is not None:
            parts.append(f"in_features={self.linear.in_features}, num_classes={self.linear.out_features}, "
                         f"bias={self.linear.bias is not None}")
        return ", ".join(parts + self._repr_parts())


class GapLoss(_Loss):
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
        self._set_options(locals())

    OPTIONS = {"margin": 0.5, "p": 1, "ignore_index": -100, "reduction": "mean", "class_normalize": False,
               "mode": "sum", "backend": None}
    SHOWN = ("margin", "p", "reduction", "class_normalize", "mode")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.gap_loss(input, target, weight=self.weight, **self._options())


class FocalLoss(_Loss):
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
        self.register_buffer("weight", weight)
        self._set_options(locals())
        if isinstance(alpha, Tensor):
            del self.alpha
            self.register_buffer("alpha", alpha)

    OPTIONS = {"gamma": 2.0, "alpha": None, "ignore_index": -100, "reduction": "mean", "backend": None}
    SHOWN = ("gamma", "reduction", "ignore_index")

    def forward(self, input: Tensor, target: Tensor, *, token_weight: Tensor | None = None) -> Tensor:
        return F.focal_loss(input, target, weight=self.weight, token_weight=token_weight, **self._options())


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


class InfoNCELoss(_Loss):
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
        self._set_options(locals())
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
            self.temperature = None
        else:
            self.logit_scale = None
            self.temperature = float(temperature)

    # temperature is passed by forward (a float, or the learnable one in the graph), not as an option.
    OPTIONS = {"normalize": True, "symmetric": False, "reduction": "mean", "backend": None}
    SHOWN = ("normalize", "symmetric", "reduction")

    def current_temperature(self) -> float | Tensor:
        """The temperature the next forward uses: the float, or exp(-clamped logit_scale) in the graph."""
        if self.logit_scale is None:
            return self.temperature
        return torch.exp(-self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE))

    def forward(self, query: Tensor, key: Tensor, labels: Tensor | None = None, *, query_groups: Tensor | None = None,
                key_groups: Tensor | None = None) -> Tensor:
        return F.info_nce(query, key, labels, query_groups=query_groups, key_groups=key_groups,
                          temperature=self.current_temperature(), **self._options())

    def extra_repr(self) -> str:
        temp = "learnable" if self.learnable_temperature else f"{self.temperature}"
        return ", ".join([f"temperature={temp}"] + self._repr_parts())


class SigLIPLoss(_Loss):
    """SigLIP's sigmoid pairwise loss (see ``fusedloss.siglip_loss``); ``forward(query, key, labels=None)``.

    ``learnable=True`` (the default) keeps temperature and bias as SigLIP does: parameters
    ``logit_scale = log(temperature)`` (the temperature used is ``exp(logit_scale)``) and ``logit_bias``,
    initialized from ``temperature`` and ``bias`` (SigLIP's t' = log 10, b = -10). No clamp is applied in
    the graph. ``learnable=False`` keeps both as floats.
    """

    def __init__(
        self,
        temperature: float = 10.0,
        bias: float = -10.0,
        *,
        normalize: bool = True,
        reduction: str = "mean",
        learnable: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"bias must be a finite float, got {bias!r}")
        self._set_options(locals())
        self.learnable = learnable
        if learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(temperature)))
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
            self.temperature = self.bias = None
        else:
            self.logit_scale = self.logit_bias = None
            self.temperature, self.bias = float(temperature), float(bias)

    # temperature and bias are passed by forward (floats, or the learnable ones in the graph).
    OPTIONS = {"normalize": True, "reduction": "mean", "backend": None}
    SHOWN = ("normalize", "reduction")

    def current_temperature(self) -> float | Tensor:
        """The temperature (a multiplier) the next forward uses: the float, or exp(logit_scale) in the graph."""
        return self.temperature if self.logit_scale is None else self.logit_scale.exp()

    def current_bias(self) -> float | Tensor:
        return self.bias if self.logit_bias is None else self.logit_bias

    def forward(self, query: Tensor, key: Tensor, labels: Tensor | None = None) -> Tensor:
        return F.siglip_loss(query, key, temperature=self.current_temperature(), bias=self.current_bias(),
                             labels=labels, **self._options())

    def extra_repr(self) -> str:
        head = ["learnable"] if self.learnable else [f"temperature={self.temperature}", f"bias={self.bias}"]
        return ", ".join(head + self._repr_parts())


class KLDivLogitsLoss(_Loss):
    """Distillation loss KL(p_teacher || p_student) from logits (see ``fusedloss.kl_div_logits``);
    ``forward(student, teacher, target=None)``."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
                 backend: str | None = None) -> None:
        super().__init__()
        self._set_options(locals())

    OPTIONS = {"temperature": 1.0, "ignore_index": -100, "reduction": "batchmean", "backend": None}
    SHOWN = ("temperature", "reduction", "ignore_index")

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return F.kl_div_logits(student, teacher, target, **self._options())


class JSDLogitsLoss(_Loss):
    """Generalized Jensen-Shannon divergence from logits (see ``fusedloss.jsd_logits``);
    ``forward(student, teacher, target=None)``."""

    def __init__(self, beta: float = 0.5, *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str | None = None) -> None:
        super().__init__()
        self._set_options(locals())

    OPTIONS = {"beta": 0.5, "temperature": 1.0, "ignore_index": -100, "reduction": "batchmean", "backend": None}
    SHOWN = ("beta", "temperature", "reduction", "ignore_index")

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return F.jsd_logits(student, teacher, target, **self._options())
