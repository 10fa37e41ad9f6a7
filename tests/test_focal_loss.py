"""fusedloss.focal_loss on every backend against the float64 reference (and the reference against
torch's cross-entropy and the closed-form gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (TOL, assert_close, backend_params, interpreted, poison_cpu_allocator, require_backend, rows,
                      with_reference, torch_loss_shape)

import fusedloss
from fusedloss import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]
OPTIONS = {
    "plain": {},
    "alpha-float": {"alpha": 0.25},
    "alpha-tensor": {"alpha": "tensor"},
    "weight": {"weight": True},
    "weight+alpha": {"weight": True, "alpha": "tensor"},
    "in-range ignore_index": {"ignore_index": 3, "weight": True},
}
REDUCTIONS = ["none", "mean", "sum"]


def make_inputs(N, C, dtype, device, *, ignore_index=-100, scale=3.0, weight=False, alpha=None, ignore_some=True):
    x = (torch.randn(N, C, device=device) * scale).to(dtype)
    t = torch.randint(0, C, (N,), device=device)
    if ignore_some and N > 1:
        t[::3] = ignore_index  # every third row ignored (including row 0)
    w = torch.rand(C, device=device) + 0.5 if weight else None
    a = torch.rand(C, device=device) if alpha == "tensor" else alpha
    return x, t, w, a


def run(x, t, backend, *, reduction="mean", grad_out=None, **kw):
    """Loss and input gradient from one backend (x is not modified)."""
    x = x.detach().clone().requires_grad_()
    loss = fusedloss.focal_loss(x, t, reduction=reduction, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss, grad, g


def expected(x, t, *, reduction="mean", grad_out=None, weight=None, alpha=None, **kw):
    """The float64 reference on the same rounded inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.double() if weight is not None else None
    a64 = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    loss = reference.focal_loss(x64, t, weight=w64, alpha=a64, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, x64, grad_out.double())
    return loss, grad


def check_against_reference(backend, device, dtype, N, C, gamma, opts, reduction, *, scale=3.0):
    opts = dict(opts)
    ignore_index = opts.pop("ignore_index", -100)
    x, t, w, a = make_inputs(N, C, dtype, device, ignore_index=ignore_index, weight=opts.pop("weight", False),
                             alpha=opts.pop("alpha", None), scale=scale)
    kw = dict(gamma=gamma, alpha=a, weight=w, ignore_index=ignore_index)
    if device == "cpu":
        poison_cpu_allocator(N * C * x.element_size())
    loss, grad, g = run(x, t, backend, reduction=reduction, **kw)
    ref_loss, ref_grad = expected(x, t, reduction=reduction, grad_out=g, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    msg = f"{backend} N={N} C={C} gamma={gamma} alpha={'tensor' if isinstance(a, torch.Tensor) else a} " \
          f"weight={w is not None} ignore_index={ignore_index} {reduction}"
    assert_close(loss, ref_loss, dtype, "loss", msg + " loss")
    assert_close(grad, ref_grad, dtype, "grad", msg + " grad")


# --- the reference itself -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (5, 7), (4, 7, 3), (2, 7, 3, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_reference_gamma0_is_torch_cross_entropy(shape, reduction, weighted, ignore_index):
    x = torch.randn(shape, dtype=torch.float64)
    C = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, C, t_shape)
    if t.dim():
        t.view(-1)[::2] = ignore_index
    w = torch.rand(C, dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    torch.testing.assert_close(reference.focal_loss(x, t, 0.0, weight=w, **kw), F.cross_entropy(x, t, w, **kw),
                               equal_nan=True)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_reference_and_closed_form_gradient(gamma):
    """The loss from its definition, and the gradient derived in cross_entropy_math.h (6):
    d loss / d z = a_y * q^gamma * (1 + gamma p nll / q) * (softmax - onehot), against autograd."""
    x = torch.randn(6, 9, dtype=torch.float64) * 2
    x[5, 4] = 20.0  # p_y close to 1 (q about 1e-7)
    t = torch.tensor([0, 8, 3, 3, 1, 4])
    w = torch.rand(9, dtype=torch.float64) + 0.5
    alpha = torch.rand(9, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    loss = reference.focal_loss(xa, t, gamma, alpha, weight=w, reduction="none")
    g = torch.randn(6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, xa, g)

    s = torch.softmax(x, 1)
    nll = -torch.log_softmax(x, 1)[torch.arange(6), t]
    p = torch.exp(-nll)
    q = -torch.expm1(-nll)  # 1 - p would round to 0 in row 5
    a = w[t] * alpha[t]
    torch.testing.assert_close(loss, a * q**gamma * nll)
    coef = a * q**gamma * (1 + gamma * p * nll / q)
    want = (g * coef)[:, None] * (s - F.one_hot(t, 9).double())
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


def test_reference_alpha_and_mean_denominator():
    """alpha scales the numerator only; weight is in both (cross_entropy's weighted mean)."""
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, -100, 3, 3])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    per = reference.focal_loss(x, t, 2.0, 0.3, weight=w, reduction="none")
    torch.testing.assert_close(reference.focal_loss(x, t, 2.0, 0.3, weight=w), per.sum() / (1 + 2 + 4 + 4))
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    per_alpha = reference.focal_loss(x, t, 2.0, alpha, reduction="none")
    torch.testing.assert_close(per_alpha, reference.focal_loss(x, t, 2.0, reduction="none") * alpha[t.clamp(0)]
                               * (t != -100))
    torch.testing.assert_close(reference.focal_loss(x, t, 2.0, alpha), per_alpha.sum() / 4)


