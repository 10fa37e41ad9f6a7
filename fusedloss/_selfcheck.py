"""``python -m fusedloss check``: every op on every available backend against the float64 reference.

Each case draws fresh random inputs, rounds them to the checked dtype, runs the op on a backend and
``fusedloss.reference`` in float64 on the same rounded inputs, and compares every output and the
gradient of every differentiable input (through a random upstream gradient, so that a wrong scale
shows). A case fails on an error beyond tolerance, a wrong output dtype, a wrong gradient dtype, or
an exception.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedloss
from fusedloss import _backend, functional, reference

try:  # progress bars are optional
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

# (rtol, atol) per dtype, elementwise |actual - expected| <= atol + rtol * |expected|, against the
# float64 reference on the same (rounded) inputs. The loss is accumulated and returned in float32
# for every low-precision dtype. For gradients, atol is relative to max|expected gradient| (a
# mean-reduced gradient is O(1/N), so a fixed atol would mean nothing); its rtol covers the rounding
# of the gradient to the input dtype. tests/ holds the stricter table the test-suite uses; where an
# op's gradient is a long sum or a difference of large parts, the op adds the bound derived in its
# tests (see _lce_bounds and _nce_bounds).
CHECK_TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"loss": (1e-3, 1e-3), "grad": (1.6e-2, 2e-2)},
    torch.float16: {"loss": (1e-3, 1e-3), "grad": (2e-3, 1e-3)},
}
CHECK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP16_SUBNORMAL_ATOL = 2**-25  # half of float16's smallest subnormal step, as tests/conftest.py's table


@dataclass
class Problem:
    """One case's inputs: ``leaves`` get gradients; ``run(fn, leaves, ref)`` calls the op (``ref``: the
    float64 reference, whose constants are then cast to float64 too) and returns its outputs as a tuple.
    ``bounds(ref_leaves, upstreams)``, when given, returns extra absolute tolerance per leaf."""

    leaves: dict[str, Tensor]
    run: Callable[[Callable, dict[str, Tensor], bool], tuple[Tensor, ...]]
    bounds: Callable[[dict[str, Tensor], list[Tensor]], dict[str, Tensor | float]] | None = None


@dataclass
class OpCheck:
    name: str
    shapes: list[tuple]
    shapes_interpreted: list[tuple]  # Triton on CPU tensors: its interpreter takes ~30 ms a program
    options: list[tuple[str, dict, str]]  # (label, options, reduction)
    make: Callable[..., Problem]  # (shape, opts, reduction, dtype, device, gen) -> Problem

    def fused(self) -> Callable | None:
        return getattr(functional, self.name, None)

    def reference(self) -> Callable | None:
        return getattr(reference, self.name, None)


def _randn(shape, gen, scale=1.0) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def _leaf(t: Tensor, dtype: torch.dtype, device: str, noncontig: bool = False) -> Tensor:
    """``t`` rounded to ``dtype`` on ``device``; ``noncontig``: stored transposed (2-D) or strided (1-D)."""
    t = t.to(dtype)
    if noncontig and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().to(device).transpose(0, 1)
    if noncontig and t.dim() == 1:
        return torch.stack([t, t], 1).to(device)[:, 0]
    return t.to(device)


def _targets(shape, C: int, gen, ignore: int | None) -> Tensor:
    target = torch.randint(0, C, shape, generator=gen)
    if ignore is not None and target.numel():
        mask = torch.rand(shape, generator=gen) < 0.25
        mask.view(-1)[0] = False  # at least one element counts in the mean
        target = torch.where(mask, torch.full_like(target, ignore), target)
        if ignore >= 0:
            target.view(-1)[0] = (ignore + 1) % C
    return target


def _class_weight(C: int, gen, device) -> Tensor:
    return (torch.rand(C, generator=gen) * 1.5 + 0.25).to(device)


def _token_weight(shape, gen, device) -> Tensor:
    return (torch.rand(shape, generator=gen) * 2).to(device)


def _w(weight: Tensor | None, ref: bool) -> Tensor | None:
    return None if weight is None else (weight.double() if ref else weight)


# ----------------------------------------------------------------------------------------------
# cross_entropy and focal_loss: (N, C), (N, C, d) or (C,) logits
# ----------------------------------------------------------------------------------------------
def _make_ce(shape, opts, reduction, dtype, device, gen) -> Problem:
    C = shape[1] if len(shape) > 1 else shape[0]
    x = _leaf(_randn(shape, gen, 3.0), dtype, device, opts.get("noncontig", False))
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = _targets(target_shape, C, gen, opts.get("ignore")).to(device)
    weight = _class_weight(C, gen, device) if opts.get("weight") else None
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap", "temperature", "return_lse", "return_logprob",
                               "return_entropy") if k in opts}
    if opts.get("ignore") is not None:
        kw["ignore_index"] = opts["ignore"]
    if opts.get("token_weight"):
        kw["token_weight"] = _token_weight(target_shape, gen, device)

    def run(fn, leaves, ref):
        out = fn(leaves["input"], target, _w(weight, ref), reduction=reduction, **kw)
        return out if isinstance(out, tuple) else (out,)

    return Problem({"input": x}, run)


CE_OPTIONS_ALL = dict(weight=True, ignore=-100, label_smoothing=0.1, z_loss=1e-2, softcap=10.0, temperature=1.5,
                      return_lse=True)
CE_OPTIONS = [
    ("plain", {}, "mean"),
    ("plain", {}, "sum"),
    ("plain", {}, "none"),
    ("weight", {"weight": True}, "mean"),
    ("ignore_index=-100", {"ignore": -100}, "mean"),
    ("weight ignore_index=2", {"weight": True, "ignore": 2}, "mean"),
    ("label_smoothing=0.1", {"label_smoothing": 0.1}, "mean"),
    ("label_smoothing=0.2 weight", {"label_smoothing": 0.2, "weight": True}, "none"),
    ("z_loss=1e-2", {"z_loss": 1e-2}, "mean"),
    ("softcap=4", {"softcap": 4.0}, "mean"),
    ("temperature=0.7", {"temperature": 0.7}, "sum"),
    ("non-contiguous", {"noncontig": True}, "mean"),
    ("token_weight weight", {"token_weight": True, "weight": True, "ignore": -100}, "mean"),
    ("token_weight", {"token_weight": True}, "none"),
    ("logprob + entropy", {"return_logprob": True, "return_entropy": True, "weight": True, "ignore": -100,
                           "softcap": 4.0}, "mean"),
    ("all + lse", CE_OPTIONS_ALL, "mean"),
    ("all + lse", CE_OPTIONS_ALL, "none"),
]


def _make_focal(shape, opts, reduction, dtype, device, gen) -> Problem:
    C = shape[1] if len(shape) > 1 else shape[0]
    x = _leaf(_randn(shape, gen, 3.0), dtype, device, opts.get("noncontig", False))
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = _targets(target_shape, C, gen, opts.get("ignore")).to(device)
    weight = _class_weight(C, gen, device) if opts.get("weight") else None
    alpha = opts.get("alpha")
    if alpha == "tensor":
        alpha = (torch.rand(C, generator=gen) * 0.9 + 0.1).to(device)
    kw = {"gamma": opts.get("gamma", 2.0)}
    if opts.get("ignore") is not None:
        kw["ignore_index"] = opts["ignore"]
    if opts.get("token_weight"):
        kw["token_weight"] = _token_weight(target_shape, gen, device)

    def run(fn, leaves, ref):
        a = alpha.double() if ref and isinstance(alpha, Tensor) else alpha
        return (fn(leaves["input"], target, alpha=a, weight=_w(weight, ref), reduction=reduction, **kw),)

    return Problem({"input": x}, run)


FOCAL_OPTIONS = [
    ("gamma=2", {}, "mean"),
    ("gamma=2", {}, "sum"),
    ("gamma=2", {}, "none"),
    ("gamma=0 (cross-entropy)", {"gamma": 0.0}, "mean"),
    ("gamma=0.5 alpha=0.25", {"gamma": 0.5, "alpha": 0.25}, "mean"),
    ("gamma=3 alpha[C] weight", {"gamma": 3.0, "alpha": "tensor", "weight": True}, "mean"),
    ("ignore_index=-100 weight", {"ignore": -100, "weight": True}, "none"),
    ("non-contiguous", {"noncontig": True}, "mean"),
    ("token_weight weight", {"token_weight": True, "weight": True, "ignore": -100}, "mean"),
]
CE_SHAPES = [(37, 7), (3, 7, 5), (64, 1023), (6, 50257)]


def _make_soft_ce(shape, opts, reduction, dtype, device, gen) -> Problem:
    """cross_entropy with probability targets of the input's shape: softmax rows with about a fifth of
    the probabilities 0 (rows summing to 3 with ``unnormalized``); the target gets a gradient too."""
    cdim = 1 if len(shape) > 1 else 0
    C = shape[cdim]
    x = _leaf(_randn(shape, gen, 3.0), dtype, device, opts.get("noncontig", False))
    p = torch.softmax(_randn(shape, gen, 2.0), cdim)
    p = torch.where(torch.rand(shape, generator=gen) < 0.2, torch.zeros_like(p), p) * opts.get("unnormalized", 1.0)
    t = _leaf(p, dtype, device, opts.get("noncontig", False))
    weight = _class_weight(C, gen, device) if opts.get("weight") else None
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap", "temperature", "return_lse", "return_entropy")
          if k in opts}
    if opts.get("token_weight"):
        kw["token_weight"] = _token_weight(shape[:cdim] + shape[cdim + 1:], gen, device)

    def run(fn, leaves, ref):
        out = fn(leaves["input"], leaves["target"], _w(weight, ref), reduction=reduction, **kw)
        return out if isinstance(out, tuple) else (out,)

    return Problem({"input": x, "target": t}, run)


SOFT_CE_OPTIONS = [
    ("probabilities", {}, "mean"),
    ("probabilities", {}, "sum"),
    ("probabilities", {}, "none"),
    ("weight label_smoothing=0.1", {"weight": True, "label_smoothing": 0.1}, "mean"),
    ("sum 3, z_loss softcap temperature + lse", {"unnormalized": 3.0, "z_loss": 1e-2, "softcap": 10.0,
                                                 "temperature": 1.5, "return_lse": True}, "none"),
    ("non-contiguous", {"noncontig": True}, "mean"),
    ("token_weight weight", {"token_weight": True, "weight": True}, "mean"),
    ("entropy + lse, weight label_smoothing softcap", {"return_entropy": True, "return_lse": True, "weight": True,
                                                       "label_smoothing": 0.1, "softcap": 10.0}, "mean"),
]
CE_SHAPES_INTERPRETED = [(3, 7), (2, 7, 2), (2, 1023)]


# ----------------------------------------------------------------------------------------------
# gap_loss: (N, C) or (C,)
# ----------------------------------------------------------------------------------------------
def _make_gap(shape, opts, reduction, dtype, device, gen) -> Problem:
    C = shape[-1]
    x = _leaf(_randn(shape, gen, 1.0), dtype, device, opts.get("noncontig", False))
    target = _targets(shape[:-1], C, gen, opts.get("ignore")).to(device)
    weight = _class_weight(C, gen, device) if opts.get("weight") else None
    kw = {k: opts[k] for k in ("p", "class_normalize", "mode") if k in opts}
    if opts.get("ignore") is not None:
        kw["ignore_index"] = opts["ignore"]

    def run(fn, leaves, ref):
        return (fn(leaves["input"], target, opts.get("margin", 0.5), weight=_w(weight, ref), reduction=reduction,
                   **kw),)

    return Problem({"input": x}, run)


GAP_OPTIONS = [
    ("margin=0.5", {}, "mean"),
    ("margin=0.5", {}, "sum"),
    ("margin=0.5", {}, "none"),
    ("p=2", {"p": 2}, "mean"),
    ("margin=1 weight", {"margin": 1.0, "weight": True}, "mean"),
    ("ignore_index=-100", {"ignore": -100}, "mean"),
    ("class_normalize p=2", {"class_normalize": True, "p": 2}, "sum"),
    ("mode=max", {"mode": "max"}, "mean"),
    ("mode=max margin=-0.3 weight", {"mode": "max", "margin": -0.3, "weight": True}, "none"),
    ("non-contiguous", {"noncontig": True}, "mean"),
]
GAP_SHAPES = [(37, 7), (64, 1023), (7,), (6, 5000)]
GAP_SHAPES_INTERPRETED = [(3, 7), (2, 1023), (7,)]


# ----------------------------------------------------------------------------------------------
# info_nce: query (N, D), key (M, D)
# ----------------------------------------------------------------------------------------------
def _nce_bounds(q, k, temperature, ups, reduction, symmetric, normalize, dtype, learnable):
    """Extra atol for the gradients of query and key: each row's gradient is scale * (sum_j P_ij k_j -
    k_{label}), a difference of two parts whose error is that of the parts, so its atol is taken
    relative to the larger part (as tests/test_info_nce.py derives). For a learnable temperature,
    dL/dt sums N * M cancelling terms: its error is bounded by the loss's rtol times the sum of the
    terms' magnitudes, sum_i |w_i| * 2 max|q.k| * scale^2."""
    q64, k64 = q.detach().double(), k.detach().double()
    qn = (F.normalize(q64, dim=1) if normalize else q64).requires_grad_()
    kn = (F.normalize(k64, dim=1) if normalize else k64).requires_grad_()
    t = float(temperature) if isinstance(temperature, Tensor) else temperature
    logits = qn @ kn.T / t
    lse = torch.logsumexp(logits, 1)
    if symmetric:
        lse = 0.5 * (lse + torch.logsumexp(logits, 0))
    up = ups[0].double()
    total = (lse * up).sum() if reduction == "none" else (lse.sum() if reduction == "sum" else lse.mean()) * up
    gq, gk = torch.autograd.grad(total, (qn, kn))
    if normalize:
        gq = gq / q64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gk = gk / k64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    atol = CHECK_TOL[dtype]["grad"][1]
    out = {"query": atol * float(gq.abs().max()), "key": atol * float(gk.abs().max())}
    if learnable:
        n = q.shape[0]
        w_sum = float(up.abs().sum()) if reduction == "none" else float(up.abs()) * (n if reduction == "sum" else 1.0)
        max_t = float(qn.detach().norm(dim=1).max() * kn.detach().norm(dim=1).max())
        rtol, l_atol = CHECK_TOL[dtype]["loss"]
        out["temperature"] = rtol * (1.0 / t) ** 2 * w_sum * 2 * max_t + l_atol
    return out


