"""cross_entropy with probability targets (float targets of the input's shape) on every backend, against
torch's F.cross_entropy with probability targets in float64 and against fusedloss.reference in float64
(the ground truth of the extras torch lacks: z_loss, softcap, temperature, return_lse)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params, interpreted, poison_cpu_allocator, require_backend, rows, with_reference

import fusedloss
from fusedloss import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BACKENDS = with_reference(("cpu",))
EVERYTHING = dict(weight=True, label_smoothing=0.15, z_loss=1e-2, softcap=6.0, temperature=0.8, return_lse=True)


def require(backend, device):
    if backend != "reference":
        require_backend(backend, device)


def make_target(shape, cdim, dtype, *, zeros=0.25, scale=1.0):
    """Softmax rows of random logits with about ``zeros`` of the probabilities set to 0, times ``scale``
    (rows that do not sum to 1), rounded to ``dtype``."""
    p = torch.softmax(torch.randn(shape) * 2, cdim)
    p = torch.where(torch.rand(shape) < zeros, torch.zeros_like(p), p) * scale
    return p.to(dtype)


def make_inputs(shape, dtype, *, weight=False, scale=1.0):
    cdim = 0 if len(shape) == 1 else 1
    x = (torch.randn(shape) * 3).to(dtype)
    t = make_target(shape, cdim, dtype, scale=scale)
    w = torch.rand(shape[cdim]) + 0.5 if weight else None
    return x, t, w


def split(opts):
    kw = dict(opts)
    return kw.pop("weight", False), kw


def run(backend, x, t, w, reduction, kw, *, target_grad=True):
    """The op's outputs and gradients (input, target) through random upstream gradients, and the float64
    reference's on the same (rounded) inputs."""
    xa = x.detach().clone().requires_grad_()
    ta = t.detach().clone().requires_grad_(target_grad)
    out = fusedloss.cross_entropy(xa, ta, w, reduction=reduction, backend=backend, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    ref = reference.cross_entropy(x64, t64, None if w is None else w.double(), reduction=reduction, **kw)
    refs = ref if isinstance(ref, tuple) else (ref,)
    sum((o * u).sum() for o, u in zip(refs, ups)).backward()
    return outs, xa, ta, refs, x64, t64


def torch64(x, t, w, reduction, label_smoothing=0.0):
    """torch's own loss with probability targets, in float64."""
    return F.cross_entropy(x.double(), t.double(), None if w is None else w.double(), reduction=reduction,
                           label_smoothing=label_smoothing)


# --- every backend against the float64 reference, forward and both gradients ----------------------


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("C", [1, 37, 4099])
@pytest.mark.parametrize("opts", ["plain", "everything"])
def test_matches_reference(backend, device, dtype, C, opts):
    require(backend, device)
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 is a CPU-backend dtype")
    if interpreted(backend, device) and dtype != torch.float32 and C != 4099:
        pytest.skip("interpreted Triton: 16-bit at C=4099 only (time)")
    use_weight, kw = split(EVERYTHING if opts == "everything" else {})
    N = 3 if interpreted(backend, device) and C > 1000 else rows(backend, device, 13)
    x, t, w = make_inputs((N, C), dtype, weight=use_weight)
    poison_cpu_allocator()
    outs, xa, ta, refs, x64, t64 = run(backend, x, t, w, "mean", kw)
    msg = f"{backend} C={C} {opts}"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(o.dtype == acc for o in outs) and xa.grad.dtype == dtype and ta.grad.dtype == dtype
    assert_close(outs[0], refs[0], dtype, "loss", msg)
    if kw.get("return_lse"):
        assert outs[1].shape == (N,)
        assert_close(outs[1], refs[1], dtype, "loss", msg + " lse")
    assert_close(xa.grad, x64.grad, dtype, "grad", msg + " input")
    assert_close(ta.grad, t64.grad, dtype, "grad", msg + " target")
    if opts == "plain":  # and torch's own answer (z-loss, softcap, temperature are not torch's)
        assert_close(outs[0], torch64(x, t, None, "mean"), dtype, "loss", msg + " vs F.cross_entropy")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(11,), (6, 11), (4, 11, 3), (2, 11, 3, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_semantics(backend, device, shape, reduction):
    """torch's F.cross_entropy with probability targets, class weights and label smoothing, in float64:
    mean divides by the number of elements, not by a weight sum; none has the target's shape without
    the class dimension."""
    require(backend, device)
    if interpreted(backend, device) and len(shape) == 4 and reduction != "none":
        pytest.skip("interpreted Triton: the 4-D shape with reduction none only (time)")
    x, t, w = make_inputs(shape, torch.float32, weight=True)
    t = t * 1.3  # rows summing to 1.3: torch does not normalize them
    xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
    out = fusedloss.cross_entropy(xa, ta, w, reduction=reduction, label_smoothing=0.2, backend=backend)
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    want = torch64(x64, t64, w, reduction, label_smoothing=0.2)
    expected_shape = () if reduction != "none" or len(shape) == 1 else shape[:1] + shape[2:]
    assert out.shape == expected_shape and want.shape == expected_shape
    assert_close(out, want, torch.float32, "loss", f"{backend} {shape} {reduction}")
    g = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * g).sum().backward()
    (want * g).sum().backward()
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "input")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "target")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_and_reduction(backend, device, reduction):
    """weight, label_smoothing, z_loss, softcap, temperature and return_lse together on (N, C, d1) input
    (the row layout helpers), the lse differentiated too."""
    require(backend, device)
    N = rows(backend, device, 6) // 2 + 1
    use_weight, kw = split(EVERYTHING)
    x, t, w = make_inputs((N, 29, 2), torch.float32, weight=use_weight, scale=0.7)
    outs, xa, ta, refs, x64, t64 = run(backend, x, t, w, reduction, kw)
    assert outs[1].shape == (N, 2) and outs[1].dtype == torch.float32
    for o, r, name in zip(outs, refs, ("loss", "lse")):
        assert_close(o, r, torch.float32, "loss", f"{backend} {reduction} {name}")
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "input")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "target")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_weight(backend, device, reduction):
    """token_weight multiplies each element's loss; mean divides by its sum (torch's mean when all are 1)."""
    require(backend, device)
    x, t, w = make_inputs((rows(backend, device, 4), 19, 2), torch.float32, weight=True)
    u = torch.rand(x.shape[0], 2) * 2
    kw = {"token_weight": u, "label_smoothing": 0.1}
    outs, xa, ta, refs, x64, t64 = run(backend, x, t, w, reduction, kw)
    assert_close(outs[0], refs[0], torch.float32, "loss", f"token_weight {reduction}")
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "token_weight input")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "token_weight target")
    ones = fusedloss.cross_entropy(x, t, w, token_weight=torch.ones(x.shape[0], 2), reduction=reduction,
                                   backend=backend)
    torch.testing.assert_close(ones.double(), torch64(x, t, w, reduction), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_error_against_plain_pytorch(backend, device, dtype):
    """The 16-bit rule: the error against float64 is within a small multiple of plain PyTorch's in the
    same dtype (F.cross_entropy on 16-bit logits and targets), for the loss and both gradients."""
    require_backend(backend, device)
    N = rows(backend, device, 32)
    x, t, w = make_inputs((N, 300), dtype, weight=True)

    def grads(fn):
        xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(xa, ta)
        return (loss, *torch.autograd.grad(loss, (xa, ta)))

    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    ref = torch64(x64, t64, w, "mean", label_smoothing=0.1)
    exact = (ref, *torch.autograd.grad(ref, (x64, t64)))
    ours = grads(lambda a, b: fusedloss.cross_entropy(a, b, w, label_smoothing=0.1, backend=backend))
    plain = grads(lambda a, b: F.cross_entropy(a, b, w.to(dtype), label_smoothing=0.1))
    for name, o, p, e in zip(("loss", "grad input", "grad target"), ours, plain, exact):
        err_ours = (o.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6 * e.abs().max().item(), (name, err_ours, err_plain)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_layouts(backend, device):
    """Rows with a stride (slices of wider buffers), a class-strided (transposed) input, an expanded
    target (rows sharing memory) and a channels-last (N, C, d1, d2) input."""
    require(backend, device)
    base_x, base_t = torch.randn(6, 80), torch.rand(6, 90)
    x, t = base_x[:, 5:45], base_t[:, 30:70]  # row strides 80 and 90
    outs, xa, ta, refs, x64, t64 = run(backend, x, t, None, "none", {"label_smoothing": 0.1})
    assert_close(outs[0], refs[0], torch.float32, "loss", "strided rows")
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "strided rows")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "strided rows target")
    xt = torch.randn(40, 6).T  # class stride 6
    te = torch.rand(1, 40).expand(6, 40)  # row stride 0
    outs, xa, ta, refs, x64, t64 = run(backend, xt, te, None, "sum", {}, target_grad=False)
    assert ta.grad is None
    assert_close(outs[0], refs[0], torch.float32, "loss", "transposed")
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "transposed")
    x4 = torch.randn(2, 9, 3, 2).to(memory_format=torch.channels_last)
    t4 = make_target((2, 9, 3, 2), 1, torch.float32).to(memory_format=torch.channels_last)
    outs, xa, ta, refs, x64, t64 = run(backend, x4, t4, None, "none", {"softcap": 5.0})
    assert outs[0].shape == (2, 3, 2)
    assert_close(outs[0], refs[0], torch.float32, "loss", "channels-last")
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "channels-last")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "channels-last target")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_edge_targets(backend, device):
    """Zero-probability targets (a row of zeros, one-hot rows), rows summing to 3, a -inf logit where
    the target is positive (inf, as torch) and where it is 0 (0 * -inf = NaN, as torch), against torch
    in float64."""
    require(backend, device)
    x = torch.randn(6, 10)
    t = make_target((6, 10), 1, torch.float32)
    t[0] = 0.0
    t[1] = torch.nn.functional.one_hot(torch.tensor(3), 10).float()
    t[2] *= 3.0
    x[3, 4], t[3, 4] = float("-inf"), 0.5
    x[4, 7], t[4, 7] = float("-inf"), 0.0
    x[5] = 1e30  # huge equal logits: log C each
    ours = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    theirs = torch64(x, t, None, "none")
    assert torch.isinf(ours[3]) and torch.isnan(ours[4])
    torch.testing.assert_close(ours.double(), theirs, equal_nan=True, rtol=2e-5, atol=1e-5)
    # the gradients of the finite rows, input and target
    keep = [0, 1, 2, 5]
    xa, ta = x[keep].clone().requires_grad_(), t[keep].clone().requires_grad_()
    fusedloss.cross_entropy(xa, ta, reduction="sum", backend=backend).backward()
    x64, t64 = x[keep].double().requires_grad_(), t[keep].double().requires_grad_()
    torch64(x64, t64, None, "sum").backward()
    assert_close(xa.grad, x64.grad, torch.float32, "grad", "edge input")
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "edge target")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_target_gradient_alone(backend, device):
    """Only the target requires grad (a learned label distribution): -g (1 - eps) w_j log p_j; a float32
    target of bfloat16 logits is read in float32 and gets a float32 gradient."""
    require(backend, device)
    x, t, w = make_inputs((rows(backend, device, 7), 33), torch.float32, weight=True)
    ta = t.clone().requires_grad_()
    fusedloss.cross_entropy(x, ta, w, label_smoothing=0.3, backend=backend).backward()
    t64 = t.double().requires_grad_()
    torch64(x, t64, w, "mean", label_smoothing=0.3).backward()
    assert_close(ta.grad, t64.grad, torch.float32, "grad", "target alone")
    xb = x.bfloat16()
    ta = t.clone().requires_grad_()
    loss = fusedloss.cross_entropy(xb, ta, w, backend=backend)
    loss.backward()
    t64 = t.double().requires_grad_()
    ref = torch64(xb, t64, w, "mean")  # the float32 target, unrounded
    ref.backward()
    assert ta.grad.dtype == torch.float32
    assert_close(loss, ref, torch.float32, "loss", "bf16 logits, fp32 target")
    assert_close(ta.grad, t64.grad, torch.bfloat16, "grad", "bf16 logits, fp32 target")


