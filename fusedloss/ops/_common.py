"""Pieces every op's registration uses."""

from __future__ import annotations

import importlib.util

from fusedloss._dtypes import acc_dtype  # noqa: F401  (the ops' modules take it from here)


def no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"fusedloss: {op_name} has no double backward (the gradient of its gradient)")

    return backward


def no_context(ctx, inputs, output):
    pass


def triton_kernels_present(module: str) -> bool:
    """True when triton is installed and fusedloss.triton.<module> exists."""
    return (importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec(f"fusedloss.triton.{module}") is not None)