def _make_nce(shape, opts, reduction, dtype, device, gen) -> Problem:
    N, M, D = shape
    if opts.get("symmetric"):
        M = N
    normalize = opts.get("normalize", True)
    s = 1.0 if normalize else 0.6 / math.sqrt(D)  # unnormalized: dot products / temperature of a few units
    q = _leaf(_randn((N, D), gen, s), dtype, device, opts.get("noncontig", False))
    k = _leaf(_randn((M, D), gen, s), dtype, device)
    labels = torch.randint(0, M, (N,), generator=gen).to(device) if opts.get("labels") else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {"query": q, "key": k}
    temperature: float | Tensor = 0.07
    if opts.get("learnable"):
        temperature = torch.tensor(0.1, dtype=acc, device=device)
        leaves["temperature"] = temperature
    kw = {"normalize": normalize, "symmetric": opts.get("symmetric", False)}
    if opts.get("groups"):  # several positives per query; some queries without one
        kw["key_groups"] = torch.randint(0, 4, (M,), generator=gen).to(device)
        kw["query_groups"] = torch.randint(0, 5, (N,), generator=gen).to(device)

    def run(fn, leaves, ref):
        t = leaves.get("temperature", temperature)
        return (fn(leaves["query"], leaves["key"], labels, temperature=t, reduction=reduction, **kw),)

    def bounds(ref_leaves, ups):
        return _nce_bounds(q, k, temperature, ups, reduction, kw["symmetric"], normalize, dtype,
                           "temperature" in leaves)

    return Problem(leaves, run, bounds)


