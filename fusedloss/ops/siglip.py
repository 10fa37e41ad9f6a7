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


def _fwd_fake(query, key, scale, bias, labels=None):
    return query.new_empty((query.shape[0],))


def _bwd_fake(grad_rows, query, key, scale, bias, labels=None):
    return query.new_empty(query.shape), key.new_empty(key.shape), scale.new_empty(()), bias.new_empty(())


def _setup_context(ctx, inputs, output):
    # Both pairs: ROWS has the flag normalize before labels, returns the rows' norms after the loss, and
    # its backward takes them after query and key.
    query, key, scale, bias, *flags, labels = inputs
    norms = output[1:] if isinstance(output, tuple) else ()
    ctx.save_for_backward(query, key, *norms, scale, bias, labels)
    ctx.flags = flags
    ctx.mark_non_differentiable(*norms)


def _backward_with(bwd_op):
    def backward(ctx, grad_rows, *_grad_norms):
        *rows, scale, bias, labels = ctx.saved_tensors
        grad_query, grad_key, grad_scale, grad_bias = bwd_op(grad_rows, *rows, scale, bias, *ctx.flags, labels)
        return grad_query, grad_key, grad_scale, grad_bias

    return backward


KERNELS = _registry.KernelPair(
    "siglip",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) -> Tensor",
    bwd_schema="(Tensor grad_rows, Tensor query, Tensor key, Tensor scale, Tensor bias, Tensor? labels=None) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="siglip", label="siglip_loss")


ROWS = _registry.KernelPair(
    "siglip_rows",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, Tensor bias, bool normalize, Tensor? labels=None) "
               "-> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_rows, Tensor query, Tensor key, Tensor query_norm, Tensor key_norm, Tensor scale, "
               "Tensor bias, bool normalize, Tensor? labels=None) -> (Tensor, Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward_with=_backward_with, triton_module="siglip",
    label="siglip_loss (rows as they are)")