# --- every backend against the reference --------------------------------------------------------

SHAPES = [(1, 1), (1, 7), (1, 1023), (1, 50257), (1, 131072), (37, 1), (37, 7), (37, 1023), (37, 50257)]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("N,C", [pytest.param(N, C, id=f"N{N}-C{C}") for N, C in SHAPES])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_shapes(backend, device, dtype, N, C, gamma):
    require_backend(backend, device)
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-backend dtype")
    if interpreted(backend, device) and (N > 1 and C > 1023 or C > 50257):
        pytest.skip("many long rows are too slow for Triton's CPU interpreter; they run on GPU")
    check_against_reference(backend, device, dtype, rows(backend, device, N), C, gamma, OPTIONS["weight+alpha"],
                            "mean")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_options(backend, device, dtype, gamma, opts):
    require_backend(backend, device)
    n = 5 if interpreted(backend, device) else 37
    for reduction in REDUCTIONS:
        check_against_reference(backend, device, dtype, n, 1023, gamma, OPTIONS[opts], reduction)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_gamma0_is_cross_entropy(backend, device, dtype, weighted):
    """gamma = 0 and alpha None: cross_entropy's numbers, bit for bit (the same row pass, the same
    backward kernel, the weight applied in the same place)."""
    require_backend(backend, device)
    x, t, w, _ = make_inputs(rows(backend, device, 40), 333, dtype, device, weight=weighted)
    for reduction in REDUCTIONS:
        g = torch.randn(t.shape, device=device) if reduction == "none" else torch.tensor(0.7, device=device)
        xa = x.clone().requires_grad_()
        ours = fusedloss.focal_loss(xa, t, 0.0, weight=w, reduction=reduction, backend=backend)
        ours.backward(g)
        xb = x.clone().requires_grad_()
        ce = fusedloss.cross_entropy(xb, t, w, reduction=reduction, backend=backend)
        ce.backward(g)
        assert torch.equal(ours, ce), reduction
        assert torch.equal(xa.grad, xb.grad), reduction
        theirs = F.cross_entropy(x.float(), t, w, reduction=reduction)
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
    elif layout == "transposed":
        x = torch.randn(50, 6, device=device).t()  # (6, 50) with class stride 6
        t = torch.randint(0, 50, (6,), device=device)
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
    if interpreted(backend, device) and layout in ("k-dim", "channels-last"):
        x, t = x[:1, :, :2], t[:1, :2]  # 10 rows
    t = t.clone()
    if t.dim():
        t.view(-1)[::4] = -100
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    alpha = torch.rand(C, device=device)
    for reduction in REDUCTIONS:
        g = torch.randn(t.shape, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
        loss, grad, _ = run(x, t, backend, reduction=reduction, grad_out=g, gamma=1.5, alpha=alpha)
        ref_loss, ref_grad = expected(x, t, reduction=reduction, grad_out=g, gamma=1.5, alpha=alpha)
        assert_close(loss, ref_loss, dtype, "loss", layout)
        assert_close(grad, ref_grad, dtype, "grad", layout)


# --- extreme rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_confident_and_hopeless_rows(backend, device, dtype, gamma):
    """p_y -> 1 (the target logit far above the rest: q and nll round to 0, where q^(gamma - 1) is
    singular for gamma < 1) and p_y -> 0 (far below) next to ordinary rows: no NaN, the reference's
    values."""
    require_backend(backend, device)
    C = 50
    x = torch.randn(8, C, device=device)
    t = torch.randint(0, C, (8,), device=device)
    for row, gap in enumerate((8.0, 16.0, 30.0, 60.0, -30.0, -60.0)):
        x[row, t[row]] = x[row].max() + gap if gap > 0 else x[row].min() + gap
    x = x.to(dtype)
    alpha = torch.rand(C, device=device) + 0.1
    for reduction in ("none", "mean"):
        g = torch.randn(8, device=device) if reduction == "none" else torch.tensor(1.0, device=device)
        loss, grad, _ = run(x, t, backend, reduction=reduction, grad_out=g, gamma=gamma, alpha=alpha)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref_loss, ref_grad = expected(x, t, reduction=reduction, grad_out=g, gamma=gamma, alpha=alpha)
        assert_close(loss, ref_loss, dtype, "loss", f"gamma={gamma}")
        assert_close(grad, ref_grad, dtype, "grad", f"gamma={gamma}")


@pytest.mark.parametrize("backend,device", backend_params() + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_one_hot_rows(backend, device, gamma):
    """Rows one-hot even in float64 (p_y = 1 exactly): loss 0 and, for gamma > 0, gradient 0 (the
    limit); the cross-entropy gradient (also 0 here) at gamma = 0. A -inf target logit: loss inf as
    in torch's cross-entropy, and a finite gradient, softmax - onehot (the coefficient's limit 1);
    the reference, autograd through the plain formula, gives 0 * inf = NaN there, so it skips that row."""
    if backend != "reference":
        require_backend(backend, device)
    rows_checked = 2 if backend == "reference" else 3
    x = torch.zeros(3, 5, device=device)
    x[0, 2] = 1000.0
    x[1, 0] = -1000.0
    x[1, 3] = 1000.0
    x[2, 1] = float("-inf")
    t = torch.tensor([2, 3, 1], device=device)
    x, t = x[:rows_checked], t[:rows_checked]
    xa = x.clone().requires_grad_()
    loss = fusedloss.focal_loss(xa, t, gamma, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[0] == 0 and loss[1] == 0
    assert torch.equal(xa.grad[:2], torch.zeros(2, 5, device=device))
    if rows_checked == 2:
        return
    assert loss[2] == float("inf")
    want = torch.full((5,), 0.25, device=device)
    want[1] = -1.0
    torch.testing.assert_close(xa.grad[2], want)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_and_empty(backend, device, reduction, weighted):
    require_backend(backend, device)
    w = torch.rand(5, device=device) if weighted else None
    for N in (4, 0):
        x = torch.randn(N, 5, device=device, requires_grad=True)
        t = torch.full((N,), -100, device=device)
        ours = fusedloss.focal_loss(x, t, 2.0, 0.5, weight=w, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(x.detach(), t, w, reduction=reduction)  # 0 / 0 = NaN for mean, as torch
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        if N:
            ours.sum().backward()
            assert torch.equal(x.grad, torch.zeros_like(x))  # every row ignored: no gradient, as torch


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [5, -1, -101])
def test_target_out_of_range_raises_index_error(backend, bad):
    x = torch.randn(3, 5)
    t = torch.tensor([0, bad, 1])
    with pytest.raises(IndexError, match="target .*out of range"):
        fusedloss.focal_loss(x, t, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
def test_target_out_of_range_on_gpu_backends_gives_nan_rows(backend, device):
    require_backend(backend, device)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 5, 1], device=device)
    loss = fusedloss.focal_loss(x, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"gamma": -0.5}, ValueError, "gamma must be a finite float >= 0"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"gamma": float("inf")}, ValueError, "gamma"),
        ({"gamma": True}, TypeError, "gamma"),
        ({"gamma": torch.tensor(2.0)}, TypeError, "gamma"),
        ({"alpha": torch.rand(4)}, ValueError, r"alpha must be a float or a tensor of shape \(5,\)"),
        ({"alpha": torch.rand(5, 1)}, ValueError, "alpha"),
        ({"alpha": torch.ones(5, dtype=torch.long)}, TypeError, "alpha"),
        ({"alpha": -0.25}, ValueError, "alpha must be a finite float >= 0"),
        ({"alpha": "balanced"}, TypeError, "alpha"),
        ({"weight": torch.rand(6)}, ValueError, "weight"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"backend": "tpu"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(kw, error, match):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 4, 1])
    with pytest.raises(error, match=match):
        fusedloss.focal_loss(x, t, **kw)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, t: fusedloss.focal_loss(x.long(), t), TypeError, "input"),
        (lambda x, t: fusedloss.focal_loss(x, t.float()), TypeError, "target must hold int64 class indices"),
        (lambda x, t: fusedloss.focal_loss(x, t.bool()), TypeError, "target"),
        (lambda x, t: fusedloss.focal_loss(x, t[:2]), ValueError, "target must have shape"),
        (lambda x, t: fusedloss.focal_loss(x[0, 0], t), ValueError, "input"),
        (lambda x, t: fusedloss.focal_loss(x[:, :0], t), ValueError, "no classes"),
    ],
)
def test_bad_tensors(call, error, match):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 4, 1])
    with pytest.raises(error, match=match):
        call(x, t)


