"""SigLIP's sigmoid pairwise loss op: its whole contract with PyTorch.

- ``KERNELS``: ``fusedloss::siglip_fwd`` / ``_bwd`` (schemas and CPU kernels in csrc/cpu/siglip.cpp,
  CUDA kernels in csrc/cuda/siglip.cu) and their Triton twins (fusedloss/triton/siglip.py), registered
  by :class:`fusedloss.ops._registry.KernelPair`.
- autograd of both forward ops, in Python (the same formula for both): the backward op
  recomputes the tiles of T = Q K^T from the inputs and returns the gradients of query, key, scale and
  bias (csrc/include/fusedloss/siglip_math.h, (1)-(3)).

The forward returns the per-query losses (N,) in the inputs' dtype (float32 or float64: the functional
API converts fp16/bf16 rows first); the reduction is composed with PyTorch ops by the caller
(fusedloss.functional.siglip_loss).

- ``ROWS``: ``fusedloss::siglip_rows_fwd_triton`` / ``_bwd_triton`` (Triton only), the functional's path for
  fp16/bf16 rows: the rows as they are (tensor-core tiles), the loss in the accumulation dtype, and with
  ``normalize`` the L2 normalization inside the kernels (the forward also returns the rows' norms for
  the backward, (0,) each without it; the backward returns the gradients through it).
"""

from __future__ import annotations

from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype


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
        return grad_query, grad_key, grad_scale, grad_bias

    return backward


KERNELS = _registry.KernelPair(
    "siglip",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) -> Tensor",
    bwd_schema="(Tensor grad_rows, Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="siglip", label="siglip_loss")


def _rows_fwd_fake(query, key, scale, bias, normalize, labels=None):
    acc = acc_dtype(query.dtype)
    return (query.new_empty((query.shape[0],), dtype=acc),
            query.new_empty((query.shape[0] if normalize else 0,), dtype=acc),
            key.new_empty((key.shape[0] if normalize else 0,), dtype=acc))


def _rows_bwd_fake(grad_rows, query, key, query_norm, key_norm, scale, bias, normalize, labels=None):
    return query.new_empty(query.shape), key.new_empty(key.shape), scale.new_empty(()), bias.new_empty(())


def _rows_setup_context(ctx, inputs, output):
    query, key, scale, bias, normalize, labels = inputs
    _, query_norm, key_norm = output
    ctx.save_for_backward(query, key, query_norm, key_norm, scale, bias, labels)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(query_norm, key_norm)


def _rows_backward_with(bwd_op):
    def backward(ctx, grad_rows, _grad_query_norm, _grad_key_norm):
        query, key, query_norm, key_norm, scale, bias, labels = ctx.saved_tensors
        return bwd_op(grad_rows, query, key, query_norm, key_norm, scale, bias, ctx.normalize, labels)

    return backward


ROWS = _registry.KernelPair(
    "siglip_rows",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, Tensor bias, bool normalize, Tensor? labels=None) "
               "-> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_rows, Tensor query, Tensor key, Tensor query_norm, Tensor key_norm, Tensor scale, "
               "Tensor bias, bool normalize, Tensor? labels=None) -> (Tensor, Tensor, Tensor, Tensor)",
    fwd_fake=_rows_fwd_fake, bwd_fake=_rows_bwd_fake, setup_context=_rows_setup_context,
    backward_with=_rows_backward_with, triton_module="siglip", label="siglip_loss (rows as they are)")
