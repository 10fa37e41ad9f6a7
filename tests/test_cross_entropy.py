"""fusedloss.cross_entropy on every backend against the float64 reference (and the reference against torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (DEVICES, TOL, assert_close, backend_params, interpreted, poison_cpu_allocator, require_backend,
                      rows, with_reference, torch_loss_shape)

import fusedloss
from fusedloss import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.25},
    "z_loss": {"z_loss": 1e-3},
    "softcap+temperature": {"softcap": 5.0, "temperature": 0.7},
    "in-range ignore_index": {"ignore_index": 3},
    "everything": {"weight": True, "label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0, "temperature": 1.3},
}


def make_inputs(N, C, dtype, device, *, ignore_index=-100, scale=3.0, weight=False, ignore_some=True):
    x = (torch.randn(N, C, device=device) * scale).to(dtype)
    t = torch.randint(0, C, (N,), device=device)
    if ignore_some and N > 1:
        t[::3] = ignore_index  # every third row ignored (including row 0)
    w = torch.rand(C, device=device) + 0.5 if weight else None
    return x, t, w


def run(x, t, w, backend, *, reduction="mean", grad_out=None, **kw):
    """Loss and input gradient from one backend (x is not modified)."""
    x = x.detach().clone().requires_grad_()
    loss = fusedloss.cross_entropy(x, t, w, reduction=reduction, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss, grad, g


def expected(x, t, w, *, reduction="mean", grad_out=None, **kw):
    """The float64 reference on the same rounded inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.double() if w is not None else None
    loss = reference.cross_entropy(x64, t, w64, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, x64, grad_out.double())
    return loss, grad


def split_options(opts):
    opts = dict(opts)
    use_weight = opts.pop("weight", False)
    return use_weight, opts


