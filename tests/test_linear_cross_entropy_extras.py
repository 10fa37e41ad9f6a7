"""linear_cross_entropy(return_logprob=True, return_entropy=True) on every backend against float64 formulas
on the full logits: the loss, the target's log_softmax and the softmax's entropy, and the gradients of
input, linear_weight and linear_bias through a random combination of all three."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, backend_params, interpreted, require_backend, rows, with_reference
from test_linear_cross_entropy import assert_grads_close, make_inputs, matmul_bounds
from test_logprob_entropy import formulas

import fusedloss
from fusedloss import reference
from fusedloss.ops import linear_cross_entropy as _lce
from fusedloss.ops._registry import REDUCTION

OPTIONS = {
    "plain": {},
    "bias+weight+smoothing": {"bias": True, "weight": True, "label_smoothing": 0.1},
    "z_loss+softcap": {"z_loss": 1e-3, "softcap": 4.0},
}
# (option, reduction, chunk): every option, reduction and chunk kind (one row, a few rows, all rows)
CASES = [
    ("plain", "none", "one"),
    ("bias+weight+smoothing", "mean", "mid"),
    ("z_loss+softcap", "sum", "over"),
    ("bias+weight+smoothing", "none", "over"),
    ("z_loss+softcap", "mean", "one"),
    ("plain", "sum", "mid"),
]
CHUNK = {"one": lambda n: 1, "mid": lambda n: max(2, n // 3), "over": lambda n: n + 5}


def _dtypes(backend):
    if backend == "reference":
        return [torch.float32]
    return [torch.float32, torch.bfloat16, torch.float64]


PARAMS = [pytest.param(p.values[0], p.values[1], dtype, id=f"{p.id}-{str(dtype)[6:]}")
          for p in with_reference() for dtype in _dtypes(p.values[0])]


def linear_formulas(x64, W64, b64, t, w64, opts, reduction):
    """(loss, logprob, entropy) in float64 from the full logits."""
    z = x64 @ W64.T + (b64 if b64 is not None else 0.0)
    return formulas(z, t, w64, opts, reduction)


def _leaves(x, W, b, dtype=None):
    f = (lambda v: v.detach().to(dtype)) if dtype else (lambda v: v.detach().clone())
    return [f(v).requires_grad_() for v in (x, W) + ((b,) if b is not None else ())]


@pytest.mark.parametrize("backend,device,dtype", PARAMS)
@pytest.mark.parametrize("option,reduction,chunk", CASES)
def test_against_float64(backend, device, dtype, option, reduction, chunk):
    if backend != "reference":
        require_backend(backend, device)
    opts = dict(OPTIONS[option])
    use_bias, use_weight = opts.pop("bias", False), opts.pop("weight", False)
    N, D, V = rows(backend, device, 19), 16, (37 if interpreted(backend, device) else 203)
    x, W, b, t, w = make_inputs(N, D, V, dtype, device, bias=use_bias, weight=use_weight)
    params = _leaves(x, W, b)
    loss, logprob, entropy = fusedloss.linear_cross_entropy(
        params[0], params[1], t, linear_bias=params[2] if b is not None else None, weight=w, reduction=reduction,
        chunk_size=CHUNK[chunk](N), return_logprob=True, return_entropy=True, backend=backend, **opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logprob.dtype == entropy.dtype == acc and logprob.shape == entropy.shape == t.shape
    g = [torch.randn(o.shape, dtype=torch.float64, device=device) for o in (loss, logprob, entropy)]
    grads = torch.autograd.grad((loss, logprob, entropy), params, [v.to(acc) for v in g])

    p64 = _leaves(x, W, b, torch.float64)
    w64 = w.double() if w is not None else None
    z = p64[0] @ p64[1].T + (p64[2] if b is not None else 0.0)
    ref = formulas(z, t, w64, opts, reduction)
    *ref_grads, G = torch.autograd.grad(ref, p64 + [z], g)
    msg = f"{backend} {dtype} {option} {reduction} chunk={chunk}"
    for name, a, e in zip(("loss", "logprob", "entropy"), (loss, logprob, entropy), ref):
        assert_close(a, e, dtype, "loss", f"{msg} {name}")
    # G rounded to bf16 before the gradient products: the fused Triton kernels (and CUDA's cuBLAS path);
    # bf16 has fp32's exponent range, so the row scale does not enter the bound.
    mixed = dtype == torch.bfloat16 and (backend == "triton" or (device == "cuda" and _lce._mixed_precision(x)))
    bounds = matmul_bounds(G.abs(), x, W, dtype, torch.ones(N, dtype=torch.float64, device=device), mixed)
    assert_grads_close(grads, ref_grads, dtype, msg, bounds)


@pytest.mark.parametrize("backend,device", with_reference())
def test_shift_and_token_weight(backend, device):
    """shift=1 on (B, T, D) input: the extras have the target's shape, position t scores target t + 1, the
    last position of each sequence is ignored (0); token weights weigh the loss, not the extras."""
    if backend != "reference":
        require_backend(backend, device)
    B, T, D, V = 2, (4 if interpreted(backend, device) else 7), 8, 29
    x = torch.randn(B, T, D, device=device)
    W = torch.randn(V, D, device=device) * 0.7
    t = torch.randint(0, V, (B, T), device=device)
    t[0, 2] = -100
    u = torch.rand(B, T, device=device) + 0.5
    xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss, lse, logprob, entropy = fusedloss.linear_cross_entropy(
        xa, Wa, t, shift=1, token_weight=u, reduction="sum", chunk_size=3, return_lse=True, return_logprob=True,
        return_entropy=True, backend=backend)
    assert lse.shape == logprob.shape == entropy.shape == t.shape
    ts = torch.cat([t[:, 1:], torch.full((B, 1), -100, device=device)], 1)
    us = torch.cat([u[:, 1:], torch.zeros(B, 1, device=device)], 1)
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    z = (x64 @ W64.T).reshape(B * T, V)
    rl, rlp, rh = formulas(z, ts.reshape(-1), None, {}, "none")
    rl = (rl * us.reshape(-1).double()).sum()
    assert_close(loss, rl, torch.float32, "loss", "shift loss")
    assert_close(logprob, rlp.view(B, T), torch.float32, "loss", "shift logprob")
    assert_close(entropy, rh.view(B, T), torch.float32, "loss", "shift entropy")
    assert (logprob[:, -1] == 0).all() and (entropy[:, -1] == 0).all() and (entropy[0, 1] == 0)
    gl, gh = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    grads = torch.autograd.grad(loss + (gl * logprob).sum() + (gh * entropy).sum(), (xa, Wa))
    ref = torch.autograd.grad(rl + (gl.double().view(-1) * rlp).sum() + (gh.double().view(-1) * rh).sum(),
                              (x64, W64))
    for a, e, name in zip(grads, ref, ("input", "linear_weight")):
        assert_close(a, e, torch.float32, "grad", f"shift grad {name}")


@pytest.mark.parametrize("backend,device", with_reference())
def test_each_extra_alone(backend, device):
    """Only the asked-for outputs, in the order (loss, lse, logprob, entropy); a gradient through one of
    them alone (the loss unused) reaches every parameter."""
    if backend != "reference":
        require_backend(backend, device)
    x, W, b, t, _ = make_inputs(rows(backend, device, 10), 8, 23, torch.float32, device, bias=True)
    p64 = _leaves(x, W, b, torch.float64)
    _, lp64, h64 = linear_formulas(*p64, t, None, {}, "none")
    lse64 = torch.where(t != -100, torch.logsumexp(p64[0] @ p64[1].T + p64[2], 1), 0.0)
    for kw, want in [(dict(return_logprob=True), lp64), (dict(return_entropy=True), h64),
                     (dict(return_lse=True, return_logprob=True), lp64)]:
        params = _leaves(x, W, b)
        out = fusedloss.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2], backend=backend,
                                             chunk_size=4, **kw)
        assert isinstance(out, tuple) and len(out) == 1 + len(kw)
        if "return_lse" in kw:
            assert_close(out[1], lse64, torch.float32, "loss", "lse")
        assert_close(out[-1], want, torch.float32, "loss", str(kw))
        grads = torch.autograd.grad(out[-1].sum(), params)
        ref = torch.autograd.grad(want.sum(), p64, retain_graph=True)
        assert_grads_close(grads, ref, torch.float32, str(kw))


def test_no_grad_and_frozen_head():
    """Under no_grad the extras come without a graph; with a frozen head only the input's gradient."""
    x, W, b, t, _ = make_inputs(12, 8, 31, torch.float32, "cpu", bias=True)
    with torch.no_grad():
        _, lp, h = fusedloss.linear_cross_entropy(x.requires_grad_(), W, t, linear_bias=b, return_logprob=True,
                                                  return_entropy=True, backend="cpu")
    assert lp.grad_fn is None and h.grad_fn is None
    xa = x.detach().clone().requires_grad_()
    _, h = fusedloss.linear_cross_entropy(xa, W, t, linear_bias=b, return_entropy=True, backend="cpu", chunk_size=5)
    (grad,) = torch.autograd.grad(h.sum(), xa)
    x64 = x.detach().double().requires_grad_()
    _, _, h64 = linear_formulas(x64, W.double(), b.double(), t, None, {}, "none")
    assert_close(h, h64, torch.float32, "loss")
    assert_close(grad, torch.autograd.grad(h64.sum(), x64)[0], torch.float32, "grad")


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    require_backend(backend, device)
    tests = ("test_schema", "test_autograd_registration") if interpreted(backend, device) else None
    x, W, b, t, w = make_inputs(rows(backend, device, 9), 8, 37, torch.float32, device, bias=True, weight=True)
    u = torch.rand(x.shape[0], device=device) + 0.25
    op = _lce.LINEAR_CROSS_ENTROPY.op(backend)
    for reduction in ("none", "mean"):
        args = (x.clone().requires_grad_(), W.clone().requires_grad_(), t, b.clone().requires_grad_(), w, u, -100,
                REDUCTION[reduction], 0.1, 1e-3, 7.0, 4, True)
        torch.library.opcheck(op, args, test_utils=tests or torch.library._OPCHECK_DEFAULT_UTILS)
    if backend != "triton":
        chunks = torch.ops.fusedloss.linear_cross_entropy_chunks.default
        base = (x, W, t, b, w)
        fwd = chunks(*base, None, -100, 0.1, 0.0, 0.0, 3, False, False, False, extras=True)
        stats = fwd[5]
        assert stats.shape == (x.shape[0], 4)
        n = x.shape[0]
        for kw in (dict(extras=True), dict(stats=stats, grad_logprob=torch.randn(n), grad_entropy=torch.randn(n))):
            flags = (False, False, False) if "extras" in kw else (True, True, True)
            torch.library.opcheck(chunks, (*base, torch.randn(n), -100, 0.1, 0.0, 0.0, 3, *flags), kw,
                                  test_utils=("test_schema", "test_faketensor"))


