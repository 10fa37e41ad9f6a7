"""fusedloss.gap_loss on every backend against the float64 reference, and against F.multi_margin_loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params, poison_cpu_allocator, require_backend, rows, with_reference

import fusedloss
from fusedloss import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(N, C, dtype, device, *, weight=False, ignore_index=-100):
    x = torch.randn(N, C, device=device).to(dtype)
    t = torch.randint(0, C, (N,), device=device)
    if N > 2:
        t[1::4] = ignore_index
    w = torch.rand(C, device=device) + 0.5 if weight else None
    return x, t, w


def check(backend, device, dtype, N, C, *, reduction="mean", weight=False, **kw):
    x, t, w = make_inputs(N, C, dtype, device, weight=weight, ignore_index=kw.get("ignore_index", -100))
    if device == "cpu":
        poison_cpu_allocator(N * C * x.element_size())
    xa = x.detach().clone().requires_grad_()
    loss = fusedloss.gap_loss(xa, t, weight=w, reduction=reduction, backend=backend, **kw)
    g = torch.randn_like(loss)
    loss.backward(g)
    x64 = x.detach().double().requires_grad_()
    ref = reference.gap_loss(x64, t, weight=w.double() if w is not None else None, reduction=reduction, **kw)
    ref.backward(g.double())
    msg = f"{backend} N={N} C={C} {kw} {reduction} weight={weight}"
    assert xa.grad.dtype == dtype
    assert_close(loss, ref, dtype, "loss", msg)
    assert_close(xa.grad, x64.grad, dtype, "grad", msg)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("C", [1, 2, 3, 10, 1000, 32768])
@pytest.mark.parametrize("p", [1, 2])
def test_shapes(backend, device, dtype, C, p):
    require_backend(backend, device)
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-backend dtype")
    N = 7 if C >= 32768 else 33
    check(backend, device, dtype, rows(backend, device, N), C, p=p, margin=0.5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", [0.5, 1.0, -0.3])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extra", [{}, {"class_normalize": True}, {"mode": "max"}, {"ignore_index": 2, "p": 2}],
                         ids=["plain", "normalized", "max", "ignore2-p2"])
def test_options(backend, device, dtype, margin, weight, reduction, extra):
    require_backend(backend, device)
    check(backend, device, dtype, rows(backend, device, 29), 67, reduction=reduction, weight=weight, margin=margin,
          **extra)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.2, -0.5])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_class_normalized_equals_multi_margin_loss(backend, device, p, margin, weighted, reduction):
    require_backend(backend, device)
    x = torch.randn(13, 9, device=device, requires_grad=True)
    t = torch.randint(0, 9, (13,), device=device)
    w = torch.rand(9, device=device) if weighted else None
    ours = fusedloss.gap_loss(x, t, margin, p=p, weight=w, class_normalize=True, reduction=reduction,
                              backend=backend)
    theirs = F.multi_margin_loss(x, t, p=p, margin=margin, weight=w, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_dim_input_and_module(backend, device):
    require_backend(backend, device)
    x = torch.randn(10, device=device)
    t = torch.tensor(3, device=device)
    ours = fusedloss.nn.MultiMarginLoss(backend=backend)
    theirs = torch.nn.MultiMarginLoss()
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    x2 = torch.randn(5, 10, device=device)
    t2 = torch.randint(0, 10, (5,), device=device)
    torch.testing.assert_close(ours(x2, t2), theirs(x2, t2))
    gap = fusedloss.nn.GapLoss(backend=backend)
    torch.testing.assert_close(gap(x2, t2), reference.gap_loss(x2, t2, 0.5))


def test_all_ignored_and_empty():
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    assert torch.isnan(fusedloss.gap_loss(x, t, backend="cpu"))
    assert fusedloss.gap_loss(x, t, reduction="sum", backend="cpu").item() == 0.0
    fusedloss.gap_loss(x, t, reduction="sum", backend="cpu").backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = fusedloss.gap_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), reduction="none", backend="cpu")
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_target_out_of_range_raises_index_error(backend):
    with pytest.raises(IndexError, match="out of range"):
        fusedloss.gap_loss(torch.randn(3, 5), torch.tensor([0, 5, 1]), backend=backend)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
def test_target_out_of_range_on_gpu_backends_gives_nan_rows(backend, device):
    require_backend(backend, device)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    loss = fusedloss.gap_loss(x, torch.tensor([0, 5, 1], device=device), reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"p": 3}, ValueError, "p must be 1 or 2"),
        ({"mode": "mean"}, ValueError, "mode"),
        ({"weight": torch.ones(4)}, ValueError, "weight"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"backend": "cuda"}, RuntimeError, "cuda"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedloss.gap_loss(torch.randn(3, 5), torch.tensor([0, 4, 1]), **kwargs)


def test_bad_tensors():
    x, t = torch.randn(3, 5), torch.tensor([0, 4, 1])
    with pytest.raises(TypeError, match="input"):
        fusedloss.gap_loss(x.long(), t)
    with pytest.raises(TypeError, match="target"):
        fusedloss.gap_loss(x, t.float())
    with pytest.raises(ValueError, match="target must have shape"):
        fusedloss.gap_loss(x, t[:2])
    with pytest.raises(ValueError, match="input"):
        fusedloss.gap_loss(torch.randn(2, 3, 4), t)


def _samples(device):
    x, t, w = make_inputs(9, 23, torch.float32, device, weight=True)
    yield (x.requires_grad_(), t, None, 0.5, 1, -100, False, False)
    yield (x, t.masked_fill(t == -100, 3), w, -0.2, 2, 3, True, False)
    yield (x, t, w, 1.0, 1, -100, False, True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    require_backend(backend, device)
    tests = ("test_schema", "test_autograd_registration") if (backend, device) == (
        "triton", "cpu") else torch.library._OPCHECK_DEFAULT_UTILS
    fwd = fusedloss.ops.gap_loss.KERNELS.fwd(backend)
    for args in _samples(device):
        torch.library.opcheck(fwd, args, test_utils=tests)
    if backend == "cpu":
        x, t, w, *scalars = next(_samples(device))
        g = torch.randn(9)
        torch.library.opcheck(torch.ops.fusedloss.gap_loss_bwd, (g, x.detach(), t, w, *scalars))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
def test_compile_fullgraph(backend, device):
    require_backend(backend, device)
    x, t, w = make_inputs(16, 50, torch.float32, device, weight=True)
    def step(x, w, backend=backend):
        return fusedloss.gap_loss(x, t, 0.3, p=2, weight=w, backend=backend)

    torch._dynamo.reset()
    xa, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out_c = torch.compile(step, fullgraph=True)(xa, w)
    out_r = step(xr, w.double(), backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, torch.float32, "loss", "compiled")
    assert_close(xa.grad, xr.grad, torch.float32, "grad", "compiled")


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_gradcheck_float64(p, mode):
    # inputs spread out so that no gap sits within gradcheck's eps of the hinge
    x = (torch.randperm(24, dtype=torch.float64) * 0.37).reshape(4, 6).requires_grad_()
    t = torch.tensor([1, -100, 5, 0])
    w = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: fusedloss.gap_loss(x, t, 0.55, p=p, weight=w, mode=mode, reduction="none", backend="cpu"), (x,)
    )


# Every (input, target) shape torch's multi_margin_loss takes (issue #15): one sample for a 0-dim input
# (one class), (C,) or (1, C), with a 0-dim or (1,) target; reduction="none" has the target's shape.
MULTI_MARGIN_FORMS = [((), ()), ((), (1,)), ((6,), ()), ((6,), (1,)), ((1, 6), ()), ((1, 6), (1,)), ((1,), (1,)),
                      ((4, 6), (4,))]
WITH_REFERENCE = with_reference()


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("shapes", MULTI_MARGIN_FORMS, ids=str)
def test_multi_margin_loss_shape_forms(backend, device, shapes):
    require_backend(backend, device)
    x_shape, t_shape = shapes
    C = x_shape[-1] if x_shape else 1
    for reduction in ("none", "mean", "sum"):
        for weighted, p in ((False, 1), (True, 2)):
            x = torch.randn(x_shape, device=device)
            t = torch.randint(0, C, t_shape, device=device)
            w = torch.rand(C, device=device) + 0.5 if weighted else None
            x64 = x.double().requires_grad_()
            theirs = F.multi_margin_loss(x64, t, p=p, margin=1.5, weight=w.double() if weighted else None,
                                         reduction=reduction)
            xa = x.clone().requires_grad_()
            ours = fusedloss.nn.MultiMarginLoss(p=p, margin=1.5, weight=w, reduction=reduction, backend=backend)(xa, t)
            msg = f"{backend} input {x_shape} target {t_shape} {reduction} p={p}"
            assert_close(ours, theirs, torch.float32, "loss", msg)
            g = torch.randn(theirs.shape, device=device)
            (g_theirs,) = torch.autograd.grad(theirs, x64, g.double())
            (g_ours,) = torch.autograd.grad(ours, xa, g)
            assert_close(g_ours, g_theirs, torch.float32, "grad", msg)


@pytest.mark.parametrize("x_shape,t_shape", [((4, 6), (1,)), ((4, 6), ()), ((6,), (1, 1)), ((6,), (2,)),
                                             ((), (2,)), ((2, 3, 4), (2,))])
def test_shapes_torch_refuses_are_refused(x_shape, t_shape):
    with pytest.raises(ValueError, match="target must have shape|input must be"):
        fusedloss.gap_loss(torch.randn(x_shape), torch.zeros(t_shape, dtype=torch.long), class_normalize=True)
