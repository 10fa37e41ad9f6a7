"""fusedloss.siglip_loss on every backend against a float64 plain-PyTorch SigLIP written here, and its ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (FP16_SUBNORMAL_ATOL, TOL, assert_16bit_rows_make_no_float32_copies, assert_close, backend_params,
                      interpreted, require_backend, with_reference)

import fusedloss
from fusedloss import reference
from fusedloss.ops import siglip as sig_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]
# (N, M, D): single rows, odd sizes, M > N; D = 80 takes the Triton kernels' chunked-D path (fp32 holds
# D <= 64 in one chunk, fp64 D <= 16), D = 200 the 16-bit one's (its float32 accumulator and, normalized,
# the pass for each row's radial part).
SHAPES = [(1, 1, 1), (5, 7, 3), (17, 17, 17), (12, 40, 80), (9, 11, 200)]
# The CPU kernel's tiles are 128 queries x 256 keys (fewer query rows per tile with more threads).
LARGE_SHAPES = [(130, 300, 40), (300, 520, 33)]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def plain_siglip(q, k, temperature, bias, labels=None, normalize=True, reduction="mean"):
    """SigLIP as open_clip writes it: the (N, M) logits, labels 2 * onehot - 1, -logsigmoid summed per
    query; mean over queries. In the inputs' dtype (plain PyTorch's precision)."""
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    logits = temperature * (q @ k.T) + bias
    n = q.shape[0]
    target = torch.arange(n, device=q.device) if labels is None else labels
    signs = 2 * F.one_hot(target, k.shape[0]).to(logits.dtype) - 1
    per_query = -F.logsigmoid(signs * logits).sum(1)
    return {"mean": lambda: per_query.sum() / n, "sum": per_query.sum, "none": lambda: per_query}[reduction]()


def make_inputs(N, M, D, dtype, device, normalize=True):
    s = 1.0 if normalize else 1.0 / math.sqrt(D)  # unnormalized: dot products of order 1
    q = (torch.randn(N, D, device=device) * s).to(dtype)
    k = (torch.randn(M, D, device=device) * s).to(dtype)
    # Make the positives similar, as in training, so that both signs of the logits occur.
    n = min(N, M)
    k[:n] = (0.5 * k[:n].float() + q[:n].float()).to(dtype)
    return q, k


def scalars(learnable, dtype, device, temperature=10.0, bias=-10.0):
    if not learnable:
        return temperature, bias
    acc = acc_of(dtype)
    return torch.tensor(temperature, dtype=acc, device=device), torch.tensor(bias, dtype=acc, device=device)


def run(q, k, t, b, backend, grad_out=None, **kw):
    """The loss and the gradients of query, key and (tensor) temperature and bias from one backend."""
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    t = t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
    b = b.detach().clone().requires_grad_() if isinstance(b, torch.Tensor) else b
    leaves += [x for x in (t, b) if isinstance(x, torch.Tensor)]
    loss = fusedloss.siglip_loss(leaves[0], leaves[1], temperature=t, bias=b, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    return loss, torch.autograd.grad(loss, leaves, g), g


def expected(q, k, t, b, grad_out, **kw):
    """plain_siglip in float64 on the same rounded inputs and its gradients, and the scales of the
    accumulation errors of gradients that cancel: for query and key, the largest gradient of a
    normalized row divided by its norm (through F.normalize a row's gradient is that minus its radial
    part; for D = 1 the difference is exactly 0, its float32 error is not); for the temperature and the
    bias, the sums of the magnitudes of the terms they add up (sum |G_ij T_ij| and sum |G_ij|, G = dL/dz)."""
    leaves = [q.detach().double().requires_grad_(), k.detach().double().requires_grad_()]
    t64 = t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t
    b64 = b.detach().double().requires_grad_() if isinstance(b, torch.Tensor) else b
    leaves += [x for x in (t64, b64) if isinstance(x, torch.Tensor)]
    loss = plain_siglip(leaves[0], leaves[1], t64, b64, **kw)
    grads = torch.autograd.grad(loss, leaves, grad_out.double())
    t64, b64 = (float(x.detach()) if isinstance(x, torch.Tensor) else x for x in (t64, b64))
    normalize = kw.get("normalize", True)
    q64, k64 = leaves[0].detach(), leaves[1].detach()
    qn = (F.normalize(q64, dim=-1) if normalize else q64).requires_grad_()
    kn = (F.normalize(k64, dim=-1) if normalize else k64).requires_grad_()
    dots = qn @ kn.T
    z = t64 * dots + b64
    n = dots.shape[0]
    labels = kw.get("labels")
    target = torch.arange(n, device=z.device) if labels is None else labels
    rows = -F.logsigmoid((2 * F.one_hot(target, dots.shape[1]).double() - 1) * z).sum(1)
    total = {"mean": lambda: rows.sum() / n, "sum": rows.sum, "none": lambda: rows}[kw.get("reduction", "mean")]()
    gz, gqn, gkn = torch.autograd.grad(total, (z, qn, kn), grad_out.double())
    parts = [0.0, 0.0]
    if normalize and q64.numel() and k64.numel():
        parts = [float((gqn / q64.norm(dim=1, keepdim=True).clamp_min(1e-12)).abs().max()),
                 float((gkn / k64.norm(dim=1, keepdim=True).clamp_min(1e-12)).abs().max())]
    magnitudes = [float((gz * dots.detach()).abs().sum()), float(gz.abs().sum())]
    return loss, grads, parts + magnitudes


def assert_grad_close(actual, expected, dtype, part, msg):
    """conftest.assert_close for gradients, atol relative to max(max|grad|, part) (see expected)."""
    rtol, atol = TOL[dtype]["grad"]
    e = expected.detach().double().cpu()
    scale = max(e.abs().max().item() if e.numel() else 0.0, part)
    atol = atol * scale + (FP16_SUBNORMAL_ATOL if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(actual.detach().double().cpu(), e, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg} [{dtype}] {m}")


def check(q, k, t, b, backend, dtype, msg, grad_out=None, **kw):
    loss, grads, g = run(q, k, t, b, backend, grad_out=grad_out, **kw)
    exp_loss, exp_grads, scales = expected(q, k, t, b, g, **kw)
    assert loss.dtype == acc_of(dtype), msg
    assert_close(loss, exp_loss, dtype, "loss", msg)
    assert grads[0].dtype == grads[1].dtype == dtype, msg
    assert_grad_close(grads[0], exp_grads[0], dtype, scales[0], msg + " query")
    assert_grad_close(grads[1], exp_grads[1], dtype, scales[1], msg + " key")
    # The scalars' gradients sum N * M terms of both signs, each accumulated with the loss's accuracy:
    # their error is bounded by the loss's rtol times the sum of the terms' magnitudes.
    rtol, atol = TOL[dtype]["loss"]
    for got, want, mag, what in zip(grads[2:], exp_grads[2:], scales[2:], ("temperature", "bias")):
        assert got.dtype == acc_of(dtype), msg
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=rtol * mag + atol,
                                   msg=lambda m: f"{msg} {what} [{dtype}] {m}")


# --- the reference against the plain formula ------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_by_hand(normalize, reduction):
    q, k = torch.randn(6, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    labels = torch.randint(0, 9, (6,))
    for lab in (None, labels):
        ours = reference.siglip_loss(q, k, temperature=3.0, bias=-2.0, normalize=normalize, labels=lab,
                                     reduction=reduction)
        # the pairwise definition, one pair at a time
        qn, kn = (F.normalize(q, dim=1), F.normalize(k, dim=1)) if normalize else (q, k)
        rows = torch.zeros(6, dtype=torch.float64)
        for i in range(6):
            for j in range(9):
                y = 1.0 if j == (i if lab is None else int(lab[i])) else -1.0
                rows[i] += math.log1p(math.exp(-y * (3.0 * float(qn[i] @ kn[j]) - 2.0)))
        want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
        torch.testing.assert_close(ours, want)


# --- every backend against float64 plain PyTorch --------------------------------------------------


def _shape_params():
    out = []
    for backend, device in [p.values for p in with_reference()]:
        for dtype in DTYPES:
            for shape in SHAPES + (LARGE_SHAPES if backend in ("cpu", "reference", "cuda") else []):
                out.append(pytest.param(backend, device, dtype, shape, id=f"{backend}-{device}-{dtype}-{shape}"))
    return out


@pytest.mark.parametrize("backend,device,dtype,shape", _shape_params())
def test_against_plain(backend, device, dtype, shape):
    """Learnable temperature and bias, per-query losses with a random upstream gradient."""
    require_backend(backend, device)
    N, M, D = shape
    q, k = make_inputs(N, M, D, dtype, device)
    t, b = scalars(True, dtype, device)
    check(q, k, t, b, backend, dtype, f"{backend} {shape}", reduction="none")


OPTIONS = [
    ("mean fixed", dict(reduction="mean"), False),
    ("sum learnable", dict(reduction="sum"), True),
    ("unnormalized", dict(normalize=False, reduction="mean"), True),
    ("labels", dict(labels=True, reduction="none"), True),
    ("labels unnormalized", dict(labels=True, normalize=False, reduction="sum"), False),
]


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("name,kw,learnable", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_options(backend, device, name, kw, learnable, dtype):
    require_backend(backend, device)
    N, M, D = (9, 21, 19)
    q, k = make_inputs(N, M, D, dtype, device, kw.get("normalize", True))
    kw = dict(kw)
    if kw.get("labels"):
        kw["labels"] = torch.randint(0, M, (N,), device=device)
    t, b = scalars(learnable, dtype, device, temperature=7.0, bias=-4.0)
    check(q, k, t, b, backend, dtype, f"{backend} {name}", **kw)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_within_a_multiple_of_plain_pytorch(backend, device, dtype):
    """The 16-bit rule: against float64, our error is at most 2x plain PyTorch's error in the same dtype,
    plus a floor of the dtype's rounding of the result, for the loss and every gradient."""
    require_backend(backend, device)
    q, k = make_inputs(24, 40, 32, dtype, device)
    t, b = scalars(True, dtype, device)
    ours_loss, ours_grads, g = run(q, k, t, b, backend, grad_out=torch.tensor(1.0, device=device))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, t.to(dtype), b.to(dtype))]
    plain_loss = plain_siglip(*leaves)
    plain_grads = torch.autograd.grad(plain_loss, leaves)
    exp_loss, exp_grads, _ = expected(q, k, t, b, g)
    eps = torch.finfo(dtype).eps
    for what, ours, plain, want in zip(("loss", "query", "key", "temperature", "bias"),
                                       (ours_loss,) + tuple(ours_grads), (plain_loss,) + tuple(plain_grads),
                                       (exp_loss,) + tuple(exp_grads)):
        want = want.detach().double().cpu()
        err_ours = float((ours.detach().double().cpu() - want).abs().max())
        err_plain = float((plain.detach().double().cpu() - want).abs().max())
        floor = eps * float(want.abs().max())
        assert err_ours <= 2 * err_plain + floor, (what, err_ours, err_plain, floor)


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_noncontiguous_inputs(backend, device, layout):
    require_backend(backend, device)
    N, M, D = 7, 11, 13
    if layout == "transposed":
        q = torch.randn(D, N, device=device).T
        k = torch.randn(D, M, device=device).T
    else:
        q = torch.randn(N, 2 * D, device=device)[:, ::2]
        k = torch.randn(M, D + 5, device=device)[:, 3:3 + D]
    assert not q.is_contiguous() and not k.is_contiguous()
    t, b = scalars(True, torch.float32, device)
    labels = torch.randint(0, M, (2 * N,), device=device)[::2]  # strided labels too
    check(q, k, t, b, backend, torch.float32, f"{backend} {layout}", labels=labels)


