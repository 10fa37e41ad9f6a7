"""fusedloss.kl_div_logits / jsd_logits on every backend against float64 plain-PyTorch formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params, interpreted, poison_cpu_allocator, require_backend, rows, with_reference

import fusedloss
from fusedloss import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BACKENDS = with_reference(("cpu",))

# (name, functional, kwargs): the losses and options every backend runs
LOSSES = [
    ("kl", "kl_div_logits", {}),
    ("kl-T2", "kl_div_logits", {"temperature": 2.0}),
    ("jsd", "jsd_logits", {}),
    ("jsd-b0.2-T3", "jsd_logits", {"beta": 0.2, "temperature": 3.0}),
    ("jsd-b0", "jsd_logits", {"beta": 0.0, "temperature": 1.5}),
    ("jsd-b1", "jsd_logits", {"beta": 1.0}),
]


def expected_rows64(s, t, fn, kw):
    """The loss per row by a plain float64 formula, written apart from fusedloss.reference."""
    T = kw.get("temperature", 1.0)
    log_q = F.log_softmax(s.double() / T, -1)
    log_p = F.log_softmax(t.double() / T, -1)
    if fn == "kl_div_logits":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * T**2
    beta = kw.get("beta", 0.5)
    if beta == 0.0:
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if beta == 1.0:
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))


def reduce64(rows64, kept, reduction, C):
    rows64 = torch.where(kept, rows64, torch.zeros_like(rows64))
    if reduction == "none":
        return rows64
    if reduction == "sum":
        return rows64.sum()
    n = kept.sum()
    return rows64.sum() / (n * C if reduction == "mean" else n)


def make_inputs(N, C, dtype, *, spread=2.0, ignore=True):
    s = (torch.randn(N, C) * spread).to(dtype)
    t = (torch.randn(N, C) * spread).to(dtype)
    target = torch.randint(0, max(C, 1), (N,))
    if ignore and N > 2:
        target[1::3] = -100
    return s, t, target


def run_case(backend, fn, kw, s, t, target, reduction, *, teacher_grad=True):
    """The op's loss and gradients, and the float64 formula's on the same (rounded) inputs."""
    sa = s.detach().clone().requires_grad_()
    ta = t.detach().clone().requires_grad_(teacher_grad)
    poison_cpu_allocator(s.numel() * s.element_size())
    loss = getattr(fusedloss, fn)(sa, ta, target, reduction=reduction, backend=backend, **kw)
    g = torch.randn_like(loss)
    loss.backward(g)
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    kept = torch.ones(s.shape[:-1], dtype=torch.bool) if target is None else target != -100
    ref = reduce64(expected_rows64(s64, t64, fn, kw), kept, reduction, s.shape[-1])
    ref.backward(g.double())
    return loss, sa, ta, ref, s64, t64


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 3, 1000])
@pytest.mark.parametrize("name,fn,kw", LOSSES, ids=[x[0] for x in LOSSES])
def test_matches_formula(backend, device, dtype, C, name, fn, kw):
    require_backend(backend, device) if backend != "reference" else None
    if interpreted(backend, device) and (C == 3 or dtype != torch.float32 and C != 1000):
        pytest.skip("interpreted Triton: fp32 at C=1 and 1000, 16-bit at C=1000 only (time)")
    N = rows(backend, device, 13)
    s, t, target = make_inputs(N, C, dtype)
    loss, sa, ta, ref, s64, t64 = run_case(backend, fn, kw, s, t, target, "batchmean")
    msg = f"{backend} {name} C={C}"
    assert loss.dtype == torch.float32 and sa.grad.dtype == dtype and ta.grad.dtype == dtype
    assert_close(loss, ref, dtype, "loss", msg)
    assert_close(sa.grad, s64.grad, dtype, "grad", msg + " student")
    assert_close(ta.grad, t64.grad, dtype, "grad", msg + " teacher")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("fn,kw", [("kl_div_logits", {"temperature": 1.7}), ("jsd_logits", {"beta": 0.7})],
                         ids=["kl", "jsd"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_reductions(backend, device, reduction, fn, kw, with_target):
    require_backend(backend, device) if backend != "reference" else None
    if interpreted(backend, device) and not with_target and reduction != "mean":
        pytest.skip("interpreted Triton: without a target, the mean only (time)")
    N = rows(backend, device, 10)
    s, t, target = make_inputs(N, 37, torch.float32)
    target = target if with_target else None
    loss, sa, ta, ref, s64, t64 = run_case(backend, fn, kw, s, t, target, reduction)
    assert_close(loss, ref, torch.float32, "loss", reduction)
    assert_close(sa.grad, s64.grad, torch.float32, "grad", reduction)
    assert_close(ta.grad, t64.grad, torch.float32, "grad", reduction)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_equals_torch_kl_div(reduction, T):
    """The API's definition, literally: F.kl_div of the two log-softmaxes times T**2 (cpu backend)."""
    s, t, _ = make_inputs(16, 300, torch.float32)
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction=reduction) * T**2
    got = fusedloss.kl_div_logits(s, t, temperature=T, reduction=reduction, backend="cpu")
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    none = fusedloss.kl_div_logits(s, t, temperature=T, reduction="none", backend="cpu")
    torch.testing.assert_close(none, F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                              reduction="none").sum(-1) * T**2, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn,kw", [LOSSES[1], LOSSES[3]], ids=["kl-T2", "jsd"])
