"""Dtype rules every layer shares (the bottom of the import graph: it imports torch only)."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and return per-row values in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
