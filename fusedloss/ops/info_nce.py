"""InfoNCE's tiled log-sum-exp op: its whole contract with PyTorch.

- ``KERNELS``: ``fusedloss::info_nce_lse_fwd`` / ``_bwd`` (schemas in csrc/registration.cpp, CPU and
  CUDA kernels in csrc/) and their Triton twins, a :class:`fusedloss.ops._registry.KernelPair`.
- ``fusedloss::info_nce_fwd_grad`` (CPU): a reduced one-direction loss's sum with its gradients made in
  the same pass (csrc/cpu/info_nce.cpp), autograd in C++.
- autograd of the forward ops (the C++ one's in csrc/autograd.cpp, the Triton one's here, the same
  formula): the backward op recomputes the tiles of S = scale * Q K^T from the inputs and the saved
  per-row / per-column lse, and returns the gradients of query, key and scale.

The forward returns lse_rows (N,), lse_cols (M,) (``(0,)`` without cols) and the positive logits
pos (N,) = S[i, labels_i] (labels None: S[i, i]; with key_groups the mean of S[i, j] over the keys j
whose group is labels_i), all in the accumulation dtype (float32; float64 for float64 inputs), and
npos (N,) int64, each query's number of positives (0: pos is NaN). The positives are the kernel's,
so that the backward cancels a one-hot row's gradient element by element (info_nce_math.h, (3')); the
loss ``lse - pos`` and its reduction are composed with PyTorch ops by the caller
(fusedloss.functional.info_nce).

- ``NORMED``: ``fusedloss::info_nce_lse_normed_fwd_triton`` / ``_bwd_triton`` (Triton only), the same of the
  L2-normalized rows without normalized copies: the kernels take the rows as they are (16-bit ones go
  to the tensor cores) with their norms, which the forward returns as two more outputs
  (query_norm (N,), key_norm (M,), accumulation dtype) for the backward; the backward returns the raw
  rows' gradients through the normalization. On CPU and CUDA tensors the caller normalizes first.
"""

from __future__ import annotations

import torch

from fusedloss import _backend
from fusedloss.ops import _registry
from fusedloss.ops._common import acc_dtype
from fusedloss.ops._registry import direct_call, eager_dispatch

# The forward of a reduced loss with its gradients (CPU kernel, C++ autograd; csrc/cpu/info_nce.cpp).
FWD_GRAD = "fusedloss::info_nce_fwd_grad"


def _fwd_fake(query, key, scale, cols, labels=None, key_groups=None):
    acc = acc_dtype(query.dtype)
    n = query.shape[0]
    return (query.new_empty((n,), dtype=acc), query.new_empty((key.shape[0] if cols else 0,), dtype=acc),
            query.new_empty((n,), dtype=acc), query.new_empty((n,), dtype=torch.int64))


def _bwd_fake(grad_rows, grad_cols, grad_pos, query, key, scale, lse_rows, lse_cols, pos, npos, labels=None,
              key_groups=None):
    # d scale has scale's dtype (the accumulation dtype, or float64 when the caller wants it exact)
    return query.new_empty(query.shape), key.new_empty(key.shape), query.new_empty((), dtype=scale.dtype)


def _fwd_grad_fake(query, key, scale, labels=None, key_groups=None, query_grad=True, key_grad=True,
                   scale_grad=True):
    acc = acc_dtype(query.dtype)
    n, m, d = query.shape[0], key.shape[0], query.shape[1]
    return (query.new_empty((), dtype=acc), query.new_empty((n,), dtype=torch.int64),
            query.new_empty((n, d) if query_grad else (0,)), key.new_empty((m, d) if key_grad else (0,)),
            query.new_empty((), dtype=scale.dtype))


def _setup_context(ctx, inputs, output):
    # Both pairs: NORMED's forward returns the rows' norms after npos, and its backward takes them after
    # query and key.
    query, key, scale, cols, labels, key_groups = inputs
    lse_rows, lse_cols, pos, npos, *norms = output
    ctx.save_for_backward(query, key, *norms, scale, lse_rows, lse_cols, pos, npos, labels, key_groups)
    ctx.cols = cols
    ctx.mark_non_differentiable(npos, *norms)


def _backward_with(bwd_op):
    def backward(ctx, grad_rows, grad_cols, grad_pos, _grad_npos, *_grad_norms):
        *rows, scale, lse_rows, lse_cols, pos, npos, labels, key_groups = ctx.saved_tensors
        if grad_rows is None:  # only lse_cols or pos was used
            grad_rows = lse_rows.new_zeros(lse_rows.shape)
        if not ctx.cols:
            grad_cols = None
        grad_query, grad_key, grad_scale = bwd_op(grad_rows, grad_cols, grad_pos, *rows, scale, lse_rows,
                                                  lse_cols if grad_cols is not None else None, pos, npos, labels,
                                                  key_groups)
        return grad_query, grad_key, grad_scale

    return backward


# The forward's autograd on CPU and CUDA tensors is in C++ (csrc/autograd.cpp, the same formula as
# _backward_with): no Python runs between the functional API and the kernels.
KERNELS = _registry.KernelPair(
    "info_nce_lse",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, bool cols, Tensor? labels=None, Tensor? key_groups=None) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_rows, Tensor? grad_cols, Tensor? grad_pos, Tensor query, Tensor key, Tensor scale, "
               "Tensor lse_rows, Tensor? lse_cols, Tensor pos, Tensor npos, Tensor? labels=None, "
               "Tensor? key_groups=None) -> (Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward_with=_backward_with,
    triton_module="info_nce", label="info_nce", cpp_autograd=True)

if _backend.extension_loaded() and hasattr(torch.ops.fusedloss, "info_nce_fwd_grad"):
    torch.library.register_fake(FWD_GRAD)(_fwd_grad_fake)


_FWD_GRAD_DIRECT = (direct_call("info_nce_fwd_grad", torch.ops.fusedloss.info_nce_fwd_grad.default)
                    if _backend.extension_loaded() and hasattr(torch.ops.fusedloss, "info_nce_fwd_grad") else None)


def fused_grad_call():
    """The CPU op that returns a reduced loss's sum with its gradients made in the forward
    (``fusedloss::info_nce_fwd_grad``: query, key, scale, labels, key_groups, query_grad, key_grad,
    scale_grad -> total, npos, ...); None when the extension predates it."""
    if not _backend.extension_loaded() or not hasattr(torch.ops.fusedloss, "info_nce_fwd_grad"):
        return None
    op = torch.ops.fusedloss.info_nce_fwd_grad.default
    if _FWD_GRAD_DIRECT is not None and eager_dispatch(op):
        return _FWD_GRAD_DIRECT
    return op


NORMED = _registry.KernelPair(
    "info_nce_lse_normed",
    fwd_schema="(Tensor query, Tensor key, Tensor scale, bool cols, Tensor? labels=None, Tensor? key_groups=None) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_rows, Tensor? grad_cols, Tensor? grad_pos, Tensor query, Tensor key, Tensor query_norm, "
               "Tensor key_norm, Tensor scale, Tensor lse_rows, Tensor? lse_cols, Tensor pos, Tensor npos, "
               "Tensor? labels=None, Tensor? key_groups=None) -> (Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward_with=_backward_with, triton_module="info_nce",
    label="info_nce (normalized rows)")