NCE_OPTIONS = [
    ("t=0.07", {}, "mean"),
    ("t=0.07", {}, "sum"),
    ("t=0.07", {}, "none"),
    ("unnormalized", {"normalize": False}, "mean"),
    ("symmetric", {"symmetric": True}, "mean"),
    ("symmetric", {"symmetric": True}, "none"),
    ("labels", {"labels": True}, "mean"),
    ("groups", {"groups": True}, "mean"),
    ("groups learnable temperature", {"groups": True, "learnable": True}, "none"),
    ("learnable temperature", {"learnable": True}, "mean"),
    ("learnable temperature symmetric", {"learnable": True, "symmetric": True}, "sum"),
    ("non-contiguous", {"noncontig": True}, "mean"),
]
NCE_SHAPES = [(37, 37, 16), (24, 40, 33), (64, 64, 64)]
NCE_SHAPES_INTERPRETED = [(3, 3, 16), (2, 5, 8)]


# ----------------------------------------------------------------------------------------------
# siglip_loss: query (N, D), key (M, D)
# ----------------------------------------------------------------------------------------------
def _siglip_bounds(q, k, t, b, labels, ups, reduction, normalize, dtype, learnable):
    """Extra atol: for query and key, through F.normalize a row's gradient is the gradient of its unit
    row minus the radial part, so its error scales with the former (divided by the norm); the
    temperature's and the bias's gradients sum N * M terms of both signs, each with the loss's accuracy:
    the loss's rtol times sum |G_ij T_ij| (sum |G_ij| for the bias), G = dL/dz."""
    q64, k64 = q.detach().double().cpu(), k.detach().double().cpu()
    qn = (F.normalize(q64, dim=1) if normalize else q64).requires_grad_()
    kn = (F.normalize(k64, dim=1) if normalize else k64).requires_grad_()
    dots = qn @ kn.T
    z = t * dots + b
    n = dots.shape[0]
    target = torch.arange(n) if labels is None else labels.cpu()
    rows = -F.logsigmoid((2 * F.one_hot(target, dots.shape[1]).double() - 1) * z).sum(1)
    up = ups[0].double().cpu()
    total = (rows * up).sum() if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean()) * up
    gz, gq, gk = torch.autograd.grad(total, (z, qn, kn))
    atol = CHECK_TOL[dtype]["grad"][1]
    out = {}
    if normalize:
        out["query"] = atol * float((gq / q64.norm(dim=1, keepdim=True).clamp_min(1e-12)).abs().max())
        out["key"] = atol * float((gk / k64.norm(dim=1, keepdim=True).clamp_min(1e-12)).abs().max())
    if learnable:
        rtol, l_atol = CHECK_TOL[dtype]["loss"]
        out["temperature"] = rtol * float((gz * dots.detach()).abs().sum()) + l_atol
        out["bias"] = rtol * float(gz.abs().sum()) + l_atol
    return out