@pytest.mark.parametrize("N,C", [(3, 70000), (40, 3000)])
def test_long_rows_cpu(N, C):
    """The CPU kernel's two forward plans: few long rows cut into pieces merged in order (N < 16,
    C > 32768), and whole rows per thread; each deterministic run to run."""
    x, t, w = make_inputs((N, C), torch.float32, weight=True)
    results = []
    for _ in range(2):
        torch.manual_seed(N)  # the same upstream gradients in both runs
        outs, xa, ta, refs, x64, t64 = run("cpu", x, t, w, "sum", {"label_smoothing": 0.05})
        results.append((outs[0], xa.grad, ta.grad))
    assert_close(results[0][0], refs[0], torch.float32, "loss", "long rows")
    assert_close(results[0][1], x64.grad, torch.float32, "grad", "long rows")
    assert_close(results[0][2], t64.grad, torch.float32, "grad", "long rows target")
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_gradcheck_float64():
    """loss, lse and entropy together, and the entropy alone."""
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64) + 0.5
    f = lambda x, t: fusedloss.cross_entropy(x, t, w, reduction="none", label_smoothing=0.2, z_loss=0.1,  # noqa: E731
                                             softcap=3.0, temperature=1.3, return_lse=True, return_entropy=True,
                                             backend="cpu")
    assert torch.autograd.gradcheck(f, (x, t))
    assert torch.autograd.gradcheck(lambda x: f(x, t.detach())[2], (x,))