@pytest.mark.parametrize("backend,device", backend_params())
def test_deterministic(backend, device):
    """Two runs give the same bits (no atomics), forward and every gradient."""
    require_backend(backend, device)
    n = 20 if interpreted(backend, device) else 300
    q, k = make_inputs(n, n + 7, 48, torch.float32, device)
    t, b = scalars(True, torch.float32, device)
    first = run(q, k, t, b, backend, grad_out=torch.tensor(1.0, device=device), reduction="mean")
    second = run(q, k, t, b, backend, grad_out=torch.tensor(1.0, device=device), reduction="mean")
    assert torch.equal(first[0], second[0])
    for a, c in zip(first[1], second[1]):
        assert torch.equal(a, c)


def test_cpu_thread_counts_agree():
    """The per-query losses and d temperature / d bias do not depend on the thread count (their sums run
    per row over fixed key tiles); dK is summed per part, so its bits may differ, its values agree."""
    q, k = make_inputs(300, 300, 32, torch.float32, "cpu")
    t, b = scalars(True, torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, t, b, "cpu", grad_out=torch.ones(300), reduction="none")
        torch.set_num_threads(max(2, threads))
        many = run(q, k, t, b, "cpu", grad_out=torch.ones(300), reduction="none")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[0], many[0], rtol=0, atol=0)
    for a, c in zip(one[1], many[1]):
        assert_close(a, c, torch.float32, "grad")