def _make_siglip(shape, opts, reduction, dtype, device, gen) -> Problem:
    N, M, D = shape
    normalize = opts.get("normalize", True)
    s = 1.0 if normalize else 1.0 / math.sqrt(D)  # unnormalized: dot products of order 1
    q = _leaf(_randn((N, D), gen, s), dtype, device, opts.get("noncontig", False))
    k = _leaf(_randn((M, D), gen, s), dtype, device)
    labels = torch.randint(0, M, (N,), generator=gen).to(device) if opts.get("labels") else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {"query": q, "key": k}
    t, b = 10.0, -10.0  # SigLIP's initialization
    if opts.get("learnable"):
        leaves["temperature"] = torch.tensor(t, dtype=acc, device=device)
        leaves["bias"] = torch.tensor(b, dtype=acc, device=device)

    def run(fn, leaves, ref):
        return (fn(leaves["query"], leaves["key"], temperature=leaves.get("temperature", t),
                   bias=leaves.get("bias", b), normalize=normalize, labels=labels, reduction=reduction),)

    def bounds(ref_leaves, ups):
        return _siglip_bounds(q, k, t, b, labels, ups, reduction, normalize, dtype, "temperature" in leaves)

    return Problem(leaves, run, bounds)


SIGLIP_OPTIONS = [
    ("t=10 b=-10", {}, "mean"),
    ("t=10 b=-10", {}, "sum"),
    ("t=10 b=-10", {}, "none"),
    ("unnormalized", {"normalize": False}, "mean"),
    ("labels", {"labels": True}, "mean"),
    ("learnable temperature and bias", {"learnable": True}, "mean"),
    ("learnable labels", {"learnable": True, "labels": True}, "none"),
    ("non-contiguous", {"noncontig": True}, "mean"),
]
SIGLIP_SHAPES = [(37, 37, 16), (24, 40, 33), (64, 64, 64)]
SIGLIP_SHAPES_INTERPRETED = [(3, 3, 16), (2, 5, 8)]