def _op_samples(device="cpu"):
    x, t, w = make_inputs((5, 23), torch.float32, weight=True)
    yield (x.requires_grad_(), t.requires_grad_(), None, 0.0, 0.0, 0.0, 1.0)
    yield (x, t.detach(), w.contiguous(), 0.2, 0.01, 4.0, 0.7)
    yield (x.bfloat16(), t.detach(), None, 0.1, 0.0, 0.0, 1.0)  # float32 target of bfloat16 logits
    yield (x, t, None, 0.0, 0.0, 0.0, 1.0, True)  # with the entropy
    yield (x, t.detach(), w.contiguous(), 0.2, 0.01, 4.0, 0.7, True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    require_backend(backend, device)
    tests = ("test_schema", "test_autograd_registration") if interpreted(backend, device) else \
        torch.library._OPCHECK_DEFAULT_UTILS
    ops = fusedloss.ops.soft_cross_entropy
    fwd, bwd = ops.KERNELS.fwd(backend), ops.KERNELS.bwd(backend)
    for args in _op_samples():
        torch.library.opcheck(fwd, args, test_utils=tests)
    if not interpreted(backend, device):
        x, t, w, *scalars = next(_op_samples())
        loss, lse, stats, _ = fwd(x.detach(), t.detach(), w, *scalars)
        for target_grad in (False, True):
            torch.library.opcheck(bwd, (torch.randn(5), torch.randn(5), x.detach(), t.detach(), w, stats, *scalars,
                                        target_grad))
        loss, lse, stats, h = fwd(x.detach(), t.detach(), w, *scalars, True)
        assert stats.shape == (5, 4) and h.shape == (5,)
        torch.library.opcheck(bwd, (torch.randn(5), None, x.detach(), t.detach(), w, stats, *scalars, True,
                                    torch.randn(5)))


@pytest.mark.parametrize("extra", ["lse", "entropy"])
def test_compile_fullgraph(extra):
    x, t, w = make_inputs((12, 70), torch.float32, weight=True)

    def step(x, t):
        if extra == "entropy":
            loss, h = fusedloss.cross_entropy(x, t, w, label_smoothing=0.1, softcap=5.0, return_entropy=True,
                                              backend="cpu")
            return loss - 0.01 * h.mean()
        loss, lse = fusedloss.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3, return_lse=True, backend="cpu")
        return loss + lse.mean()

    torch._dynamo.reset()
    xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
    xb, tb = x.clone().requires_grad_(), t.clone().requires_grad_()
    out_c = torch.compile(step, fullgraph=True)(xa, ta)
    out_e = step(xb, tb)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ta.grad, tb.grad)