# --- bad input ------------------------------------------------------------------------------------

BAD = [
    (lambda: (torch.randn(3), torch.randn(3, 4)), {}, ValueError, "query must be 2-D"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 5)), {}, ValueError, "same feature size"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4).double()), {}, TypeError, "key must have query's dtype"),
    (lambda: (torch.randint(0, 3, (3, 4)), torch.randn(3, 4)), {}, TypeError, "query must be a floating"),
    (lambda: (torch.randn(4, 4), torch.randn(3, 4)), {}, ValueError, "at least as many keys as queries"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4)), {"labels": torch.tensor([0, 1, 5])}, IndexError,
     r"labels must be in \[0, M\) = \[0, 5\), got 5 at position 2"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4)), {"labels": torch.tensor([0, -1, 2])}, IndexError, "got -1"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4)), {"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError,
     "labels must hold integer"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4)), {"labels": torch.tensor([0, 1])}, ValueError,
     r"labels must have shape \(N,\) = \(3,\)"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4)), {"temperature": "10"}, TypeError, "temperature must be a float"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4)), {"temperature": float("nan")}, ValueError,
     "temperature must be finite"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4)), {"bias": torch.zeros(1)}, ValueError,
     "bias must be a float or a 0-dim tensor"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4)), {"bias": torch.tensor(1)}, TypeError,
     "bias must be a float or a floating-point tensor"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 4)), {"reduction": "batchmean"}, ValueError, "reduction must be"),
]