def test_large_vocab_cpu(dtype, name, fn, kw):
    s, t, target = make_inputs(6, 33000, dtype, spread=4.0)
    loss, sa, ta, ref, s64, t64 = run_case("cpu", fn, kw, s, t, target, "sum")
    assert_close(loss, ref, dtype, "loss", name)
    assert_close(sa.grad, s64.grad, dtype, "grad", name)
    assert_close(ta.grad, t64.grad, dtype, "grad", name)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("name,fn,kw", [LOSSES[0], LOSSES[2], LOSSES[4]], ids=["kl", "jsd", "jsd-b0"])
def test_teacher_minus_inf(backend, device, name, fn, kw):
    """Teacher logits of -inf (a masked vocabulary): probability 0, the term 0 (x log x -> 0), finite
    loss and gradients, equal to the reference in float64."""
    require_backend(backend, device) if backend != "reference" else None
    N = rows(backend, device, 6)
    s, t, target = make_inputs(N, 50, torch.float32)
    t[:, 7:19] = float("-inf")
    t[0, 1:] = float("-inf")  # one teacher row with a single finite logit: p is one-hot
    sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = getattr(fusedloss, fn)(sa, ta, target, backend=backend, **kw)
    loss.backward()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = getattr(reference, fn)(s64, t64, target, **kw)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(sa.grad).all()
    assert_close(loss, ref, torch.float32, "loss", name)
    assert_close(sa.grad, s64.grad, torch.float32, "grad", name)
    assert torch.equal(torch.isfinite(ta.grad), torch.isfinite(t64.grad))
    # The teacher's gradient p_k (log p_k - log q_k - K) subtracts the row's KL K, a sum the forward
    # rounded to float32: where p is one-hot the exact value is 0 and a correct kernel is off by an
    # ulp of K times the row's coefficient (c K = dloss/drow * loss_row / T), so that is the scale.
    rows64 = getattr(reference, fn)(s.double(), t.double(), target, reduction="none", **kw)
    per_row = 1.0 / (target != -100).sum().item()  # batchmean
    scale = per_row * rows64.abs().max().item() / kw.get("temperature", 1.0)
    assert_close(ta.grad, t64.grad, torch.float32, "grad", name, scale=max(scale, t64.grad.abs().max().item()))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_all_ignored(backend, device):
    require_backend(backend, device) if backend != "reference" else None
    s, t, _ = make_inputs(4, 9, torch.float32)
    target = torch.full((4,), -100)
    for fn in ("kl_div_logits", "jsd_logits"):
        sa = s.clone().requires_grad_()
        total = getattr(fusedloss, fn)(sa, t, target, reduction="sum", backend=backend)
        total.backward()
        assert total.item() == 0.0 and torch.count_nonzero(sa.grad) == 0
        assert getattr(fusedloss, fn)(s, t, target, backend=backend).isnan()  # batchmean of no row: 0 / 0
        assert torch.count_nonzero(getattr(fusedloss, fn)(s, t, target, reduction="none", backend=backend)) == 0


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_layouts(backend, device):
    """Rows with a stride (a slice of a wider buffer), class-strided (transposed) inputs, leading dims."""
    require_backend(backend, device) if backend != "reference" else None
    base_s = torch.randn(6, 80)
    base_t = torch.randn(80, 6)
    s = base_s[:, 5:45]  # row stride 80
    t = base_t[5:45].T  # class stride 6
    target = torch.tensor([0, -100, 3, 1, 2, 9])
    loss, sa, ta, ref, s64, t64 = run_case(backend, "jsd_logits", {"beta": 0.3}, s, t, target, "none")
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(sa.grad, s64.grad, torch.float32, "grad")
    s3 = torch.randn(2, 3, 40)
    t3 = torch.randn(2, 3, 40)
    tg = torch.tensor([[1, -100, 2], [0, 0, -100]])
    loss, sa, ta, ref, s64, t64 = run_case(backend, "kl_div_logits", {"temperature": 2.0}, s3, t3, tg, "none")
    assert loss.shape == (2, 3)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(sa.grad, s64.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_teacher_without_grad(backend, device):
    """A frozen teacher gets no gradient and costs none; the student's gradient is unchanged."""
    require_backend(backend, device) if backend != "reference" else None
    s, t, target = make_inputs(rows(backend, device, 8), 64, torch.float32)
    loss, sa, ta, ref, s64, t64 = run_case(backend, "kl_div_logits", {}, s, t, target, "batchmean",
                                           teacher_grad=False)
    assert ta.grad is None
    assert_close(sa.grad, s64.grad, torch.float32, "grad")


def test_teacher_dtype_cast():
    s, t, target = make_inputs(5, 30, torch.bfloat16)
    t32 = t.float().requires_grad_()
    loss = fusedloss.kl_div_logits(s.requires_grad_(), t32, target, backend="cpu")
    loss.backward()
    assert t32.grad.dtype == torch.float32
    ref = reference.kl_div_logits(s.double(), t.double(), target)
    assert_close(loss, ref, torch.bfloat16, "loss")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("fn,kw", [("kl_div_logits", {"temperature": 1.3}), ("jsd_logits", {"beta": 0.35}),
                                   ("jsd_logits", {"beta": 1.0, "temperature": 0.7})], ids=["kl", "jsd", "rkl"])
def test_gradcheck_float64(backend, fn, kw):
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 2, 0])
    f = lambda s, t: getattr(fusedloss, fn)(s, t, target, reduction="none", backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (s, t))