def check_against_reference(backend, device, dtype, N, C, opts, reduction):
    use_weight, kw = split_options(opts)
    x, t, w = make_inputs(N, C, dtype, device, ignore_index=kw.get("ignore_index", -100), weight=use_weight)
    if device == "cpu":
        poison_cpu_allocator(N * C * x.element_size())
    loss, grad, g = run(x, t, w, backend, reduction=reduction, **kw)
    ref_loss, ref_grad = expected(x, t, w, reduction=reduction, grad_out=g, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", f"{backend} loss N={N} C={C} {opts} {reduction}")
    assert_close(grad, ref_grad, dtype, "grad", f"{backend} grad N={N} C={C} {opts} {reduction}")


# --- the reference itself against torch -------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (5, 7), (4, 7, 3), (2, 7, 3, 2)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_reference_matches_torch(shape, reduction, weighted, label_smoothing, ignore_index):
    x = torch.randn(shape, dtype=torch.float64)
    C = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, C, t_shape)
    if t.dim():
        t.view(-1)[::2] = ignore_index
    w = torch.rand(C, dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    # equal_nan: a 1-D input's single target may be the ignored one, and then both give NaN
    torch.testing.assert_close(reference.cross_entropy(x, t, w, **kw), F.cross_entropy(x, t, w, **kw), equal_nan=True)
    if ignore_index != -100:
        return  # torch rejects ignore_index with probability targets (so does fusedloss)
    p = torch.softmax(torch.randn(shape, dtype=torch.float64), dim=0 if len(shape) == 1 else 1)
    torch.testing.assert_close(reference.cross_entropy(x, p, w, **kw), F.cross_entropy(x, p, w, **kw))


def test_reference_extras_by_hand():
    """z_loss, softcap and temperature, from their definitions on one small row."""
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([2])
    z = 4.0 * torch.tanh(x / 4.0) / 0.5
    lse = torch.logsumexp(z, 1)
    want = lse - z[0, 2] + 0.01 * lse**2
    got = reference.cross_entropy(x, t, z_loss=0.01, softcap=4.0, temperature=0.5, reduction="none")
    torch.testing.assert_close(got, want)


# --- every backend against the reference --------------------------------------------------------

SHAPES = [(N, C) for N in (1, 3, 257) for C in (1, 7, 1023, 50257, 131072)]


def shape_param(N, C):
    marks = [pytest.mark.slow] if N * C > 2_000_000 else []
    return pytest.param(N, C, id=f"N{N}-C{C}", marks=marks)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("N,C", [shape_param(N, C) for N, C in SHAPES])
@pytest.mark.parametrize("opts", ["plain", "everything"])
def test_shapes(backend, device, dtype, N, C, opts):
    require_backend(backend, device)
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-backend dtype")
    if interpreted(backend, device) and N > 3:
        pytest.skip("many rows are too slow for Triton's CPU interpreter; they run on GPU")
    check_against_reference(backend, device, dtype, N, C, OPTIONS[opts], "mean")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_options(backend, device, dtype, opts, reduction):
    require_backend(backend, device)
    check_against_reference(backend, device, dtype, rows(backend, device, 37), 1023, OPTIONS[opts], reduction)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(backend, device, dtype):
    """Drop-in: the same numbers as F.cross_entropy on the same (upcast) input."""
    require_backend(backend, device)
    x, t, w = make_inputs(rows(backend, device, 64), 333, dtype, device, weight=True)
    for kw in ({}, {"label_smoothing": 0.2}):
        ours = fusedloss.cross_entropy(x, t, w, backend=backend, **kw)
        theirs = F.cross_entropy(x.float(), t, w, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["row-slice", "transposed", "k-dim", "channels-last", "1-d", "expanded"])
def test_layouts(backend, device, layout):
    require_backend(backend, device)
    dtype = torch.float32
    if layout == "row-slice":
        x = torch.randn(9, 1030, device=device)[:, 3:1026]  # row stride 1030, unaligned start
        t = torch.randint(0, 1023, (9,), device=device)
    elif layout == "transposed" and interpreted(backend, device):
        x = torch.randn(50, 6, device=device).t()
        t = torch.randint(0, 50, (6,), device=device)
    elif layout == "transposed":
        x = torch.randn(50, 12, device=device).t()  # (12, 50) with class stride 12
        t = torch.randint(0, 50, (12,), device=device)
    elif layout == "k-dim":
        x = torch.randn(3, 17, 4, 5, device=device)
        t = torch.randint(0, 17, (3, 4, 5), device=device)
    elif layout == "channels-last":
        x = torch.randn(2, 17, 4, 5, device=device).to(memory_format=torch.channels_last)
        t = torch.randint(0, 17, (2, 4, 5), device=device)
    elif layout == "1-d":
        x = torch.randn(31, device=device)
        t = torch.tensor(4, device=device)
    else:  # a broadcast row: stride 0 along N
        x = torch.randn(1, 77, device=device).expand(6, 77)
        t = torch.randint(0, 77, (6,), device=device)
    t = t.clone()
    if t.dim():
        t.view(-1)[::4] = -100
    for reduction in ("none", "mean", "sum"):
        g = torch.randn(t.shape, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
        loss, grad, _ = run(x, t, None, backend, reduction=reduction, grad_out=g, label_smoothing=0.1)
        ref_loss, ref_grad = expected(x, t, None, reduction=reduction, grad_out=g, label_smoothing=0.1)
        assert_close(loss, ref_loss, dtype, "loss", layout)
        assert_close(grad, ref_grad, dtype, "grad", layout)


# --- return_lse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_lse_and_its_gradient(backend, device, dtype):
    require_backend(backend, device)
    n = rows(backend, device, 20)
    x, t, w = make_inputs(n, 500, dtype, device, weight=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
    xa = x.detach().clone().requires_grad_()
    loss, lse = fusedloss.cross_entropy(xa, t, w, return_lse=True, backend=backend, **kw)
    assert lse.dtype == torch.float32 and lse.shape == t.shape
    (loss + (lse * torch.linspace(0, 1, n, device=device)).sum()).backward()
    x64 = x.detach().double().requires_grad_()
    ref_loss, ref_lse = reference.cross_entropy(x64, t, w.double(), return_lse=True, **kw)
    (ref_loss + (ref_lse * torch.linspace(0, 1, n, dtype=torch.float64, device=device)).sum()).backward()
    assert_close(lse, ref_lse, dtype, "loss", "lse")
    assert (lse[t == -100] == 0).all()
    assert_close(xa.grad, x64.grad, dtype, "grad", "grad through loss and lse")


# --- probability targets (computed with torch ops on every backend) -----------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets(backend, device, reduction):
    require_backend(backend, device)
    x = torch.randn(6, 11, 3, device=device, requires_grad=True)
    p = torch.softmax(torch.randn(6, 11, 3, device=device), 1)
    w = torch.rand(11, device=device)
    ours = fusedloss.cross_entropy(x, p, w, reduction=reduction, label_smoothing=0.1, backend=backend)
    theirs = F.cross_entropy(x, p, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)


# --- edge inputs: torch's answers ---------------------------------------------------------------


def _edge_rows(device):
    x = torch.randn(6, 9, device=device)
    x[0, 2] = float("nan")
    x[1, :] = float("-inf")
    x[1, 4] = 0.0
    x[2, 5] = float("inf")
    x[3] = 1e30
    x[3, 1] = -1e30
    x[4] = -1e30
    x[5, 0] = float("-inf")
    t = torch.tensor([2, 4, 1, 1, 3, 0], device=device)
    return x, t


@pytest.mark.parametrize("backend,device", backend_params())
def test_nonfinite_and_huge_logits(backend, device):
    require_backend(backend, device)
    x, t = _edge_rows(device)
    ours = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    theirs = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    # the gradient of finite rows is unaffected by the others
    xa = x.clone().requires_grad_()
    fusedloss.cross_entropy(xa, t, reduction="none", backend=backend)[3:5].sum().backward()
    xb = x.clone().requires_grad_()
    F.cross_entropy(xb, t, reduction="none")[3:5].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_and_empty(backend, device, reduction, weighted):
    require_backend(backend, device)
    w = torch.rand(5, device=device) if weighted else None
    for N in (4, 0):
        x = torch.randn(N, 5, device=device, requires_grad=True)
        t = torch.full((N,), -100, device=device)
        ours = fusedloss.cross_entropy(x, t, w, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(x.detach(), t, w, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        if N:
            ours.sum().backward()
            assert torch.equal(x.grad, torch.zeros_like(x))  # every row ignored: no gradient, as torch


def test_single_class():
    x = torch.randn(4, 1, requires_grad=True)
    t = torch.zeros(4, dtype=torch.long)
    loss = fusedloss.cross_entropy(x, t, backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [5, 7, -1, -101])
def test_target_out_of_range_raises_index_error(backend, bad):
    x = torch.randn(3, 5)
    t = torch.tensor([0, bad, 1])
    with pytest.raises(IndexError, match="out of range"):
        fusedloss.cross_entropy(x, t, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
def test_target_out_of_range_on_gpu_backends_gives_nan_rows(backend, device):
    """The GPU backends never read out of bounds: the row's loss and gradient are NaN."""
    require_backend(backend, device)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 5, 1], device=device)
    loss = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, t: fusedloss.cross_entropy(x.long(), t), TypeError, "input"),
        (lambda x, t: fusedloss.cross_entropy(x, t.float()), ValueError, "probability targets"),
        (lambda x, t: fusedloss.cross_entropy(x, torch.rand(3, 5), ignore_index=0), ValueError, "ignore_index"),
        (lambda x, t: fusedloss.cross_entropy(x, t.bool()), TypeError, "target"),
        (lambda x, t: fusedloss.cross_entropy(x, t[:2]), ValueError, "target must have shape"),
        (lambda x, t: fusedloss.cross_entropy(x[0, 0], t), ValueError, "input"),
        (lambda x, t: fusedloss.cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, t: fusedloss.cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda x, t: fusedloss.cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda x, t: fusedloss.cross_entropy(x, t, softcap=0.0), ValueError, "softcap"),
        (lambda x, t: fusedloss.cross_entropy(x, t, temperature=0.0), ValueError, "temperature"),
        (lambda x, t: fusedloss.cross_entropy(x, t, torch.ones(4)), ValueError, "weight"),
        (lambda x, t: fusedloss.cross_entropy(x, t, torch.ones(5, dtype=torch.long)), TypeError, "weight"),
        (lambda x, t: fusedloss.cross_entropy(x, [0, 1, 2]), TypeError, "target"),
        (lambda x, t: fusedloss.cross_entropy(x, t, backend="cuda"), RuntimeError, "cuda"),
        (lambda x, t: fusedloss.cross_entropy(x, t, backend="tpu"), ValueError, "backend"),
        (lambda x, t: fusedloss.cross_entropy(x, t.to("meta")), RuntimeError, "target is on meta"),
    ],
)
def test_bad_input(call, error, match):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 4, 1])
    with pytest.raises(error, match=match):
        call(x, t)