def test_op_checks_gamma():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="gamma must be >= 0"):
        torch.ops.fusedloss.focal_loss_fwd(x, torch.tensor([0, 1, 2]), None, -100, -1.0)


# --- the module ---------------------------------------------------------------------------------


def test_module():
    w = torch.rand(10) + 0.5
    alpha = torch.rand(10)
    module = fusedloss.nn.FocalLoss(1.5, alpha, weight=w, ignore_index=1, reduction="sum")
    x = torch.randn(8, 10)
    t = torch.randint(0, 10, (8,))
    torch.testing.assert_close(module(x, t), fusedloss.focal_loss(x, t, 1.5, alpha, weight=w, ignore_index=1,
                                                                  reduction="sum"))
    assert sorted(dict(module.named_buffers())) == ["alpha", "weight"]
    assert "gamma=1.5" in repr(module) and "reduction='sum'" in repr(module)
    default = fusedloss.nn.FocalLoss(alpha=0.25)
    assert default.gamma == 2.0 and default.alpha == 0.25 and list(dict(default.named_buffers())) == []
    torch.testing.assert_close(default(x, t), fusedloss.focal_loss(x, t, alpha=0.25))
    assert fusedloss.focal_loss is fusedloss.functional.focal_loss


# --- PyTorch integration ------------------------------------------------------------------------