def test_bad_input():
    x, t, _ = make_inputs((4, 6), torch.float32)
    f = fusedloss.cross_entropy
    cases = [
        ((x, t[:, :5]), {}, ValueError, "probability targets must have the input's shape"),
        ((x, t), {"ignore_index": 2}, ValueError, "ignore_index"),
        ((x, t, torch.ones(5)), {}, ValueError, "weight"),
        ((x, t.to("meta")), {}, RuntimeError, "target is on meta"),
        ((x, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ((x, t), {"reduction": "avg"}, ValueError, "reduction"),
        ((x.long(), t), {}, TypeError, "input"),
    ]
    for args, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            f(*args, backend="cpu", **kw)
    # the kernel ops' own checks, called directly
    fwd = torch.ops.fusedloss.soft_cross_entropy_fwd
    for args, word in [((x, t[:, :5], None), "target must have logits' shape"),
                       ((x, t.half(), None), "target must be"),
                       ((x, t, torch.ones(5)), "weight must have shape"),
                       ((x, t, torch.ones(6, dtype=torch.float64)), "weight must be"),
                       ((x.T, t.T, None), "unit stride")]:
        with pytest.raises(RuntimeError, match=word):
            fwd(*args, 0.0, 0.0, 0.0, 1.0)
    loss, lse, stats, _ = fwd(x, t, None, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.fusedloss.soft_cross_entropy_bwd(torch.ones(4), None, x, t, None, stats[:, :2].contiguous(),
                                                   0.0, 0.0, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="grad_loss"):
        torch.ops.fusedloss.soft_cross_entropy_bwd(torch.ones(3), None, x, t, None, stats, 0.0, 0.0, 0.0, 1.0, False)


# --- return_entropy: the softmax's entropy from the same pass (math header (6)) -------------------


def transform64(x64, softcap=None, temperature=1.0):
    z = softcap * torch.tanh(x64 / softcap) if softcap else x64
    return z / temperature


def formulas64(x64, t64, w64, kw, reduction):
    """(loss, lse, entropy) in float64, straight from the definitions (not from fusedloss): the loss
    -sum_j w_j t'_j log p_j + z_loss lse^2 per element, times token_weight, reduced as torch; the lse and
    the entropy -sum_j p_j log p_j of the transformed logits per element."""
    cdim = 0 if x64.dim() == 1 else 1
    C = x64.shape[cdim]
    z = transform64(x64, kw.get("softcap"), kw.get("temperature", 1.0))
    logp = torch.log_softmax(z, cdim)
    lse = torch.logsumexp(z, cdim)
    eps = kw.get("label_smoothing", 0.0)
    v = (1 - eps) * t64 + eps / C
    if w64 is not None:
        v = v * w64.view([C] + [1] * (x64.dim() - cdim - 1))
    loss = -(v * logp).sum(cdim) + kw.get("z_loss", 0.0) * lse**2
    u = kw.get("token_weight")
    if u is not None:
        loss = loss * u.double()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (loss.numel() if u is None else u.double().sum())
    entropy = -(logp.exp() * logp).sum(cdim)
    return loss, lse, entropy


def run_entropy(backend, x, t, w, reduction, kw, weights=(1.0, 1.0, 1.0), target_grad=True):
    """cross_entropy(..., return_lse=True, return_entropy=True) and the float64 formulas on the same
    (rounded) inputs, both differentiated through sum_k weights[k] * <output_k, random upstream>: a 0 weight
    leaves that output out of the backward (the entropy alone: weights (0, 0, 1))."""
    xa = x.detach().clone().requires_grad_()
    ta = t.detach().clone().requires_grad_(target_grad)
    outs = fusedloss.cross_entropy(xa, ta, w, reduction=reduction, return_lse=True, return_entropy=True,
                                   backend=backend, **kw)
    assert isinstance(outs, tuple) and len(outs) == 3
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(target_grad)
    refs = formulas64(x64, t64, None if w is None else w.double(), kw, reduction)
    ups = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    sum((o.double() * u).sum() * k for o, u, k in zip(outs, ups, weights) if k).backward()
    sum((r * u).sum() * k for r, u, k in zip(refs, ups, weights) if k).backward()
    return outs, xa, ta, refs, x64, t64


def check_entropy_run(run_out, dtype, msg, target_grad=True):
    outs, xa, ta, refs, x64, t64 = run_out
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(o.dtype == acc for o in outs), msg
    for o, r, name in zip(outs, refs, ("loss", "lse", "entropy")):
        assert_close(o, r, dtype, "loss", f"{msg} {name}")
    assert_close(xa.grad, x64.grad, dtype, "grad", msg + " input")
    if target_grad:
        assert_close(ta.grad, t64.grad, dtype, "grad", msg + " target")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("opts", ["plain", "everything"])
def test_entropy_matches_formulas(backend, device, dtype, opts):
    """Every backend and dtype against the float64 formulas: loss, lse and entropy, and the gradients of
    the input and the target through all three."""
    require(backend, device)
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 is a CPU-backend dtype")
    use_weight, kw = split(EVERYTHING if opts == "everything" else {})
    kw.pop("return_lse", None)
    C = 37 if interpreted(backend, device) else 1031
    x, t, w = make_inputs((rows(backend, device, 13), C), dtype, weight=use_weight)
    poison_cpu_allocator()
    check_entropy_run(run_entropy(backend, x, t, w, "mean", kw), dtype, f"{backend} {opts}")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("through", ["entropy alone", "loss + entropy"])
def test_entropy_gradients_every_option(backend, device, reduction, through):
    """(N, C, d) input with weight, label_smoothing, z_loss, softcap, temperature and token_weight, every
    reduction: the gradient through the entropy alone (the loss and lse unused) and through loss + entropy."""
    require(backend, device)
    N = rows(backend, device, 6) // 2 + 1
    use_weight, kw = split(EVERYTHING)
    kw.pop("return_lse")
    x, t, w = make_inputs((N, 29, 2), torch.float32, weight=use_weight, scale=0.7)
    kw["token_weight"] = torch.rand(N, 2) * 2
    weights = (0.0, 0.0, 1.0) if through == "entropy alone" else (1.0, 0.0, 1.0)
    out = run_entropy(backend, x, t, w, reduction, kw, weights)
    assert out[0][2].shape == (N, 2) and out[0][1].shape == (N, 2)
    alone = through == "entropy alone"
    check_entropy_run(out, torch.float32, f"{backend} {reduction} {through}", target_grad=not alone)
    if alone:  # the entropy does not depend on the target: none, or zeros where the op was asked for one
        assert out[2].grad is None or not out[2].grad.any()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_entropy_layouts(backend, device):
    """Strided rows, a class-strided (transposed) input with an expanded target, channels-last
    (N, C, d1, d2) and an unbatched (C,) input (a 0-dim entropy); the outputs in the order (loss, lse,
    entropy), or (loss, entropy) without return_lse."""
    require(backend, device)
    base_x, base_t = torch.randn(6, 80), torch.rand(6, 90)
    x, t = base_x[:, 5:45], base_t[:, 30:70]
    check_entropy_run(run_entropy(backend, x, t, None, "none", {"label_smoothing": 0.1}), torch.float32, "strided")
    xt, te = torch.randn(40, 6).T, torch.rand(1, 40).expand(6, 40)
    check_entropy_run(run_entropy(backend, xt, te, None, "sum", {}, target_grad=False), torch.float32, "transposed",
                      target_grad=False)
    x4 = torch.randn(2, 9, 3, 2).to(memory_format=torch.channels_last)
    t4 = make_target((2, 9, 3, 2), 1, torch.float32).to(memory_format=torch.channels_last)
    out = run_entropy(backend, x4, t4, None, "none", {"softcap": 5.0})
    assert out[0][2].shape == (2, 3, 2)
    check_entropy_run(out, torch.float32, "channels-last")
    x1, t1 = make_inputs((11,), torch.float32)[:2]
    out = run_entropy(backend, x1, t1, None, "mean", {"temperature": 2.0})
    assert out[0][2].shape == ()
    check_entropy_run(out, torch.float32, "unbatched")
    loss, h = fusedloss.cross_entropy(x, t, reduction="none", return_entropy=True, backend=backend)
    assert_close(h, formulas64(x.double(), t.double(), None, {}, "none")[2], torch.float32, "loss", "no lse")


@pytest.mark.parametrize("backend,device", with_reference())
def test_entropy_infinite_logits(backend, device):
    """-inf logits have p = 0: they add nothing to the entropy (0 log 0 = 0) and its gradient there is 0,
    not NaN, also where the loss itself is NaN (a 0 target next to a -inf logit, as torch)."""
    require_backend(backend, device)
    x = torch.randn(3, 9)
    x[:, 2] = float("-inf")
    x[1, 5:] = float("-inf")
    t = make_target((3, 9), 1, torch.float32, zeros=0.0)
    t[:, 2] = 0.0  # the loss: 0 * -inf = NaN on those rows, as torch
    xa = x.clone().requires_grad_()
    loss, h = fusedloss.cross_entropy(xa, t, reduction="none", return_entropy=True, backend=backend)
    assert torch.isnan(loss).all()
    x64 = x.double()
    p, logp = torch.softmax(x64, 1), torch.log_softmax(x64, 1).nan_to_num(neginf=0.0)
    h64 = -(p * logp).sum(1)
    assert_close(h, h64, torch.float32, "loss", "entropy")
    g = torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((h.double() * g).sum(), xa)
    expected = -p * (logp + h64[:, None]) * g[:, None]
    assert torch.isfinite(grad).all()
    assert_close(grad, expected, torch.float32, "grad", "entropy gradient")


@pytest.mark.parametrize("N,C", [(3, 70000), (40, 3000)])
def test_entropy_long_rows_cpu(N, C):
    """The CPU forward's two plans with the entropy (rows cut into pieces merged in order, and whole rows
    per thread), each deterministic run to run."""
    x, t, w = make_inputs((N, C), torch.float32, weight=True)
    results = []
    for _ in range(2):
        torch.manual_seed(N)
        out = run_entropy("cpu", x, t, w, "sum", {"label_smoothing": 0.05})
        results.append((*out[0], out[1].grad, out[2].grad))
    check_entropy_run(out, torch.float32, "long rows")
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_entropy_16bit_error_against_plain_pytorch(backend, device, dtype):
    """The 16-bit rule for the entropy and its gradient: the error against float64 within a small
    multiple of plain PyTorch's in the same dtype (-(softmax * log_softmax).sum on 16-bit logits)."""
    require_backend(backend, device)
    x, t, _ = make_inputs((rows(backend, device, 32), 300), dtype)

    def value_and_grad(fn):
        xa = x.clone().requires_grad_()
        h = fn(xa)
        return h, torch.autograd.grad(h.sum(), xa)[0]

    ours = value_and_grad(lambda a: fusedloss.cross_entropy(a, t, reduction="none", return_entropy=True,
                                                            backend=backend)[1])
    plain = value_and_grad(lambda a: -(torch.softmax(a, 1) * torch.log_softmax(a, 1)).sum(1))
    exact = value_and_grad(lambda a: -(torch.softmax(a.double(), 1) * torch.log_softmax(a.double(), 1)).sum(1))
    for name, o, p, e in zip(("entropy", "grad"), ours, plain, exact):
        err_ours = (o.double() - e.double()).abs().max().item()
        err_plain = (p.double() - e.double()).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6 * e.double().abs().max().item(), (name, err_ours, err_plain)


def test_entropy_bad_input():
    """The backward op refuses an entropy gradient without the forward's (N, 4) stats, and a misshaped one."""
    x, t, _ = make_inputs((4, 6), torch.float32)
    fwd, bwd = torch.ops.fusedloss.soft_cross_entropy_fwd, torch.ops.fusedloss.soft_cross_entropy_bwd
    _, _, stats3, h0 = fwd(x, t, None, 0.0, 0.0, 0.0, 1.0)
    assert stats3.shape == (4, 3) and h0.shape == (0,)
    with pytest.raises(RuntimeError, match="grad_entropy needs the forward's"):
        bwd(torch.ones(4), None, x, t, None, stats3, 0.0, 0.0, 0.0, 1.0, False, torch.ones(4))
    _, _, stats4, _ = fwd(x, t, None, 0.0, 0.0, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="grad_entropy must have shape"):
        bwd(torch.ones(4), None, x, t, None, stats4, 0.0, 0.0, 0.0, 1.0, False, torch.ones(3))