# ----------------------------------------------------------------------------------------------
# linear_cross_entropy: input (N, D), linear_weight (V, D)
# ----------------------------------------------------------------------------------------------
# Probabilistic bound of a length-K fp32 dot product (Higham & Mary 2019): the error stays below
# LAMBDA * sqrt(K) * u * sum_k |a_k b_k| except with probability about 2K exp(-LAMBDA^2 / 2).
LAMBDA = 8.0
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _lce_bounds(x, W, b, target, weight, kw, reduction, ups, dtype, device):
    """Extra atol of the three gradients, which are sums of products (dX = G W over V terms, dW = G^T X
    and db = sum_i G_i over N terms) with G = dL/dlogits: LAMBDA sqrt(K) u |G| summed against |W| or
    |X| (tests/test_linear_cross_entropy.py derives it). On CUDA, bf16/fp16 inputs also round G to
    the input dtype before the matmuls: u_dtype |G| more per term; so do the fused Triton kernels, also
    under the CPU interpreter (where the cpu backend gets that bound too: the case does not say which)."""
    x64, W64 = x.detach().double(), W.detach().double()
    z = (x64 @ W64.T + (b.detach().double() if b is not None else 0.0)).requires_grad_()
    loss = reference.cross_entropy(z, target, None if weight is None else weight.double(), reduction=reduction, **kw)
    (G,) = torch.autograd.grad((loss * ups[0].double()).sum(), z)
    G = G.abs()
    N, V = G.shape
    u = UNIT_ROUNDOFF[torch.float32]
    EV = LAMBDA * math.sqrt(V) * u * G
    EN = LAMBDA * math.sqrt(max(N, 1)) * u * G
    if (device.startswith("cuda") or _backend.triton_interpret()) and dtype != torch.float32:
        EV = EV + UNIT_ROUNDOFF[dtype] * G + (2.0**-25 if dtype == torch.float16 else 0.0)
        EN = EN + UNIT_ROUNDOFF[dtype] * G + (2.0**-25 if dtype == torch.float16 else 0.0)
    out = {"input": EV @ W64.abs(), "linear_weight": EN.T @ x64.abs()}
    if b is not None:
        out["linear_bias"] = EN.sum(0)
    return out


def _make_lce(shape, opts, reduction, dtype, device, gen) -> Problem:
    N, D, V = shape
    x = _leaf(_randn((N, D), gen), dtype, device)
    # linear_weight rows of norm ~3: logits spread like the cross-entropy checks'; non-contiguous: the
    # (D, V) storage of a tied embedding read as (V, D)
    W = _leaf(_randn((V, D), gen, 3.0 / math.sqrt(D)), dtype, device, opts.get("noncontig", False))
    b = _leaf(_randn((V,), gen), dtype, device) if opts.get("bias") else None
    target = _targets((N,), V, gen, opts.get("ignore")).to(device)
    weight = _class_weight(V, gen, device) if opts.get("weight") else None
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts}
    if opts.get("ignore") is not None:
        kw["ignore_index"] = opts["ignore"]
    if opts.get("token_weight"):
        kw["token_weight"] = _token_weight((N,), gen, device)
    chunk = opts.get("chunk_size")
    leaves = {"input": x, "linear_weight": W}
    if b is not None:
        leaves["linear_bias"] = b

    def run(fn, leaves, ref):
        extra = {} if ref or chunk is None else {"chunk_size": chunk}
        return (fn(leaves["input"], leaves["linear_weight"], target, linear_bias=leaves.get("linear_bias"),
                   weight=_w(weight, ref), reduction=reduction, **kw, **extra),)

    def bounds(ref_leaves, ups):
        return _lce_bounds(x, W, b, target, weight, kw, reduction, ups, dtype, device)

    return Problem(leaves, run, bounds)


