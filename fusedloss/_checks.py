"""Argument checks shared by the functional API: each error names the argument at fault."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


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