def _op_samples():
    s, t, target = make_inputs(6, 29, torch.float32)
    yield (s.requires_grad_(), t.requires_grad_(), target, -100, 1.0, 0.0, False)
    yield (s, t, None, -100, 2.0, 0.4, True)
    yield (s, t.detach(), target, 2, 0.5, 1.0, True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    require_backend(backend, device)
    tests = ("test_schema", "test_autograd_registration") if interpreted(backend, device) else \
        torch.library._OPCHECK_DEFAULT_UTILS
    fwd = fusedloss.ops.kl_div.KERNELS.fwd(backend)
    for args in _op_samples():
        torch.library.opcheck(fwd, args, test_utils=tests)
    if backend == "cpu":
        s, t, target, *scalars = next(_op_samples())
        loss, stats = fwd(s.detach(), t.detach(), target, *scalars)
        for teacher_grad in (False, True):
            torch.library.opcheck(torch.ops.fusedloss.kl_div_bwd,
                                  (torch.randn(6), s.detach(), t.detach(), target, stats, *scalars, teacher_grad))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
@pytest.mark.parametrize("fn", ["kl_div_logits", "jsd_logits"])
def test_compile_fullgraph(backend, device, fn):
    require_backend(backend, device)
    s, t, target = make_inputs(12, 70, torch.float32)
    step = lambda s, t: getattr(fusedloss, fn)(s, t, target, temperature=1.25, backend=backend)  # noqa: E731
    torch._dynamo.reset()
    sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
    sb, tb = s.clone().requires_grad_(), t.clone().requires_grad_()
    out_c = torch.compile(step, fullgraph=True)(sa, ta)
    out_e = step(sb, tb)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(sa.grad, sb.grad)
    torch.testing.assert_close(ta.grad, tb.grad)


def test_deterministic():
    s, t, target = make_inputs(64, 5000, torch.float32)
    outs = []
    for _ in range(2):
        sa = s.clone().requires_grad_()
        loss = fusedloss.jsd_logits(sa, t, target, backend="cpu")
        loss.backward()
        outs.append((loss, sa.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("fn", ["kl_div_logits", "jsd_logits"])
def test_bad_input(fn):
    f = getattr(fusedloss, fn)
    s, t, target = make_inputs(4, 6, torch.float32)
    cases = [
        ((s.long(), t), {}, TypeError, "student"),
        ((s, t.long()), {}, TypeError, "teacher"),
        ((s, t[:, :5]), {}, ValueError, "teacher"),
        ((s, t, target.float()), {}, TypeError, "target"),
        ((s, t, target[:3]), {}, ValueError, "target"),
        ((s, t), {"temperature": 0.0}, ValueError, "temperature"),
        ((s, t), {"reduction": "avg"}, ValueError, "reduction"),
        ((s, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ((s[:, :0], t[:, :0]), {}, ValueError, "student"),
        ((s, t), {"backend": "nope"}, ValueError, "backend"),
    ]
    if fn == "jsd_logits":
        cases.append(((s, t), {"beta": 1.5}, ValueError, "beta"))
    for args, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            f(*args, **kw)


def test_modules_and_build_loss():
    s, t, target = make_inputs(6, 20, torch.float32)
    kl = fusedloss.nn.KLDivLogitsLoss(temperature=2.0, backend="cpu")
    jsd = fusedloss.nn.JSDLogitsLoss(0.3, reduction="sum", backend="cpu")
    torch.testing.assert_close(kl(s, t, target), fusedloss.kl_div_logits(s, t, target, temperature=2.0))
    torch.testing.assert_close(jsd(s, t), fusedloss.jsd_logits(s, t, beta=0.3, reduction="sum"))
    loss = fusedloss.build_loss({"losses": [
        {"name": "kl_div_logits", "weight": 0.5, "params": {"temperature": 2.0},
         "inputs": {"student": "logits", "teacher": "teacher_logits"}},
        {"name": "jsd_logits", "params": {"beta": 0.2}, "inputs": ["logits", "teacher_logits"]}]})
    out = loss({"logits": s, "teacher_logits": t})
    expected = 0.5 * fusedloss.kl_div_logits(s, t, temperature=2.0) + fusedloss.jsd_logits(s, t, beta=0.2)
    torch.testing.assert_close(out, expected)