@pytest.mark.parametrize("make,kw,error,match", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input(make, kw, error, match):
    q, k = make()
    with pytest.raises(error, match=match):
        fusedloss.siglip_loss(q, k, backend="cpu", **kw)


def test_op_checks():
    """The C++ ops' own checks, for direct torch.ops calls."""
    if not sig_ops.KERNELS.present("cpp"):
        pytest.skip("the compiled extension has no siglip op")
    op = torch.ops.fusedloss.siglip_fwd
    s = torch.tensor(10.0)
    with pytest.raises(RuntimeError, match="query must be float32 or float64"):
        op(torch.randn(3, 4).half(), torch.randn(3, 4).half(), s, s)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(4, 3).T, torch.randn(3, 4), s, s)
    with pytest.raises(RuntimeError, match="bias must be a 0-dim tensor"):
        op(torch.randn(3, 4), torch.randn(3, 4), s, torch.zeros(1))
    with pytest.raises(IndexError, match="labels must be in"):
        op(torch.randn(3, 4), torch.randn(3, 4), s, s, torch.tensor([0, 3, 1]))


def test_no_queries_no_keys():
    for reduction in REDUCTIONS:
        q = torch.randn(0, 5, requires_grad=True)
        ours = fusedloss.siglip_loss(q, torch.randn(3, 5), reduction=reduction, backend="cpu")
        theirs = reference.siglip_loss(q.detach(), torch.randn(3, 5), reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    # queries against no keys at all with labels: refused (no label can be in range)
    with pytest.raises(IndexError, match="no keys"):
        fusedloss.siglip_loss(torch.randn(2, 5), torch.randn(0, 5), labels=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("edge", ["zero-row", "nan-query", "inf-key", "no-queries", "no-rows"])
def test_16bit_edge_rows(backend, device, edge):
    """bf16 rows with a zero row (F.normalize's eps), a NaN or an inf, or an empty side, against the float64
    reference on the same rows: values, and NaN exactly where it has NaN (loss and gradients)."""
    require_backend(backend, device)
    n, m = {"no-queries": (0, 5), "no-rows": (0, 0)}.get(edge, (4, 5))
    q = torch.randn(n, 6, device=device).bfloat16()
    k = torch.randn(m, 6, device=device).bfloat16()
    if edge == "zero-row":
        q[1] = 0
    elif edge == "nan-query":
        q[2, 3] = float("nan")
    elif edge == "inf-key":
        k[0, 1] = float("inf")
    t, b = torch.tensor(2.0, device=device), torch.tensor(-1.0, device=device)
    g = torch.linspace(0.5, 1.5, n, device=device)
    results = []
    for name, x, y in (("ours", q, k), ("reference", q.double(), k.double())):
        leaves = [x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()]
        kw = dict(temperature=t.to(x.dtype) if name == "reference" else t,
                  bias=b.to(x.dtype) if name == "reference" else b, reduction="none")
        loss = (fusedloss.siglip_loss(*leaves, backend=backend, **kw) if name == "ours"
                else reference.siglip_loss(*leaves, **kw))
        grads = torch.autograd.grad(loss, leaves, g.to(loss.dtype), allow_unused=True) if n else (None, None)
        results.append((loss, grads))
    (loss, grads), (want, want_grads) = results
    assert_close(loss, want, torch.bfloat16, "loss", f"{backend} {edge} loss")
    for got, exp, what in zip(grads, want_grads, ("query", "key")):
        if exp is not None:
            assert_close(got, exp, torch.bfloat16, "grad", f"{backend} {edge} grad {what}")


# --- modules, composition -------------------------------------------------------------------------


def test_module_learnable_is_siglip_init():
    loss_fn = fusedloss.nn.SigLIPLoss(backend="cpu")
    assert math.isclose(float(loss_fn.logit_scale), math.log(10.0), rel_tol=1e-6)
    assert float(loss_fn.logit_bias) == -10.0
    assert [n for n, _ in loss_fn.named_parameters()] == ["logit_scale", "logit_bias"]
    q, k = make_inputs(6, 6, 8, torch.float32, "cpu")
    q.requires_grad_()
    loss = loss_fn(q, k)
    loss.backward()
    t = loss_fn.logit_scale.detach().double().exp().requires_grad_()
    b = loss_fn.logit_bias.detach().double().requires_grad_()
    want = plain_siglip(q.detach().double(), k.double(), t, b)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-5)
    # d/d logit_scale = d/dt * t (t = exp(logit_scale)); d/d logit_bias = d/db
    torch.testing.assert_close(loss_fn.logit_scale.grad.double(), t.grad * t.detach(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(loss_fn.logit_bias.grad.double(), b.grad, rtol=2e-4, atol=1e-5)
    assert "learnable" in repr(loss_fn)


def test_module_fixed_and_build_loss():
    fixed = fusedloss.nn.SigLIPLoss(5.0, -3.0, learnable=False, normalize=False, reduction="sum", backend="cpu")
    assert list(fixed.parameters()) == []
    q, k = torch.randn(4, 6), torch.randn(7, 6)
    labels = torch.tensor([6, 0, 3, 3])
    torch.testing.assert_close(fixed(q, k, labels), fusedloss.siglip_loss(
        q, k, temperature=5.0, bias=-3.0, normalize=False, reduction="sum", labels=labels, backend="cpu"))
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        fusedloss.nn.SigLIPLoss(0.0)
    criterion = fusedloss.build_loss({"losses": [{"name": "siglip_loss", "inputs": ["q", "k"]}]})
    assert [n for n, _ in criterion.named_parameters()] == ["components.siglip_loss.logit_scale",
                                                            "components.siglip_loss.logit_bias"]
    out = criterion({"q": q, "k": torch.randn(4, 6)})
    assert out.shape == () and torch.isfinite(out)


# --- the ops: opcheck, compile, gradcheck ---------------------------------------------------------


def _op_samples(device="cpu", dtype=torch.float32):
    for N, M, D in ((5, 7, 3), (9, 9, 17)):
        q = torch.randn(N, D, device=device, dtype=dtype)
        k = torch.randn(M, D, device=device, dtype=dtype)
        s = torch.tensor(3.0, device=device, dtype=torch.float64)
        b = torch.tensor(-2.0, device=device, dtype=dtype)
        for labels in (None, torch.randint(0, M, (N,), device=device)):
            yield q.clone().requires_grad_(), k.clone().requires_grad_(), s.clone().requires_grad_(), \
                b.clone().requires_grad_(), labels


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    require_backend(backend, device)
    if interpreted(backend, device):
        # Fake tensors cannot run a triton_op on CPU tensors: the interpreter needs real data pointers.
        tests = ("test_schema", "test_autograd_registration")
    else:
        tests = torch.library._OPCHECK_DEFAULT_UTILS
    fwd = sig_ops.KERNELS.fwd(backend)
    for args in _op_samples(device):
        torch.library.opcheck(fwd, args, test_utils=tests)
    if backend == "triton":
        for q, k, s, b, labels in _op_samples(device, torch.bfloat16):
            for normalize in (True, False):
                torch.library.opcheck(sig_ops.ROWS.fwd(backend), (q, k, s, b, normalize, labels), test_utils=tests)
    if backend in ("cpu", "cuda"):
        q, k, s, b, labels = next(_op_samples(device, torch.float64))
        g = torch.randn(q.shape[0], device=device, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fusedloss.siglip_bwd, (g, q.detach(), k.detach(), s.detach(), b.detach(),
                                                                labels))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
def test_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) traces through the op, forward and backward, learnable scalars."""
    require_backend(backend, device)
    q, k = make_inputs(12, 20, 16, torch.float32, device)
    labels = torch.randint(0, 20, (12,), device=device)

    def step(q, k, t, b, backend=backend):
        return fusedloss.siglip_loss(q, k, temperature=t, bias=b, labels=labels, backend=backend)

    torch._dynamo.reset()
    # aot_eager: the whole trace (dynamo fullgraph, the fake kernels, the autograd registration) without
    # inductor's code generation for the surrounding normalization (20 s here for nothing of ours).
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    ins_c = [q.clone().requires_grad_(), k.clone().requires_grad_(),
             torch.tensor(10.0, device=device, requires_grad=True), torch.tensor(-10.0, device=device,
                                                                                 requires_grad=True)]
    ins_r = [x.detach().double().requires_grad_() for x in ins_c]
    out_c = compiled(*ins_c)
    out_r = step(*ins_r, backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, torch.float32, "loss", "compiled")
    for a, r, what in zip(ins_c, ins_r, ("query", "key", "temperature", "bias")):
        assert_close(a.grad, r.grad, torch.float32, "grad", f"compiled {what}")


def test_gradcheck_float64():
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([5, 0, 2, 2, 1])
    for normalize, reduction in ((True, "none"), (False, "mean")):
        assert torch.autograd.gradcheck(
            lambda q, k, t, b: fusedloss.siglip_loss(q, k, temperature=t, bias=b, normalize=normalize, labels=labels,
                                                     reduction=reduction, backend="cpu"), (q, k, t, b))


def test_double_backward_is_a_clear_error():
    q = torch.randn(3, 4, requires_grad=True)
    loss = fusedloss.siglip_loss(q, torch.randn(3, 4), normalize=False, backend="cpu")
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


def test_16bit_rows_make_no_float32_copies():
    """bf16 siglip_loss on the triton backend reads the rows as they are: forward + backward (D = 128: no
    chunked accumulator) hold the bf16 gradients and O(N + M) floats beyond the inputs. The cpu
    backend's float32 copies, normalized, show in the same measure (so it can fail)."""
    assert_16bit_rows_make_no_float32_copies(lambda q, k, backend: fusedloss.siglip_loss(q, k, backend=backend))
