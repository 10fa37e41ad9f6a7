"""SigLIP's sigmoid pairwise loss op: its whole contract with PyTorch.

- ``fusedloss::siglip_fwd`` / ``_bwd``: schemas and CPU kernels in csrc/cpu/siglip.cpp, CUDA kernels in
  csrc/cuda/siglip.cu; their fake (meta) kernels are registered here.
- ``fusedloss::siglip_fwd_triton`` / ``_bwd_triton``: the Triton kernels (fusedloss/triton/siglip.py) as
  triton_ops, so that torch.compile traces into them.
- autograd of both forward ops, registered here in Python (the same formula for both): the backward op
  recomputes the tiles of T = Q K^T from the inputs and returns the gradients of query, key, scale and
  bias (csrc/include/fusedloss/siglip_math.h, (1)-(3)).

The forward returns the per-query losses (N,) in the inputs' dtype (float32 or float64: the functional
API converts fp16/bf16 rows first); the reduction is composed with PyTorch ops by the caller
(fusedloss.functional.siglip_loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedloss import _backend
from fusedloss.ops._common import no_context, no_double_backward, triton_kernels_present

FWD = "fusedloss::siglip_fwd"
BWD = "fusedloss::siglip_bwd"


def _fwd_fake(query, key, scale, bias, labels=None):
    return query.new_empty((query.shape[0],))


def _bwd_fake(grad_rows, query, key, scale, bias, labels=None):
    return query.new_empty(query.shape), key.new_empty(key.shape), scale.new_empty(()), bias.new_empty(())


def _setup_context(ctx, inputs, output):
    query, key, scale, bias, labels = inputs
    ctx.save_for_backward(query, key, scale, bias, labels)


def _backward_with(bwd_op):
    def backward(ctx, grad_rows):
        query, key, scale, bias, labels = ctx.saved_tensors
        grad_query, grad_key, grad_scale, grad_bias = bwd_op(grad_rows, query, key, scale, bias, labels)
        return grad_query, grad_key, grad_scale, grad_bias, None

    return backward


def _cpp_ops_present() -> bool:
    # An extension built before this op (an old wheel, a stale in-place build) lacks the schemas.
    return _backend.extension_loaded() and hasattr(torch.ops.fusedloss, "siglip_fwd")


CPP_REGISTERED = False
if _cpp_ops_present():
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_fake(BWD)(_bwd_fake)
    torch.library.register_autograd(FWD, _backward_with(torch.ops.fusedloss.siglip_bwd.default),
                                    setup_context=_setup_context)
    torch.library.register_autograd(BWD, no_double_backward("siglip_loss"), setup_context=no_context)
    CPP_REGISTERED = True

TRITON_REGISTERED = False
if triton_kernels_present("siglip"):
    from torch.library import triton_op

    @triton_op("fusedloss::siglip_fwd_triton", mutates_args={})
    def siglip_fwd_triton(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
                          labels: Tensor | None = None) -> Tensor:
        from fusedloss.triton import siglip as kernels

        return kernels.siglip_fwd(query, key, scale, bias, labels)

    @triton_op("fusedloss::siglip_bwd_triton", mutates_args={})
    def siglip_bwd_triton(grad_rows: Tensor, query: Tensor, key: Tensor, scale: Tensor, bias: Tensor,
                          labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from fusedloss.triton import siglip as kernels

        return kernels.siglip_bwd(grad_rows, query, key, scale, bias, labels)

    siglip_fwd_triton.register_autograd(_backward_with(torch.ops.fusedloss.siglip_bwd_triton.default),
                                        setup_context=_setup_context)
    siglip_bwd_triton.register_autograd(no_double_backward("siglip_loss"), setup_context=no_context)
    TRITON_REGISTERED = True


def forward_op(backend: str):
    """The forward op (an OpOverload, with autograd) that runs ``backend``'s kernels."""
    if backend in ("cpu", "cuda"):
        if not CPP_REGISTERED:
            raise RuntimeError("fusedloss: the compiled extension holds no siglip op (it was built before "
                               "siglip_loss existed: rebuild it)")
        return torch.ops.fusedloss.siglip_fwd.default
    if backend == "triton":
        if not TRITON_REGISTERED:
            raise RuntimeError("fusedloss: the Triton siglip kernels are not available in this install "
                               "(fusedloss/triton/siglip.py is missing)")
        return torch.ops.fusedloss.siglip_fwd_triton.default
    raise ValueError(f"no siglip kernel op for backend {backend!r}")