def test_module_is_drop_in():
    w = torch.rand(10)
    ours = fusedloss.nn.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.1)
    x = torch.randn(8, 10)
    t = torch.randint(0, 10, (8,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    legacy = fusedloss.nn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert "label_smoothing=0.1" in repr(ours)
    assert list(dict(ours.named_buffers())) == ["weight"]


# --- PyTorch integration ------------------------------------------------------------------------


def _op_samples(device, dtype):
    x, t, w = make_inputs(9, 37, dtype, device, weight=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = w.to(acc)
    for weight, scalars in ((None, (-100, 0.0, 0.0, 0.0, 1.0)), (w, (-100, 0.1, 1e-3, 7.0, 0.8))):
        yield (x.clone().requires_grad_(), t, weight, *scalars)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_cpu(dtype):
    for args in _op_samples("cpu", dtype):
        torch.library.opcheck(torch.ops.fusedloss.cross_entropy_fwd, args)
        x, t, w, *scalars = args
        loss, lse, stats = torch.ops.fusedloss.cross_entropy_fwd(x.detach(), t, w, *scalars)
        g = torch.randn_like(loss)
        for grad_lse in (None, torch.randn_like(lse)):
            torch.library.opcheck(torch.ops.fusedloss.cross_entropy_bwd,
                                  (g, grad_lse, x.detach(), t, w, stats, *scalars))


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck_kernel_ops(backend, device):
    require_backend(backend, device)
    if backend == "triton" and device == "cpu":
        # Fake tensors (test_faketensor, and torch.compile in test_aot_dispatch_dynamic) cannot run a
        # triton_op on CPU tensors: the interpreter needs real data pointers.
        tests = ("test_schema", "test_autograd_registration")
    else:
        tests = None
    fwd = fusedloss.ops.cross_entropy.KERNELS.fwd(backend)
    for args in _op_samples(device, torch.float32):
        torch.library.opcheck(fwd, args, test_utils=tests or torch.library._OPCHECK_DEFAULT_UTILS)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph(backend, device, dtype):
    """torch.compile(fullgraph=True) traces through the op, forward and backward."""
    require_backend(backend, device)
    x, t, w = make_inputs(16, 203, dtype, device, weight=True)

    def step(x, t, w, backend=backend):
        loss, lse = fusedloss.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-4, return_lse=True,
                                            backend=backend)
        return loss + lse.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xa = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    out_c = compiled(xa, t, w)
    out_r = step(xr, t, w.double(), backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, dtype, "loss", "compiled")
    assert_close(xa.grad, xr.grad, dtype, "grad", "compiled")


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.0, "temperature": 0.6}])
def test_gradcheck_float64(kw):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 5, 0])
    w = torch.rand(6, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda x: fusedloss.cross_entropy(x, t, w, reduction=reduction, backend="cpu", **kw), (x,)
        )


