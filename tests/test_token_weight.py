"""Per-element loss weights (``token_weight``) of cross_entropy, focal_loss and linear_cross_entropy on
every backend, against float64 formulas written here from torch's unweighted per-element losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params, require_backend, rows, with_reference
from test_linear_cross_entropy import assert_grads_close, matmul_bounds

import fusedloss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


def weighted(per_element, kept, w_y, u, reduction):
    """The contract: each element's loss times u; mean divides by sum over kept elements of u * w[y]."""
    loss = per_element * u
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (u * w_y * kept).sum()


def inputs(n, c, dtype, device, *, ignore_index=-100, weight=True):
    x = (torch.randn(n, c, device=device) * 3).to(dtype)
    t = torch.randint(0, c, (n,), device=device)
    if n > 2:
        t[1::3] = ignore_index
    w = torch.rand(c, device=device) + 0.5 if weight else None
    u = torch.rand(n, device=device) * 2  # some near 0, none negative
    return x, t, w, u


def check(backend, device, dtype, reduction, fused, formula):
    """fused(backend, x, t, w, u) against formula(x64, t, w64, u64) on the same (rounded) inputs: the loss
    and the input's gradient for a random upstream gradient."""
    if backend != "reference":
        require_backend(backend, device)
    x, t, w, u = inputs(rows(backend, device, 23), 37, dtype, device)
    xa = x.detach().clone().requires_grad_()
    loss = fused(backend, xa, t, w, u)
    g = torch.randn_like(loss, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, xa, g.to(loss.dtype))
    x64 = x.detach().double().requires_grad_()
    ref = formula(x64, t, w.double(), u.double())
    (ref_grad,) = torch.autograd.grad(ref, x64, g)
    assert_close(loss, ref, dtype, "loss", f"{backend} {reduction}")
    assert_close(grad, ref_grad, dtype, "grad", f"{backend} {reduction}")


def grad_and_loss(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    g = torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss, grad, g


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy(backend, device, dtype, reduction):
    def fused(backend, x, t, w, u):
        return fusedloss.cross_entropy(x, t, w, token_weight=u, label_smoothing=0.1, reduction=reduction,
                                       backend=backend)

    def formula(x64, t, w64, u64):
        per = F.cross_entropy(x64, t, w64, reduction="none", label_smoothing=0.1)
        return weighted(per, t != -100, w64[t.clamp(min=0)], u64, reduction)

    check(backend, device, dtype, reduction, fused, formula)


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_loss(backend, device, dtype, reduction):
    alpha = torch.rand(37, device=device)

    def fused(backend, x, t, w, u):
        return fusedloss.focal_loss(x, t, 1.5, alpha, weight=w, token_weight=u, reduction=reduction, backend=backend)

    # (1 - p_y)^gamma * -log p_y * alpha_y * w_y from log_softmax, the focal loss's definition
    def formula(x64, t, w64, u64):
        kept = t != -100
        y = t.clamp(min=0)
        logp = torch.log_softmax(x64, 1).gather(1, y[:, None])[:, 0]
        per = (-torch.expm1(logp)) ** 1.5 * -logp * alpha.double()[y] * w64[y] * kept
        return weighted(per, kept, w64[y], u64, reduction)

    check(backend, device, dtype, reduction, fused, formula)


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shift", [0, 1])
def test_linear_cross_entropy(backend, device, dtype, reduction, shift):
    """Against the full-logits formula; with shift=1 the weight of target t + 1 goes with position t."""
    if backend != "reference":
        require_backend(backend, device)
    b_, s_, d, v = 2, rows(backend, device, 9), 16, 301
    x = torch.randn(b_, s_, d, device=device).to(dtype)
    W = (torch.randn(v, d, device=device) * 0.7).to(dtype)
    t = torch.randint(0, v, (b_, s_), device=device)
    t[:, ::4] = -100
    u = torch.rand(b_, s_, device=device) * 2
    params = [x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()]
    loss = fusedloss.linear_cross_entropy(*params, t, token_weight=u, reduction=reduction, shift=shift, chunk_size=5,
                                          backend=backend)
    g = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, params, g)

    p64 = [x.detach().double().requires_grad_(), W.detach().double().requires_grad_()]
    tt, uu = t, u.double()
    if shift:
        tt = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -100)], 1)
        uu = torch.cat([uu[:, 1:], torch.zeros_like(uu[:, :1])], 1)
    z = p64[0] @ p64[1].T
    per = F.cross_entropy(z.reshape(-1, v), tt.reshape(-1), reduction="none").view(b_, s_)
    ref = weighted(per, tt != -100, torch.ones_like(uu), uu, reduction)
    *ref_grads, G = torch.autograd.grad(ref, p64 + [z], g.double())
    msg = f"{backend} {reduction} shift={shift}"
    assert_close(loss, ref, dtype, "loss", msg)
    s = g.double().abs().expand(b_, s_) * uu
    if reduction == "mean":
        s = s / (uu * (tt != -100)).sum()
    mixed = (device == "cuda" or backend == "triton") and dtype != torch.float32
    bounds = matmul_bounds(G.abs().reshape(-1, v), x.reshape(-1, d), W, dtype, s.reshape(-1), mixed)
    assert_grads_close([grads[0].reshape(-1, d), grads[1]], [ref_grads[0].reshape(-1, d), ref_grads[1]], dtype, msg,
                       bounds[:2])


