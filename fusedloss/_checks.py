"""Argument checks shared by the functional API: each error names the argument at fault."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

REDUCTIONS = ("none", "mean", "sum")


def no_forward_ad(op: str, *tensors) -> None:
    """Refuses a dual input (torch.autograd.forward_ad, torch.func.jvp): the kernels have no forward-mode
    formula, and torch.library's Python autograd, which the Triton ops and some C++ ops use, would drop
    the tangent without an error. Outside a dual level, the common case, this is one attribute read."""
    if _forward_ad._current_level < 0:
        return
    for t in tensors:
        if isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"fusedloss.{op} has no forward-mode AD formula (forward AD / jvp); "
                                      "backend='reference' (plain PyTorch) has one")


def tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: Tensor) -> Tensor:
    tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    # two CPU tensors, the common case, without building two torch.device objects (a microsecond a call)
    if value.is_cpu and ref.is_cpu:
        return
    if value.device != ref.device:
        raise RuntimeError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; move them to one device")


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def real(name: str, value) -> float:
    """A Python (or NumPy) real number as a float. Strings and tensors are refused: float() would
    parse the one and read the other on the host (a sync inside the op)."""
    if type(value) is float:  # the common case, without the ABC check (~0.7 us)
        return value
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def integer(name: str, value) -> int:
    """A Python (or NumPy) integer, not a bool: int() would truncate 1.5 and the kernels and the
    reference would then disagree on which targets are ignored."""
    if type(value) is int:  # the common case, without the ABC check (~0.7 us)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def in_closed_unit(name: str, value: float) -> float:
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    value = real(name, value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def positive(name: str, value: float) -> float:
    value = real(name, value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def ce_options(label_smoothing, z_loss, softcap, temperature) -> tuple[float, float, float | None, float]:
    """cross-entropy's float options, checked (the defaults, the common case, in one comparison)."""
    if (type(label_smoothing) is float and type(z_loss) is float and softcap is None and type(temperature) is float
            and label_smoothing == 0.0 and z_loss == 0.0 and temperature == 1.0):
        return label_smoothing, z_loss, softcap, temperature
    return (in_closed_unit("label_smoothing", label_smoothing), non_negative("z_loss", z_loss),
            None if softcap is None else positive("softcap", softcap), positive("temperature", temperature))


def class_input(input: Tensor, target: Tensor) -> tuple[int, torch.Size]:
    """Logits of shape (C,), (N, C) or (N, C, d1, ...), the class dimension second (first for (C,)), and a
    target on their device. Returns the number of classes C and the shape a class-index target has."""
    ndim = input.dim()
    if ndim == 0:
        raise ValueError("input must be (C,), (N, C) or (N, C, d1, ...); got a 0-dim tensor")
    cdim = 0 if ndim == 1 else 1
    shape = input.shape
    C = shape[cdim]
    if C == 0:
        raise ValueError(f"input has no classes: shape {tuple(shape)}")
    same_device("target", target, "input", input)
    return C, shape[:1] if ndim == 2 else shape[:cdim] + shape[cdim + 1:]


def class_weight(weight: Tensor | None, num_classes: int, input: Tensor) -> Tensor | None:
    if weight is None:
        return None
    floating("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(f"weight must have shape ({num_classes},) (one per class), got {tuple(weight.shape)}")
    same_device("weight", weight, "input", input)
    return weight


def token_weight(value: Tensor | None, target_shape: torch.Size, input: Tensor, acc: torch.dtype) -> Tensor | None:
    """Per-element loss weights of the target's shape (a ``(1,)`` target's ``(1,)`` too), as the
    kernels take them: a contiguous vector of ``acc``. They are constants: one that requires grad is
    refused rather than silently given no gradient."""
    if value is None:
        return None
    tensor("token_weight", value)
    floating("token_weight", value)
    if value.shape != target_shape and not (value.numel() == 1 and math.prod(target_shape) == 1):
        raise ValueError(f"token_weight must have the target's shape {tuple(target_shape)}, got {tuple(value.shape)}")
    same_device("token_weight", value, "input", input)
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError("token_weight requires grad, but the losses give it no gradient; pass token_weight.detach()")
    return value.reshape(-1).to(acc).contiguous()


def temperature(value, ref: Tensor, ref_name: str):
    """A float > 0, or a 0-dim floating tensor on ``ref``'s device (its sign is not checked: that
    would read it on the host)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"temperature must be a float or a floating-point tensor, got dtype {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        same_device("temperature", value, ref_name, ref)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(value).__name__}")
    return positive("temperature", value)


def query_key(query: Tensor, key: Tensor) -> None:
    """InfoNCE's query (N, D) and key (M, D): floating, 2-D, one device and dtype, one feature size."""
    floating("query", query)
    floating("key", key)
    if query.dim() != 2:
        raise ValueError(f"query must be 2-D (N, D), got shape {tuple(query.shape)}")
    if key.dim() != 2:
        raise ValueError(f"key must be 2-D (M, D), got shape {tuple(key.shape)}")
    same_device("key", key, "query", query)
    if key.dtype != query.dtype:
        raise TypeError(f"key must have query's dtype {query.dtype}, got {key.dtype}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"query and key must have the same feature size D, got query {tuple(query.shape)} "
                         f"and key {tuple(key.shape)}")


def key_labels(labels: Tensor | None, query: Tensor, n: int, m: int, *, keys: str = "") -> Tensor | None:
    """The contrastive losses' labels: query i's positive is key labels[i] (None: key i). Returns them as
    int64, None kept. Out-of-range labels raise on CPU, where reading them costs no device sync; on other
    devices the callers make the loss of such a query NaN. ``keys`` names the keys in messages (the
    gathered losses: "this rank's keys")."""
    if labels is None:
        if m < n:
            raise ValueError(f"the default labels (query i's positive is key i) need at least as many keys as "
                             f"queries, got N={n} queries and M={m} keys; pass labels")
        return None
    tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer key indices (int64), got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},), got {tuple(labels.shape)}")
    same_device("labels", labels, "query", query)
    labels = labels.to(torch.int64)
    where = f" (they index {keys})" if keys else ""
    if n and m == 0:
        raise IndexError(f"labels must be in [0, M) = [0, 0){where}: there are no keys for the {n} queries")
    if labels.device.type == "cpu" and n and not torch.compiler.is_compiling():
        bad = (labels < 0) | (labels >= m)
        if bool(bad.any()):
            raise IndexError(f"labels must be in [0, M) = [0, {m}){where}, got {int(labels[bad][0])} "
                             f"at position {int(bad.nonzero()[0, 0])}")
    return labels