def _op_samples(device, dtype):
    x, t, w, _ = make_inputs(9, 37, dtype, device, weight=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for weight, gamma in ((None, 0.0), (w.to(acc), 2.0), (None, 0.5)):
        yield (x.clone().requires_grad_(), t, weight, -100, gamma)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(backend, device, dtype):
    require_backend(backend, device)
    if backend != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-backend dtype")
    # Fake tensors (test_faketensor, and torch.compile in test_aot_dispatch_dynamic) cannot run a
    # triton_op on CPU tensors: the interpreter needs real data pointers.
    tests = (("test_schema", "test_autograd_registration") if interpreted(backend, device)
             else torch.library._OPCHECK_DEFAULT_UTILS)
    fwd = fusedloss.ops.focal_loss.KERNELS.fwd(backend)
    for args in _op_samples(device, dtype):
        torch.library.opcheck(fwd, args, test_utils=tests)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph(backend, device, dtype):
    """torch.compile(fullgraph=True) traces through the op, forward and backward."""
    require_backend(backend, device)
    x, t, w, a = make_inputs(16, 203, dtype, device, weight=True, alpha="tensor")
    # Two calls in one graph, each on its own input: a gradient is then one rounding to the dtype, the
    # case the table's bound is for (two bf16 gradients of one input summed by autograd are three).
    x2 = make_inputs(16, 203, dtype, device)[0]

    def step(x, x2, t, w, a, backend=backend):
        return fusedloss.focal_loss(x, t, 2.0, a, weight=w, backend=backend) + \
            fusedloss.focal_loss(x2, t, 0.5, 0.25, reduction="sum", backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xa, x2a = x.clone().requires_grad_(), x2.clone().requires_grad_()
    xr, x2r = x.double().requires_grad_(), x2.double().requires_grad_()
    out_c = compiled(xa, x2a, t, w, a)
    out_r = step(xr, x2r, t, w.double(), a.double(), backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, dtype, "loss", "compiled")
    assert_close(xa.grad, xr.grad, dtype, "grad", "compiled")
    assert_close(x2a.grad, x2r.grad, dtype, "grad", "compiled")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck_float64(gamma):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 5, 0])
    w = torch.rand(6, dtype=torch.float64) + 0.5
    alpha = torch.rand(6, dtype=torch.float64)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda x: fusedloss.focal_loss(x, t, gamma, alpha, weight=w, reduction=reduction, backend="cpu"), (x,)
        )