@pytest.mark.parametrize("backend,device", backend_params())
def test_cross_entropy_spatial_and_strided(backend, device):
    """(N, C, d1) input with (N, d1) token weights, given as a strided view."""
    require_backend(backend, device)
    n, c, d1 = 3, 11, rows(backend, device, 5)
    x = torch.randn(n, c, d1, device=device)
    t = torch.randint(0, c, (n, d1), device=device)
    t[0, 0] = -100
    u = torch.rand(n, 2 * d1, device=device)[:, ::2]
    assert not u.is_contiguous()
    for reduction in REDUCTIONS:
        loss, grad, g = grad_and_loss(
            lambda x: fusedloss.cross_entropy(x, t, token_weight=u, reduction=reduction, backend=backend), x)
        x64 = x.double().requires_grad_()
        per = F.cross_entropy(x64, t, reduction="none")
        ref = weighted(per, t != -100, torch.ones_like(per), u.double(), reduction)
        (ref_grad,) = torch.autograd.grad(ref, x64, g.double())
        assert_close(loss, ref, torch.float32, "loss", reduction)
        assert_close(grad, ref_grad, torch.float32, "grad", reduction)


@pytest.mark.parametrize("backend,device", with_reference())
def test_unit_token_weights_are_torch_mean(backend, device):
    """All ones: torch's (weighted) mean, to the float32 tolerance of the kernels."""
    if backend != "reference":
        require_backend(backend, device)
    x, t, w, _ = inputs(rows(backend, device, 12), 9, torch.float32, device)
    got = fusedloss.cross_entropy(x, t, w, token_weight=torch.ones(t.shape, device=device), backend=backend)
    assert_close(got, F.cross_entropy(x.double(), t, w.double()), torch.float32, "loss")


def test_all_ignored_mean_is_nan():
    require_backend("cpu", "cpu")
    x, t, _, u = inputs(5, 4, torch.float32, "cpu")
    t.fill_(-100)
    assert fusedloss.cross_entropy(x, t, token_weight=u, backend="cpu").isnan()
    assert fusedloss.focal_loss(x, t, token_weight=u, backend="cpu").isnan()


def test_bad_token_weight():
    x, t, _, u = inputs(5, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="token_weight must have the target's shape"):
        fusedloss.cross_entropy(x, t, token_weight=u[:4])
    with pytest.raises(TypeError, match="token_weight"):
        fusedloss.focal_loss(x, t, token_weight=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="token_weight requires grad"):
        fusedloss.cross_entropy(x, t, token_weight=u.requires_grad_())
    with pytest.raises(TypeError, match="token_weight"):
        fusedloss.linear_cross_entropy(x, torch.randn(7, 4), t, token_weight=[1.0] * 5)


def test_modules_take_token_weight():
    x, t, w, u = inputs(6, 5, torch.float32, "cpu")
    expected = fusedloss.cross_entropy(x, t, w, token_weight=u)
    assert torch.equal(fusedloss.nn.CrossEntropyLoss(w)(x, t, token_weight=u), expected)
    assert torch.equal(fusedloss.nn.FocalLoss(gamma=0.0, weight=w)(x, t, token_weight=u),
                       fusedloss.focal_loss(x, t, 0.0, weight=w, token_weight=u))
    h, W = torch.randn(6, 3), torch.randn(5, 3)
    assert torch.equal(fusedloss.nn.LinearCrossEntropyLoss()(h, W, t, token_weight=u),
                       fusedloss.linear_cross_entropy(h, W, t, token_weight=u))


def test_build_loss_reads_token_weight():
    x, t, _, u = inputs(6, 5, torch.float32, "cpu")
    loss = fusedloss.build_loss({"losses": [{"name": "cross_entropy", "inputs": {"input": "logits", "target": "y",
                                                                                  "token_weight": "mask"}}]})
    assert torch.equal(loss({"logits": x, "y": t, "mask": u}), fusedloss.cross_entropy(x, t, token_weight=u))


def test_reference_matches_its_formula_with_probability_targets():
    """Probability targets: each row's loss times u, mean over the sum of u."""
    x = torch.randn(6, 5, dtype=torch.float64)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    u = torch.rand(6, dtype=torch.float64)
    per = F.cross_entropy(x, p, reduction="none")
    got = fusedloss.cross_entropy(x, p, token_weight=u)
    torch.testing.assert_close(got, (per * u).sum() / u.sum())
    torch.testing.assert_close(fusedloss.cross_entropy(x, p, token_weight=u, reduction="none"), per * u)