def test_double_backward_is_a_clear_error():
    x = torch.randn(3, 4, requires_grad=True)
    loss = fusedloss.cross_entropy(x, torch.tensor([0, 1, 2]), backend="cpu")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_deterministic_across_thread_counts():
    x = torch.randn(5, 70000)
    t = torch.randint(0, 70000, (5,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            loss, grad, _ = run(x, t, None, "cpu", grad_out=torch.tensor(1.0))
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_tolerance_table_covers_every_dtype():
    assert set(TOL) >= set(DTYPES) | {torch.float64}
    assert math.isclose(TOL[torch.bfloat16]["grad"][0], 2**-8)
    assert ("cuda" in DEVICES) == torch.cuda.is_available()


# --- forward + gradient in place: fusedloss::cross_entropy_fwd_grad_ (linear cross-entropy's row kernel) ---

FWD_GRAD_SHAPES = [(N, C) for N in (1, 7) for C in (1, 7, 1023, 1024, 50257, 131072)] + [(17, 50257)]
GRAD_SCALES = ["none", "vector", "scalar"]


def _fwd_grad_scalars(kw, ignore_index):
    return (ignore_index, kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap", 0.0),
            kw.get("temperature", 1.0))


def _grad_scale(kind, N, acc, device):
    if kind == "vector":
        return torch.randn(N, dtype=acc, device=device)
    if kind == "scalar":
        return torch.tensor(0.37, dtype=acc, device=device).expand(N)  # stride 0
    return None


def check_fwd_grad(backend, device, dtype, N, C, opts, grad_scale):
    """The op on fresh logits, in place, against the float64 reference (autograd, reduction none)."""
    use_weight, kw = split_options(opts)
    ignore_index = kw.pop("ignore_index", -100)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, t, w = make_inputs(N, C, dtype, device, ignore_index=ignore_index, weight=use_weight)
    w = w.to(acc) if w is not None else None
    g = _grad_scale(grad_scale, N, acc, device)
    scalars = _fwd_grad_scalars(kw, ignore_index)

    # The logits sit between two NaN guard bands: a write past either end shows. The loss and lse
    # outputs come from a NaN-poisoned allocator: a row the kernel forgets shows.
    pad = 64
    buf = torch.full((N * C + 2 * pad,), float("nan"), dtype=dtype, device=device)
    logits = buf[pad:pad + N * C].view(N, C)
    logits.copy_(x)
    if device == "cpu":
        poison_cpu_allocator(8 * N * 8)
    ptr = logits.data_ptr()
    loss, lse = fusedloss.ops.cross_entropy.fwd_grad_op(backend)(logits, t, w, g, *scalars)

    x64 = x.detach().double().requires_grad_()
    ref_loss, ref_lse = reference.cross_entropy(x64, t, w.double() if w is not None else None,
                                                ignore_index=ignore_index, reduction="none",
                                                label_smoothing=scalars[1], z_loss=scalars[2],
                                                softcap=scalars[3] or None, temperature=scalars[4], return_lse=True)
    (ref_grad,) = torch.autograd.grad(ref_loss, x64, g.double() if g is not None else torch.ones_like(ref_loss))

    msg = f"{backend} fwd_grad N={N} C={C} {opts} grad_scale={grad_scale}"
    assert logits.data_ptr() == ptr
    assert loss.dtype == acc and lse.dtype == acc and loss.shape == (N,) and lse.shape == (N,)
    assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + N * C:]).all(), f"{msg}: wrote outside logits"
    assert_close(loss, ref_loss, dtype, "loss", msg + " loss")
    assert_close(lse, ref_lse, dtype, "loss", msg + " lse")
    assert_close(logits, ref_grad, dtype, "grad", msg + " grad")
    ignored = t == ignore_index
    assert (logits[ignored] == 0).all() and (loss[ignored] == 0).all() and (lse[ignored] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("N,C", [pytest.param(N, C, id=f"N{N}-C{C}") for N, C in FWD_GRAD_SHAPES])
def test_fwd_grad_shapes(backend, device, dtype, N, C):
    require_backend(backend, device)
    if interpreted(backend, device) and C > 1024 and (N > 1 or dtype in (torch.float16, torch.float64)):
        # One program per row whatever N, and the dtypes differ only in their loads and stores (small
        # C covers every dtype): long rows run once per dtype family here, everywhere on the GPU.
        pytest.skip("long rows: N=1 in float32 and bfloat16 under the Triton interpreter (slow)")
    check_fwd_grad(backend, device, dtype, rows(backend, device, N), C, OPTIONS["everything"], "vector")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("grad_scale", GRAD_SCALES)
def test_fwd_grad_options(backend, device, opts, grad_scale):
    require_backend(backend, device)
    check_fwd_grad(backend, device, torch.float32, rows(backend, device, 7), 1023, OPTIONS[opts], grad_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,C", [(7, 1023), (3, 131072), (20, 40000)])
@pytest.mark.parametrize("grad_scale", ["none", "vector"])
def test_fwd_grad_cpu_is_fwd_then_bwd(dtype, N, C, grad_scale):
    """The contract: row by row the same bits as cross_entropy_fwd then cross_entropy_bwd(grad_scale),
    whether rows are whole (20 rows) or cut into pieces (few long rows). (The reference checks above
    are the correctness oracle; this checks the one-pass kernel is the two-pass one.)"""
    x, t, w = make_inputs(N, C, dtype, "cpu", weight=True)
    g = _grad_scale(grad_scale, N, torch.float32, "cpu")
    scalars = (-100, 0.05, 1e-4, 30.0, 1.3)
    loss, lse, stats = torch.ops.fusedloss.cross_entropy_fwd(x, t, w, *scalars)
    grad = torch.ops.fusedloss.cross_entropy_bwd(g if g is not None else torch.ones_like(loss), None, x, t, w, stats,
                                                 *scalars)
    logits = x.clone()
    loss2, lse2 = torch.ops.fusedloss.cross_entropy_fwd_grad_(logits, t, w, g, *scalars)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse) and torch.equal(logits, grad)


@pytest.mark.parametrize("backend,device", backend_params())
def test_fwd_grad_edge_rows(backend, device):
    """No rows; all rows ignored; non-finite and huge logits (torch's answers, row by row)."""
    require_backend(backend, device)
    op = fusedloss.ops.cross_entropy.fwd_grad_op(backend)
    empty = torch.empty(0, 5, device=device)
    loss, lse = op(empty, torch.empty(0, dtype=torch.long, device=device), None, None, -100, 0.0, 0.0, 0.0, 1.0)
    assert loss.shape == (0,) and lse.shape == (0,)
    x = torch.randn(4, 5, device=device)
    loss, lse = op(x, torch.full((4,), -100, device=device), None, None, -100, 0.0, 0.0, 0.0, 1.0)
    assert not loss.any() and not lse.any() and not x.any()
    x, t = _edge_rows(device)
    xb = x.clone().requires_grad_()
    want = F.cross_entropy(xb, t, reduction="none")
    want.sum().backward()
    logits = x.clone()
    loss, _ = op(logits, t, None, None, -100, 0.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(loss, want.detach(), equal_nan=True)
    torch.testing.assert_close(logits[3:5], xb.grad[3:5])  # the finite rows


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "row-slice", "expanded"])
def test_fwd_grad_needs_contiguous_logits(backend, device, layout):
    """The gradient is written over the logits: a strided view cannot hold it, so it is refused, untouched."""
    require_backend(backend, device)
    if layout == "transposed":
        x = torch.randn(6, 4, device=device).t()
    elif layout == "row-slice":
        x = torch.randn(4, 9, device=device)[:, 1:7]
    else:
        x = torch.randn(1, 6, device=device).expand(4, 6)
    before = x.clone()
    t = torch.tensor([0, 1, 2, 3], device=device)
    with pytest.raises(RuntimeError, match="contiguous"):
        fusedloss.ops.cross_entropy.fwd_grad_op(backend)(x, t, None, None, -100, 0.0, 0.0, 0.0, 1.0)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend,device", backend_params())