def test_reference_extras_match_cross_entropy():
    """reference.linear_cross_entropy's extras are cross_entropy's on the full logits (what the float64
    formulas above stand on)."""
    x, W, b, t, _ = make_inputs(9, 6, 13, torch.float64, "cpu", bias=True)
    _, lp, h = reference.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", return_logprob=True,
                                              return_entropy=True)
    _, lp2, h2 = linear_formulas(x, W, b, t, None, {}, "none")
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(h, h2)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces around the op with the extras, forward and backward (the cpu
    backend stands for the chunked op on any device)."""
    x, W, b, t, _ = make_inputs(12, 8, 29, torch.float32, "cpu", bias=True)

    def step(x, W):
        loss, lp, h = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, return_logprob=True,
                                                     return_entropy=True, chunk_size=5, backend="cpu")
        return loss + 0.3 * lp.sum() - 0.1 * h.sum()

    torch._dynamo.reset()
    xc, Wc = x.clone().requires_grad_(), W.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True)(xc, Wc)
    out.backward()
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    loss, lp, h = linear_formulas(x64, W64, b.double(), t, None, {}, "mean")
    expected = loss + 0.3 * lp.sum() - 0.1 * h.sum()
    expected.backward()
    assert_close(out, expected, torch.float32, "loss", "compiled")
    assert_close(xc.grad, x64.grad, torch.float32, "grad", "compiled input")
    assert_close(Wc.grad, W64.grad, torch.float32, "grad", "compiled linear_weight")