def test_double_backward_is_a_clear_error():
    x = torch.randn(3, 4, requires_grad=True)
    loss = fusedloss.focal_loss(x, torch.tensor([0, 1, 2]), backend="cpu")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_tolerances_come_from_the_table():
    assert set(TOL) >= set(DTYPES)


# Unbatched input (issue #15): (C,) takes a 0-dim or a (1,) target, with a 0-dim result, as torch's
# cross_entropy (focal with gamma=0).
SHAPE_FORMS = [((6,), ()), ((6,), (1,)), ((1, 6), (1,)), ((1,), ())]
WITH_REFERENCE = with_reference()


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("shapes", SHAPE_FORMS, ids=str)
def test_torch_shape_forms(backend, device, shapes):
    require_backend(backend, device)
    x_shape, t_shape = shapes
    C = x_shape[-1]
    for reduction in REDUCTIONS:
        x = torch.randn(x_shape, device=device)
        t = torch.randint(0, C, t_shape, device=device)
        w = torch.rand(C, device=device) + 0.5
        torch_shape = torch_loss_shape(x, t, reduction)
        t_unbatched = t.view(()) if x.dim() == 1 else t
        msg = f"{backend} input {x_shape} target {t_shape} {reduction}"
        for gamma, kw in ((0.0, {}), (2.0, {"weight": w, "alpha": torch.rand(C, device=device)})):
            loss, grad, g = run(x, t, backend, reduction=reduction, gamma=gamma, **kw)
            assert loss.shape == torch_shape, msg
            ref, ref_grad = expected(x, t_unbatched, reduction=reduction, grad_out=g, gamma=gamma, **kw)
            assert_close(loss, ref, torch.float32, "loss", msg)
            assert_close(grad, ref_grad, torch.float32, "grad", msg)
            if gamma == 0.0:
                assert_close(loss, F.cross_entropy(x.double(), t, reduction=reduction), torch.float32, "loss", msg)
