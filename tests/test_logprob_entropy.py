"""cross_entropy(return_logprob=True, return_entropy=True) on every backend against float64 formulas:
the target's log_softmax and the softmax's entropy of the transformed logits, and their gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params, interpreted, require_backend, rows, with_reference

import fusedloss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.1},
    "z_loss+softcap+temperature": {"z_loss": 1e-3, "softcap": 4.0, "temperature": 0.7},
}


def transformed(x64, softcap=None, temperature=1.0):
    z = softcap * torch.tanh(x64 / softcap) if softcap else x64
    return z / temperature


def formulas(x64, t, w64, opts, reduction, ignore_index=-100):
    """(loss, logprob, entropy) in float64: torch's loss, and the extras of the transformed row."""
    z = transformed(x64, opts.get("softcap"), opts.get("temperature", 1.0))
    logp = torch.log_softmax(z, 1)
    kept = t != ignore_index
    y = t.clamp(min=0)
    logprob = torch.where(kept, logp.gather(1, y[:, None])[:, 0], 0.0)
    entropy = torch.where(kept, -(logp.exp() * logp).sum(1), 0.0)
    loss = F.cross_entropy(z, t, w64, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=opts.get("label_smoothing", 0.0))
    if opts.get("z_loss"):
        zl = opts["z_loss"] * torch.where(kept, torch.logsumexp(z, 1), 0.0) ** 2
        if reduction == "none":
            loss = loss + zl
        else:
            denom = (w64[y] * kept).sum() if w64 is not None else kept.sum()
            loss = loss + (zl.sum() / denom if reduction == "mean" else zl.sum())
    return loss, logprob, entropy


