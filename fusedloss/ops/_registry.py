"""The one registration of every public-level op, for both kinds of kernels.

An op's module (``fusedloss/ops/<op>.py``) declares it once as a :class:`KernelOp`: its schema, its
fake (output shapes), and its Triton twin's implementation and autograd. This module then

- registers the fake for the C++ op ``fusedloss::<name>`` (schema in csrc/registration.cpp, CPU and
  CUDA kernels in csrc/cpu, csrc/cuda, autograd in C++ in csrc/autograd.cpp),
- defines the Triton twin ``fusedloss::<name>_triton`` with the same schema as a ``triton_op`` (so
  torch.compile traces into its kernels), with the declared autograd,
- and answers ``op(backend)``: the callable that runs ``backend``'s kernels.

The Triton twin returns what the C++ op returns (the reduced loss, then what its backward needs), so
one fake serves both; a test checks that the two schemas are the same.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops._common import triton_kernels_present

# at::Reduction's values, which the kernels take.
REDUCTION = {"none": 0, "mean": 1, "sum": 2}
NONE, MEAN, SUM = 0, 1, 2


def row_grad(grad: Tensor | None, mass: Tensor, reduction: int, n: int, like: Tensor,
             token_weight: Tensor | None = None) -> Tensor:
    """d loss / d l_i for every row from the incoming gradient of the reduced loss (csrc/autograd.cpp
    has the same): none g_i, sum g, mean g / mass; times u_i with token weights u."""
    if grad is None:
        return like.new_zeros(n)
    if reduction == NONE:
        g = grad
    elif reduction == SUM:
        g = grad.expand(n)
    else:
        g = (grad / mass).expand(n)
    return g if token_weight is None else g * token_weight


def _reduce_rows_fake(loss, target, weight, token_weight, ignore_index, mean):
    return loss.new_empty(()), loss.new_empty(())


if _backend.extension_loaded():
    torch.library.register_fake("fusedloss::reduce_rows")(_reduce_rows_fake)


def direct_call(name: str, overload) -> Callable | None:
    """``fusedloss._C.call`` bound to the C++ op ``fusedloss::<name>`` (csrc/python_call.cpp): the same
    dispatcher call as ``overload`` without torch.ops' generic boxing, handing anything unusual back to
    ``overload``. None when the extension predates it."""
    if not hasattr(_backend._C, "op_id"):
        return None
    return partial(_backend._C.call, _backend._C.op_id(f"fusedloss::{name}", overload))


def eager_dispatch(op) -> bool:
    """True when a call of ``op`` may skip the OpOverload's Python frame: eager mode, no Python object
    dispatcher set (what ``OpOverload.__call__`` itself checks)."""
    return getattr(op, "_pyobj_dispatcher", True) is None and not torch.compiler.is_compiling()


class KernelOp:
    """One public-level op: ``op(backend)(*args)`` runs the kernels of ``backend`` ("cpu", "cuda",
    "triton") with autograd."""

    def __init__(self, name: str, schema: str, fake: Callable, *, triton_module: str | None = None,
                 triton_impl: Callable | None = None, setup_context: Callable | None = None,
                 backward: Callable | None = None) -> None:
        self.name = name
        self.schema = schema
        self._cpp = None
        self._cpp_direct = None
        self._triton = None
        if _backend.extension_loaded():
            torch.library.register_fake(f"fusedloss::{name}")(fake)
            self._cpp = getattr(torch.ops.fusedloss, name).default
            # csrc/python_call.cpp: the same call without torch.ops' generic boxing (absent from an
            # extension built before it)
            self._cpp_direct = direct_call(name, self._cpp)
        if triton_module is not None and triton_kernels_present(triton_module):
            from torch.library import triton_op

            twin = triton_op(f"fusedloss::{name}_triton", triton_impl, mutates_args={}, schema=schema)
            twin.register_autograd(backward, setup_context=setup_context)
            self._triton = getattr(torch.ops.fusedloss, f"{name}_triton").default

    def op(self, backend: str):
        if backend in ("cpu", "cuda"):
            if self._cpp is None:
                raise RuntimeError(f"fusedloss: the compiled extension holds no {self.name} op")
            return self._cpp
        if backend == "triton":
            if self._triton is None:
                raise RuntimeError(f"fusedloss: the Triton {self.name} kernels are not available in this install")
            return self._triton
        raise ValueError(f"no {self.name} kernel op for backend {backend!r}")

    def call(self, backend: str):
        """What the functional API calls: ``op(backend)``, or in eager mode a cheaper callable that makes
        the same dispatcher call: for the C++ ops ``fusedloss._C.call`` (csrc/python_call.cpp), for the
        Triton twins the OpOverload's own C++ callable, which ``OpOverload.__call__`` calls when no
        Python object dispatcher is set. At tiny sizes torch.ops' Python frame and generic argument
        boxing cost more than the kernels. torch.compile gets the OpOverload, which its tracer knows."""
        op = self.op(backend)
        if eager_dispatch(op):
            return self._cpp_direct if op is self._cpp and self._cpp_direct is not None else op._op
        return op
