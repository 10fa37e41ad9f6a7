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

import importlib
import inspect
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops._common import no_context, no_double_backward, triton_kernels_present

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


def _arity(schema: str) -> int:
    return len(schema[1:schema.index(") ->")].split(","))


def _padded(backward: Callable, n_inputs: int) -> Callable:
    """The backward with None appended for the inputs it gives no gradient (its leading ones only)."""
    def padded(ctx, *grads):
        out = backward(ctx, *grads)
        out = out if isinstance(out, tuple) else (out,)
        return out + (None,) * (n_inputs - len(out))

    return padded


# Schema types as torch._C prints them, and the annotations that infer_schema turns back into them.
_ANNOTATIONS = {"Tensor": Tensor, "Optional[Tensor]": Optional[Tensor], "List[Tensor]": list[Tensor], "int": int,
                "Optional[int]": Optional[int], "List[int]": list[int], "float": float,
                "Optional[float]": Optional[float], "bool": bool, "Optional[bool]": Optional[bool]}


def _typed(fn: Callable, schema: str) -> Callable:
    """``fn`` itself, its signature declared from ``schema`` (``__signature__``, which inspect reads), so that
    a ``triton_op`` that infers its schema from the function (torch 2.11 does, ignoring ``schema=``) infers
    ``schema``. No wrapper: a Triton op's call pays no extra Python frame for it."""
    parsed = torch._C.parse_schema(f"fusedloss::_{schema}")
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[str(a.type)],
                                default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
              for a in parsed.arguments]
    rets = [_ANNOTATIONS[str(r.type)] for r in parsed.returns]
    fn.__signature__ = inspect.Signature(params, return_annotation=rets[0] if len(rets) == 1 else tuple[tuple(rets)])
    return fn


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

            twin = triton_op(f"fusedloss::{name}_triton", _typed(triton_impl, schema), mutates_args={}, schema=schema)
            twin.register_autograd(_padded(backward, _arity(schema)), setup_context=setup_context)
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


def _triton_kernel(module: str, function: str) -> Callable:
    """fusedloss.triton.<module>.<function>, imported at the first call (triton itself is imported late)."""
    def impl(*args):
        return getattr(importlib.import_module(f"fusedloss.triton.{module}"), function)(*args)

    impl.__name__ = function
    return impl


class KernelPair:
    """A row kernel op and its gradient op, the pieces under a public-level op, declared once.

    The C++ ops ``fusedloss::<name>_fwd`` / ``_bwd`` (schemas and kernels in csrc/) get their fakes here
    and, unless ``cpp_autograd`` (the forward's autograd is in csrc/autograd.cpp), the autograd formula;
    their Triton twins ``fusedloss::<name>_fwd_triton`` / ``_bwd_triton`` are defined here as triton_ops
    with the same schemas (torch.compile traces into their kernels, and fakes them by running them on
    fake tensors), running the functions ``<name>_fwd`` / ``<name>_bwd`` of
    fusedloss/triton/<triton_module>.py, with the same autograd: ``backward_with(bwd_op)`` is the
    backward that calls the kind's gradient op (it returns the gradients of the leading inputs; the rest
    are None). A gradient op has no double backward. ``grad_of``: a forward without a gradient op of its own takes
    that pair's (focal_loss's backward is cross_entropy_bwd with a row factor). A pair with no C++ ops
    (Triton only) needs no fakes.
    """

    def __init__(self, name: str, *, fwd_schema: str, setup_context: Callable, backward_with: Callable,
                 triton_module: str, fwd_fake: Callable | None = None, bwd_schema: str | None = None,
                 bwd_fake: Callable | None = None, grad_of: "KernelPair | None" = None, label: str | None = None,
                 cpp_autograd: bool = False) -> None:
        self.name = name
        self.label = label or name
        self.fwd_schema, self.bwd_schema = fwd_schema, bwd_schema
        grads = grad_of if grad_of is not None else self
        n_inputs = _arity(fwd_schema)
        self._ops: dict[str, tuple] = {}
        if _backend.extension_loaded() and hasattr(torch.ops.fusedloss, f"{name}_fwd"):
            if fwd_fake is None or (bwd_schema is not None and bwd_fake is None):
                raise TypeError(f"KernelPair {name}: the C++ ops need fwd_fake (and bwd_fake with a bwd_schema)")
            fwd = getattr(torch.ops.fusedloss, f"{name}_fwd").default
            torch.library.register_fake(fwd)(fwd_fake)
            bwd = None
            if bwd_schema is not None:
                bwd = getattr(torch.ops.fusedloss, f"{name}_bwd").default
                torch.library.register_fake(bwd)(bwd_fake)
                torch.library.register_autograd(bwd, no_double_backward(self.label), setup_context=no_context)
            self._ops["cpp"] = (fwd, bwd)
            if not cpp_autograd:
                torch.library.register_autograd(fwd, _padded(backward_with(grads.bwd("cpu")), n_inputs),
                                                setup_context=setup_context)
        if triton_kernels_present(triton_module):
            from torch.library import triton_op

            bwd = None
            if bwd_schema is not None:
                twin = triton_op(f"fusedloss::{name}_bwd_triton",
                                 _typed(_triton_kernel(triton_module, f"{name}_bwd"), bwd_schema), mutates_args={},
                                 schema=bwd_schema)
                twin.register_autograd(no_double_backward(self.label), setup_context=no_context)
                bwd = getattr(torch.ops.fusedloss, f"{name}_bwd_triton").default
            self._ops["triton"] = (None, bwd)
            twin = triton_op(f"fusedloss::{name}_fwd_triton",
                             _typed(_triton_kernel(triton_module, f"{name}_fwd"), fwd_schema), mutates_args={},
                             schema=fwd_schema)
            twin.register_autograd(_padded(backward_with(grads.bwd("triton")), n_inputs), setup_context=setup_context)
            self._ops["triton"] = (getattr(torch.ops.fusedloss, f"{name}_fwd_triton").default, bwd)
        cpp = self._ops.get("cpp")
        self._fwd_direct = direct_call(f"{name}_fwd", cpp[0]) if cpp is not None else None

    def _kind(self, backend: str) -> tuple:
        if backend in ("cpu", "cuda"):
            if "cpp" not in self._ops:
                raise RuntimeError(f"fusedloss: the compiled extension holds no {self.label} kernels (it was "
                                   "built before them, or did not load: rebuild it)")
            return self._ops["cpp"]
        if backend == "triton":
            if "triton" not in self._ops:
                raise RuntimeError(f"fusedloss: the Triton {self.label} kernels are not available in this install")
            return self._ops["triton"]
        raise ValueError(f"no {self.label} kernel op for backend {backend!r}")

    def present(self, kind: str) -> bool:
        """True when the ``kind`` ("cpp" or "triton") kernels are registered."""
        return kind in self._ops

    def fwd(self, backend: str):
        """The forward op (an OpOverload, with autograd) that runs ``backend``'s kernels."""
        return self._kind(backend)[0]

    def bwd(self, backend: str):
        """The gradient op of ``backend`` (the chunked linear ops call it directly)."""
        op = self._kind(backend)[1]
        if op is None:
            raise ValueError(f"{self.label} has no gradient op of its own")
        return op

    def call(self, backend: str):
        """:meth:`fwd`, or in eager mode for the C++ op the cheaper direct call (see KernelOp.call)."""
        op = self.fwd(backend)
        if self._fwd_direct is not None and op is self._ops["cpp"][0] and eager_dispatch(op):
            return self._fwd_direct
        return op