def inputs(n, c, dtype, device, weight):
    x = (torch.randn(n, c, device=device) * 3).to(dtype)
    t = torch.randint(0, c, (n,), device=device)
    if n > 2:
        t[1::4] = -100
    w = torch.rand(c, device=device) + 0.5 if weight else None
    return x, t, w


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_against_float64(backend, device, dtype, option, reduction):
    if backend != "reference":
        require_backend(backend, device)
    opts = dict(OPTIONS[option])
    n, c = rows(backend, device, 21), (37 if backend == "triton" and device == "cpu" else 1031)
    x, t, w = inputs(n, c, dtype, device, opts.pop("weight", False))
    xa = x.detach().clone().requires_grad_()
    loss, logprob, entropy = fusedloss.cross_entropy(xa, t, w, reduction=reduction, return_logprob=True,
                                                     return_entropy=True, backend=backend, **opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logprob.dtype == acc and entropy.dtype == acc and logprob.shape == t.shape
    g = [torch.randn(o.shape, dtype=torch.float64, device=device) for o in (loss, logprob, entropy)]
    (grad,) = torch.autograd.grad((loss, logprob, entropy), xa, [v.to(acc) for v in g])

    x64 = x.detach().double().requires_grad_()
    ref = formulas(x64, t, None if w is None else w.double(), opts, reduction)
    (ref_grad,) = torch.autograd.grad(ref, x64, g)
    msg = f"{backend} {option} {reduction}"
    for name, a, e in zip(("loss", "logprob", "entropy"), (loss, logprob, entropy), ref):
        assert_close(a, e, dtype, "loss", f"{msg} {name}")
    assert_close(grad, ref_grad, dtype, "grad", msg)


@pytest.mark.parametrize("backend,device", backend_params())
def test_each_extra_alone_and_with_lse(backend, device):
    """Only the asked-for outputs, in the order (loss, lse, logprob, entropy); gradients flow through any
    one of them alone (the others get none)."""
    require_backend(backend, device)
    x, t, _ = inputs(rows(backend, device, 9), 17, torch.float32, device, False)
    x64 = x.double().requires_grad_()
    _, logprob64, entropy64 = formulas(x64, t, None, {}, "none")
    lse64 = torch.where(t != -100, torch.logsumexp(x64, 1), 0.0)
    for kw, expected in [(dict(return_logprob=True), logprob64), (dict(return_entropy=True), entropy64),
                         (dict(return_lse=True, return_entropy=True), entropy64)]:
        xa = x.clone().requires_grad_()
        out = fusedloss.cross_entropy(xa, t, backend=backend, **kw)
        assert isinstance(out, tuple) and len(out) == 1 + len(kw)
        if "return_lse" in kw:
            assert_close(out[1], lse64, torch.float32, "loss", "lse")
        assert_close(out[-1], expected, torch.float32, "loss", str(kw))
        (grad,) = torch.autograd.grad(out[-1].sum(), xa)
        (ref_grad,) = torch.autograd.grad(expected.sum(), x64, retain_graph=True)
        assert_close(grad, ref_grad, torch.float32, "grad", str(kw))


@pytest.mark.parametrize("backend,device", with_reference())
def test_spatial_input(backend, device):
    """(N, C, d1) input: the extras have the target's shape."""
    if backend != "reference":
        require_backend(backend, device)
    x = torch.randn(2, 7, rows(backend, device, 5), device=device)
    t = torch.randint(0, 7, (2, x.shape[2]), device=device)
    loss, logprob, entropy = fusedloss.cross_entropy(x, t, reduction="none", return_logprob=True, return_entropy=True,
                                                     backend=backend)
    assert logprob.shape == entropy.shape == t.shape
    rows2 = x.movedim(1, -1).reshape(-1, 7).double()
    _, lp, h = formulas(rows2, t.reshape(-1), None, {}, "none")
    assert_close(logprob, lp.view(t.shape), torch.float32, "loss")
    assert_close(entropy, h.view(t.shape), torch.float32, "loss")


@pytest.mark.parametrize("backend,device", with_reference())
def test_infinite_logits(backend, device):
    """-inf logits have p = 0: they add nothing to the entropy and its gradient is 0 there, not NaN."""
    require_backend(backend, device)
    x = torch.randn(3, 9, device=device)
    x[:, 2] = float("-inf")
    x[1, 5:] = float("-inf")
    t = torch.tensor([0, 1, 3], device=device)
    xa = x.clone().requires_grad_()
    _, logprob, entropy = fusedloss.cross_entropy(xa, t, reduction="none", return_logprob=True, return_entropy=True,
                                                  backend=backend)
    x64 = x.double().requires_grad_()
    _, lp, h = formulas(x64, t, None, {}, "none")
    h = -(torch.softmax(x64, 1) * torch.log_softmax(x64, 1)).nan_to_num().sum(1)  # 0 log 0 = 0
    assert_close(entropy, h, torch.float32, "loss")
    assert_close(logprob, lp, torch.float32, "loss")
    (grad,) = torch.autograd.grad(entropy.sum() + logprob.sum(), xa)
    p = torch.softmax(x64.detach(), 1)
    logp = torch.log_softmax(x64.detach(), 1).nan_to_num(neginf=0.0)
    expected = -p * (logp + h.detach()[:, None]) + F.one_hot(t, 9) - p
    assert torch.isfinite(grad).all()
    assert_close(grad, expected, torch.float32, "grad")


def test_entropy_gradient_formula():
    """The reference's autograd gradient of the entropy is -p (log p + H), the header's formula (7)."""
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (4,))
    _, h = fusedloss.cross_entropy(x, t, reduction="none", return_entropy=True, backend="reference")
    (grad,) = torch.autograd.grad(h.sum(), x)
    p, logp = torch.softmax(x, 1), torch.log_softmax(x, 1)
    torch.testing.assert_close(grad, -p * (logp + h[:, None]))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if not interpreted(*p.values)])
def test_compile_fullgraph(backend, device):
    require_backend(backend, device)
    x, t, w = inputs(12, 11, torch.float32, device, True)

    def step(x):
        loss, lp, h = fusedloss.cross_entropy(x, t, w, label_smoothing=0.1, return_logprob=True, return_entropy=True,
                                              backend=backend)
        return loss + 0.3 * lp.sum() - 0.01 * h.sum()

    torch._dynamo.reset()
    xc = x.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True)(xc)
    out.backward()
    x64 = x.double().requires_grad_()
    loss, lp, h = formulas(x64, t, w.double(), {"label_smoothing": 0.1}, "mean")
    expected = loss + 0.3 * lp.sum() - 0.01 * h.sum()
    expected.backward()
    assert_close(out, expected, torch.float32, "loss", "compiled")
    assert_close(xc.grad, x64.grad, torch.float32, "grad", "compiled")


def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="return_logprob needs class-index targets"):
        fusedloss.cross_entropy(x, torch.softmax(x, 1), return_logprob=True)