def test_fwd_grad_bad_grad_scale(backend, device):
    require_backend(backend, device)
    x = torch.randn(4, 6, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    op = fusedloss.ops.cross_entropy.fwd_grad_op(backend)
    for g in (torch.ones(4, dtype=torch.float64, device=device), torch.ones(3, device=device)):
        with pytest.raises(RuntimeError, match="grad_scale"):
            op(x, t, None, g, -100, 0.0, 0.0, 0.0, 1.0)


def test_fwd_grad_cpu_bad_target_leaves_logits_alone():
    x = torch.randn(3, 5)
    before = x.clone()
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_(x, torch.tensor([0, 5, 1]), None, None, -100, 0.0, 0.0, 0.0, 1.0)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
def test_fwd_grad_bad_target_on_gpu_backends_gives_nan_rows(backend, device):
    require_backend(backend, device)
    x = torch.randn(3, 5, device=device)
    loss, lse = fusedloss.ops.cross_entropy.fwd_grad_op(backend)(x, torch.tensor([0, 5, 1], device=device), None,
                                                                 None, -100, 0.0, 0.0, 0.0, 1.0)
    assert torch.isnan(loss[1]) and torch.isnan(lse[1]) and torch.isnan(x[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(x[[0, 2]]).all()


def test_fwd_grad_reference_backend():
    """fwd_grad_op("reference"), the linear op's reference path: bf16 logits, float32 results."""
    check_fwd_grad("reference", "cpu", torch.bfloat16, 7, 333, OPTIONS["everything"], "vector")
    with pytest.raises(ValueError, match="backend"):
        fusedloss.ops.cross_entropy.fwd_grad_op("tpu")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fwd_grad_opcheck(backend, device, dtype):
    require_backend(backend, device)
    # Fake tensors cannot run a triton_op on CPU tensors (the interpreter needs data pointers).
    tests = ("test_schema",) if interpreted(backend, device) else torch.library._OPCHECK_DEFAULT_UTILS
    op = fusedloss.ops.cross_entropy.fwd_grad_op(backend)
    x, t, w = make_inputs(9, 37, dtype, device, weight=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for weight, g, scalars in ((None, None, (-100, 0.0, 0.0, 0.0, 1.0)),
                               (w.to(acc), torch.rand(9, dtype=acc, device=device), (-100, 0.1, 1e-3, 7.0, 0.8))):
        torch.library.opcheck(op, (x.clone(), t, weight, g, *scalars), test_utils=tests)


# torch's class-index shape forms for unbatched input (issue #15): (C,) takes a 0-dim target and also a
# (1,) one, with a 0-dim result in both cases (torch's backward refuses the (1,) form; ours has one).
SHAPE_FORMS = [((6,), ()), ((6,), (1,)), ((1, 6), (1,)), ((1,), ()), ((3, 6), (3,))]
WITH_REFERENCE = with_reference()


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("shapes", SHAPE_FORMS, ids=str)
def test_torch_shape_forms(backend, device, shapes):
    require_backend(backend, device)
    x_shape, t_shape = shapes
    C = x_shape[-1]
    for reduction in ("none", "mean", "sum"):
        for kw in ({}, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3}):
            x = torch.randn(x_shape, device=device)
            t = torch.randint(0, C, t_shape, device=device)
            kw = dict(kw)
            w = torch.rand(C, device=device) + 0.5 if kw.pop("weight", False) else None
            torch_shape = torch_loss_shape(x, t, reduction)
            xa = x.clone().requires_grad_()
            ours, lse = fusedloss.cross_entropy(xa, t, w, reduction=reduction, return_lse=True, backend=backend, **kw)
            msg = f"{backend} input {x_shape} target {t_shape} {reduction} {kw}"
            assert ours.shape == torch_shape, msg
            assert lse.shape == (torch_shape if reduction == "none" else (() if x.dim() == 1 else (x_shape[0],))), msg
            t_unbatched = t.view(()) if x.dim() == 1 else t
            g = torch.randn(torch_shape, device=device)
            ref, ref_grad = expected(x, t_unbatched, w, reduction=reduction, grad_out=g, **kw)
            assert_close(ours, ref, torch.float32, "loss", msg)
            (grad,) = torch.autograd.grad(ours, xa, g)
            assert_close(grad, ref_grad, torch.float32, "grad", msg)
            if not kw and w is None:
                assert_close(ours, F.cross_entropy(x.double(), t, reduction=reduction), torch.float32, "loss", msg)