LCE_OPTIONS_ALL = {"bias": True, "weight": True, "label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0}
LCE_OPTIONS = [
    ("plain", {}, "mean"),
    ("plain", {}, "sum"),
    ("plain", {}, "none"),
    ("bias", {"bias": True}, "mean"),
    ("weight ignore_index=-100", {"weight": True, "ignore": -100}, "mean"),
    ("label_smoothing=0.1", {"label_smoothing": 0.1}, "mean"),
    ("z_loss=1e-3 softcap=5", {"z_loss": 1e-3, "softcap": 5.0}, "mean"),
    ("chunk_size=16", {"chunk_size": 16}, "sum"),
    ("non-contiguous weight", {"noncontig": True}, "mean"),
    ("token_weight weight", {"token_weight": True, "weight": True, "ignore": -100}, "mean"),
    ("everything", LCE_OPTIONS_ALL, "none"),
]
LCE_SHAPES = [(37, 16, 101), (64, 64, 1023), (9, 32, 5000)]
LCE_SHAPES_INTERPRETED = [(3, 16, 101), (2, 8, 300)]


# ----------------------------------------------------------------------------------------------
# kl_div_logits, jsd_logits: student and teacher (N, C); linear twins: (N, D) inputs, (V, D) heads
# ----------------------------------------------------------------------------------------------
def _make_distill(shape, opts, reduction, dtype, device, gen) -> Problem:
    C = shape[-1]
    s = _leaf(_randn(shape, gen, 2.0), dtype, device, opts.get("noncontig", False))
    t = _leaf(_randn(shape, gen, 2.0), dtype, device)
    target = _targets(shape[:-1], C, gen, -100).to(device)
    kw = {k: opts[k] for k in ("temperature", "beta") if k in opts}

    def run(fn, leaves, ref):
        return (fn(leaves["student"], leaves["teacher"], target, reduction=reduction, **kw),)

    return Problem({"student": s, "teacher": t}, run)


def _linear_distill_bounds(leaves, target, kw, reduction, ups, dtype, jsd):
    """Extra atol of the four gradients, sums of products as linear_cross_entropy's (_lce_bounds): with
    G = dL/dlogits of each head (float64, from the reference on the float64 logits), dX = G W sums V terms
    and dW = G^T X sums N terms in fp32; for 16-bit inputs G is rounded to the input dtype before the
    products and each chunk's product is rounded to it before the fp32 sum (fusedloss/ops/
    linear_kl_div.py): two u_dtype |G| per term more."""
    xs, ws, xt, wt = (leaves[n].detach().double() for n in ("student_input", "student_weight", "teacher_input",
                                                             "teacher_weight"))
    zs, zt = (xs @ ws.T).requires_grad_(), (xt @ wt.T).requires_grad_()
    fn = reference.jsd_logits if jsd else reference.kl_div_logits
    loss = fn(zs, zt, target, reduction=reduction, **{k: v for k, v in kw.items() if k != "chunk_size"})
    out = {}
    for G, x, w, (nx, nw) in zip(torch.autograd.grad((loss * ups[0].double()).sum(), (zs, zt)), (xs, xt), (ws, wt),
                                 (("student_input", "student_weight"), ("teacher_input", "teacher_weight"))):
        G = G.abs()
        N, V = G.shape
        u = UNIT_ROUNDOFF[torch.float32]
        EV = LAMBDA * math.sqrt(V) * u * G
        EN = LAMBDA * math.sqrt(max(N, 1)) * u * G
        if dtype != torch.float32:
            extra = 2 * UNIT_ROUNDOFF[dtype] * G + (2.0**-25 if dtype == torch.float16 else 0.0)
            EV, EN = EV + extra, EN + extra
        out[nx], out[nw] = EV @ w.abs(), EN.T @ x.abs()
    return out


def _make_linear_distill(shape, opts, reduction, dtype, device, gen, jsd=False) -> Problem:
    N, D, V = shape
    leaves = {"student_input": _leaf(_randn((N, D), gen), dtype, device),
              "student_weight": _leaf(_randn((V, D), gen, D**-0.5), dtype, device),
              "teacher_input": _leaf(_randn((N, D), gen), dtype, device),
              "teacher_weight": _leaf(_randn((V, D), gen, D**-0.5), dtype, device)}
    target = _targets((N,), V, gen, -100).to(device)
    kw = {k: opts[k] for k in ("temperature", "beta", "chunk_size") if k in opts}

    def run(fn, leaves, ref):
        call_kw = {k: v for k, v in kw.items() if not (ref and k == "chunk_size")}
        return (fn(leaves["student_input"], leaves["student_weight"], leaves["teacher_input"],
                   leaves["teacher_weight"], target, reduction=reduction, **call_kw),)

    def bounds(ref_leaves, ups):
        return _linear_distill_bounds(leaves, target, kw, reduction, ups, dtype, jsd)

    return Problem(leaves, run, bounds)


KL_OPTIONS = [("T=1", {}, "batchmean"), ("T=2", {"temperature": 2.0}, "sum"), ("T=0.5", {"temperature": 0.5}, "none"),
              ("mean non-contiguous", {"noncontig": True}, "mean")]
JSD_OPTIONS = [("beta=0.5", {}, "batchmean"), ("beta=0.1 T=2", {"beta": 0.1, "temperature": 2.0}, "sum"),
               ("beta=0", {"beta": 0.0}, "none"), ("beta=1", {"beta": 1.0}, "batchmean")]
LINEAR_KL_OPTIONS = [("T=1", {"chunk_size": 16}, "batchmean"), ("T=2", {"temperature": 2.0}, "none")]
LINEAR_JSD_OPTIONS = [("beta=0.5", {"chunk_size": 16}, "batchmean"), ("beta=0.3", {"beta": 0.3}, "sum")]
DISTILL_SHAPES = [(37, 7), (64, 1023), (6, 5000)]
DISTILL_SHAPES_INTERPRETED = [(3, 7), (2, 1023)]
LINEAR_DISTILL_SHAPES = [(37, 16, 101), (9, 32, 5000)]
LINEAR_DISTILL_SHAPES_INTERPRETED = [(3, 16, 101)]


OPS = {
    "cross_entropy": OpCheck("cross_entropy", CE_SHAPES, CE_SHAPES_INTERPRETED, CE_OPTIONS, _make_ce),
    "cross_entropy_probs": OpCheck("cross_entropy", CE_SHAPES, CE_SHAPES_INTERPRETED, SOFT_CE_OPTIONS, _make_soft_ce),
    "gap_loss": OpCheck("gap_loss", GAP_SHAPES, GAP_SHAPES_INTERPRETED, GAP_OPTIONS, _make_gap),
    "info_nce": OpCheck("info_nce", NCE_SHAPES, NCE_SHAPES_INTERPRETED, NCE_OPTIONS, _make_nce),
    "siglip_loss": OpCheck("siglip_loss", SIGLIP_SHAPES, SIGLIP_SHAPES_INTERPRETED, SIGLIP_OPTIONS, _make_siglip),
    "linear_cross_entropy": OpCheck("linear_cross_entropy", LCE_SHAPES, LCE_SHAPES_INTERPRETED, LCE_OPTIONS,
                                    _make_lce),
    "focal_loss": OpCheck("focal_loss", CE_SHAPES, CE_SHAPES_INTERPRETED, FOCAL_OPTIONS, _make_focal),
    "kl_div_logits": OpCheck("kl_div_logits", DISTILL_SHAPES, DISTILL_SHAPES_INTERPRETED, KL_OPTIONS, _make_distill),
    "jsd_logits": OpCheck("jsd_logits", DISTILL_SHAPES, DISTILL_SHAPES_INTERPRETED, JSD_OPTIONS, _make_distill),
    "linear_kl_div": OpCheck("linear_kl_div", LINEAR_DISTILL_SHAPES, LINEAR_DISTILL_SHAPES_INTERPRETED,
                             LINEAR_KL_OPTIONS, _make_linear_distill),
    "linear_jsd": OpCheck("linear_jsd", LINEAR_DISTILL_SHAPES, LINEAR_DISTILL_SHAPES_INTERPRETED,
                          LINEAR_JSD_OPTIONS, functools.partial(_make_linear_distill, jsd=True)),
}


def available_ops() -> list[str]:
    return [name for name, op in OPS.items() if op.fused() is not None and op.reference() is not None]


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------
def _max_err(actual: Tensor, expected: Tensor, rtol: float, atol) -> tuple[float, bool]:
    """(max |a - e|, whether every element is within atol + rtol |e|); NaN/inf positions must agree.
    ``atol`` a float or a tensor of expected's shape."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return float("inf"), False
    finite = torch.isfinite(e)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf"), False
    if a.numel() == 0:
        return 0.0, True
    if isinstance(atol, Tensor):
        atol = atol.detach().double().cpu().expand_as(e)[finite]
    diff = (a - e).abs()[finite]
    if diff.numel() == 0:
        return 0.0, True
    ok = bool((diff <= atol + rtol * e.abs()[finite]).all())
    return float(diff.max()), ok


def _in_range(expected: Tensor, dtype: torch.dtype) -> Tensor:
    """The float64 reference with its elements beyond a 16-bit dtype's range replaced by their rounding
    in that dtype (inf, what a correct kernel writes), so that such an element is compared as inf."""
    if dtype not in (torch.float16, torch.bfloat16):
        return expected
    rounded = expected.to(dtype).to(expected.dtype)
    return torch.where(torch.isfinite(expected) & torch.isinf(rounded), rounded, expected)


def check_case(op: OpCheck, device: str, backend: str, dtype: torch.dtype, shape: tuple, opts: dict,
               reduction: str, gen: torch.Generator, inject: bool = False) -> dict:
    """Run one case; returns {"out": max output error, "grad": max gradient error (relative to the
    gradient's max), "ok", "why"}. ``inject`` perturbs the backend's outputs by 1% before comparing: a
    known failure, to test that failures are reported (``--inject-error``)."""
    row = {"out": None, "grad": None, "ok": False, "why": ""}
    prob = op.make(shape, opts, reduction, dtype, device, gen)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in prob.leaves.items()}
    ref_outs = prob.run(op.reference(), ref_leaves, True)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in ref_outs]
    ref_total = sum((o.double() * u).sum() for o, u in zip(ref_outs, ups))
    ref_grads = torch.autograd.grad(ref_total, list(ref_leaves.values()))
    extra = prob.bounds(ref_leaves, ups) if prob.bounds is not None else {}
    fused = op.fused()
    try:
        leaves = {n: t.detach().clone().requires_grad_() for n, t in prob.leaves.items()}
        outs = prob.run(lambda *a, **k: fused(*a, backend=backend, **k), leaves, False)
        if inject:
            outs = tuple(o * 1.01 + 0.01 for o in outs)
        total = sum((o.double() * u).sum() for o, u in zip(outs, ups))
        grads = torch.autograd.grad(total, list(leaves.values()))
    except Exception as exc:  # noqa: BLE001 - a crash is a failed case, not a crashed command
        text = str(exc).splitlines()[0][:100] if str(exc) else ""
        row["why"] = f"{type(exc).__name__}: {text}"
        return row
    tol = CHECK_TOL[dtype]
    problems = []
    out_err, out_ok = 0.0, True
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        if o.dtype != torch.float32:
            problems.append(f"output {i} dtype {o.dtype}")
        err, ok = _max_err(o, r, *tol["loss"])
        out_err, out_ok = max(out_err, err), out_ok and ok
    grad_err, grad_ok, bad = 0.0, True, []
    for (name, leaf), g, rg in zip(leaves.items(), grads, ref_grads):
        if g.dtype != leaf.dtype:
            problems.append(f"grad {name} dtype {g.dtype}")
        rg = _in_range(rg, dtype)
        finite = rg[torch.isfinite(rg)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        rtol, atol = tol["grad"]
        # a float16 gradient in the subnormal range (a small upstream gradient) rounds to 2^-24 steps
        subnormal = FP16_SUBNORMAL_ATOL if dtype == torch.float16 else 0.0
        err, ok = _max_err(g / scale, rg / scale, rtol, atol + (extra.get(name, 0.0) + subnormal) / scale)
        grad_err = max(grad_err, err)
        if not ok:
            grad_ok = False
            bad.append(name)
    row["out"], row["grad"] = out_err, grad_err
    if not out_ok:
        problems.append("output out of tolerance")
    if not grad_ok:
        problems.append(f"grad {', '.join(bad)} out of tolerance")
    row["ok"] = not problems
    row["why"] = "; ".join(problems)
    return row


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def targets(devices: list[str], backends_filter: list[str] | None) -> list[tuple[str, str]]:
    """(device, backend) pairs to check: every available backend except the reference."""
    pairs = []
    for device in devices:
        for b in fusedloss.backends.available(device):
            if b == "reference" or (backends_filter and b not in backends_filter):
                continue
            pairs.append((device, b))
    return pairs


def plan_cases(ops: list[str], pairs, dtypes, full: bool) -> list[tuple]:
    """Every op x backend x dtype x option; each option on one shape (rotating through the op's
    shapes, so every shape is covered), or on every shape with ``full``."""
    plan = []
    for device, backend in pairs:
        interpreted = backend == "triton" and device == "cpu"
        for name in ops:
            op = OPS[name]
            shapes = op.shapes_interpreted if interpreted else op.shapes
            for dtype in dtypes:
                for i, (label, opts, reduction) in enumerate(op.options):
                    for shape in (shapes if full else [shapes[i % len(shapes)]]):
                        plan.append((device, backend, name, dtype, shape, label, opts, reduction))
    return plan


def run_check(devices: list[str] | None = None, backends: list[str] | None = None,
              dtypes: list[torch.dtype] | None = None, ops: list[str] | None = None, *, seed: int | None = None,
              quiet: bool = False, progress: bool = True, full: bool = False, inject: str | None = None) -> int:
    """Compare every available backend with the float64 reference; print a table; return 0 or 1."""
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    dtypes = dtypes or list(CHECK_TOL)
    have = available_ops()
    ops = ops or have
    seed = random.randrange(2**31) if seed is None else seed
    pairs = targets(devices, backends)
    if not pairs:
        print("check: no kernel backend is available on " + ", ".join(devices) + " (see `fusedloss info`)")
        return 1
    gen = torch.Generator().manual_seed(seed)
    plan = plan_cases(ops, pairs, dtypes, full)
    print(f"check: {len(plan)} cases, ops {', '.join(ops)}; backends {', '.join(f'{b}@{d}' for d, b in pairs)}; "
          f"seed {seed} (replay with --seed {seed}); reference: fusedloss.reference in float64")
    missing = [n for n in OPS if n not in have]
    if missing:
        print(f"(not in this build of fusedloss, not checked: {', '.join(missing)})")
    header = ["device", "backend", "op", "dtype", "shape", "options", "reduction", "out err", "grad err", "result"]
    rows, failures = [], 0
    start = time.perf_counter()
    it = plan
    bar = None
    if progress and _tqdm is not None:
        bar = it = _tqdm(plan, desc="check", leave=False)
    for device, backend, name, dtype, shape, label, opts, reduction in it:
        r = check_case(OPS[name], device, backend, dtype, shape, opts, reduction, gen, inject=inject == name)
        failures += not r["ok"]
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        result = "PASS" if r["ok"] else "FAIL" + (f" ({r['why']})" if r["why"] else "")
        rows.append([device, backend, name, str(dtype).replace("torch.", ""), "x".join(map(str, shape)), label,
                     reduction, fmt(r["out"]), fmt(r["grad"]), result])
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    shown = rows if not quiet else [r for r in rows if not r[-1].startswith("PASS")]
    if shown:
        widths = [max(len(h), *(len(r[i]) for r in shown)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        prev = None
        for r in shown:
            if prev is not None and r[:4] != prev:
                print()
            prev = r[:4]
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("tolerances (rtol, atol; grad errors relative to max|grad|, plus the bounds of long sums and "
          "cancelling parts for linear_cross_entropy, linear_kl_div, linear_jsd and info_nce): "
          + "; ".join(f"{str(d).replace('torch.', '')} out {t['loss']} grad {t['grad']}"
                      for d, t in CHECK_TOL.items() if d in dtypes))
    # per op and backend summary
    summary: dict[tuple, list[int]] = {}
    for r in rows:
        s = summary.setdefault((r[0], r[1], r[2]), [0, 0])
        s[0] += r[-1].startswith("PASS")
        s[1] += 1
    print("summary: " + "; ".join(f"{op} {b}@{d} {p}/{n}" for (d, b, op), (p, n) in summary.items()))
    verdict = "PASS" if failures == 0 else "FAIL"
    print(f"check: {verdict}: {len(rows) - failures}/{len(rows)} cases match the reference ({elapsed:.1f} s)")
    return 1 if failures else 0
