"""fusedloss.linear_cross_entropy on every backend against the float64 reference (and the reference and the
op against torch's F.linear_cross_entropy)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import TOL, assert_close, backend_params, interpreted, poison_cpu_allocator, require_backend, rows

import fusedloss
from fusedloss import reference
from fusedloss.ops import linear_cross_entropy as _lce
from fusedloss.ops._registry import REDUCTION

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "in-range ignore_index": {"ignore_index": 3},
    "everything": {"bias": True, "weight": True, "label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0},
}
TORCH_HAS_LCE = hasattr(F, "linear_cross_entropy")
TORCH_LCE_OPTIONS = getattr(torch.nn, "LinearCrossEntropyOptions", None)


def make_inputs(N, D, V, dtype, device, *, bias=False, weight=False, ignore_index=-100, scale=3.0):
    """Logits of spread ~scale (as in the cross-entropy tests): W's rows have norm ~scale."""
    x = torch.randn(N, D, device=device).to(dtype)
    W = (torch.randn(V, D, device=device) * (scale / math.sqrt(D))).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), device=device)
    if N > 1:
        t[::3] = ignore_index  # every third row ignored (row 0 too)
    w = torch.rand(V, device=device) + 0.5 if weight else None
    return x, W, b, t, w


def run(x, W, b, t, w, backend, *, reduction="mean", grad_out=None, chunk_size=None, **kw):
    """Loss and gradients (input, linear_weight[, linear_bias]) from one backend; inputs are not modified."""
    params = [x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()]
    if b is not None:
        params.append(b.detach().clone().requires_grad_())
    loss = fusedloss.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2] if b is not None else None,
                                          weight=w, reduction=reduction, chunk_size=chunk_size, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    grads = torch.autograd.grad(loss, params, g)
    return loss, grads, g


def expected(x, W, b, t, w, *, reduction="mean", grad_out, logits_grad=False, **kw):
    """The float64 reference on the same (rounded) inputs: loss, gradients (and G = dL/dlogits)."""
    params = [x.detach().double().requires_grad_(), W.detach().double().requires_grad_()]
    if b is not None:
        params.append(b.detach().double().requires_grad_())
    w64 = w.double() if w is not None else None
    if not logits_grad:
        loss = reference.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2] if b is not None else None,
                                              weight=w64, reduction=reduction, **kw)
        return loss, torch.autograd.grad(loss, params, grad_out.double())
    # reference.linear_cross_entropy's composition (2-D input), with the logits kept for G
    z = params[0] @ params[1].T + (params[2] if b is not None else 0.0)
    loss = reference.cross_entropy(z, t, w64, reduction=reduction, **kw)
    *grads, G = torch.autograd.grad(loss, params + [z], grad_out.double())
    return loss, grads, G


# Unit roundoffs: of the accumulation dtype, and of the dtype G is rounded to on the mixed-precision CUDA path.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Probabilistic rounding-error bound of a length-K sum (Higham & Mary, SIAM J. Sci. Comput. 2019): the
# error of sum_k a_k b_k stays below lam * sqrt(K) * u * sum_k |a_k b_k| except with probability about
# 2K exp(-lam^2 / 2); lam = 8 makes that < 1e-8 per element at K = 131072.
LAMBDA = 8.0


def matmul_bounds(G, x, W, dtype, s, mixed):
    """Elementwise error bounds of the three gradients beyond the final rounding that TOL covers.

    The kernels' gradients are sums of products, not single roundings: dL/dX = G W sums V terms,
    dL/dW = G^T X and dL/db = sum_i G_i sum N terms, in fp32 (fp64 for fp64), by BLAS/cuBLAS. With
    |G| = |dL/dlogits| (float64, from the reference), each sum errs by at most
    LAMBDA * sqrt(K) * u_acc times the sum of its absolute terms (see LAMBDA).
    mixed: the CUDA bf16/fp16 path also rounds G to the input dtype before the two matmuls (cuBLAS takes
    one operand dtype, products accumulated in fp32; torch's chunked path rounds G the same way):
    |dG| <= u |G| + c_i, c_i half of fp16's smallest subnormal (2^-25) times the row's gradient scale s_i
    (G is rounded before the mean's scaling, i.e. as G / s_i), 0 for bf16 (fp32's exponent range). A sum
    of such rounded terms errs by at most (u |G| + c) @ |W| and (u |G| + c)^T @ |X|. The bias gradient
    sums G in fp32 before any rounding.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    N, V = G.shape
    u = UNIT_ROUNDOFF[acc]
    EV = LAMBDA * math.sqrt(V) * u * G
    EN = LAMBDA * math.sqrt(max(N, 1)) * u * G
    if mixed:
        c = (2.0**-25 * s if dtype == torch.float16 else torch.zeros_like(s))[:, None]
        EV = EV + UNIT_ROUNDOFF[dtype] * G + c
        EN = EN + UNIT_ROUNDOFF[dtype] * G + c
    absX, absW = x.double().abs(), W.double().abs()
    return EV @ absW, EN.T @ absX, EN.sum(0)


def assert_grads_close(grads, ref_grads, dtype, msg, bounds=None):
    """Gradients against the reference: |a - e| <= TOL (the final rounding) + bounds (matmul_bounds)."""
    names = ["input", "linear_weight", "linear_bias"]
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == dtype, f"{msg} grad {names[i]} dtype {a.dtype}"
        assert a.shape == e.shape, f"{msg} grad {names[i]} shape {tuple(a.shape)} != {tuple(e.shape)}"
        if bounds is None:
            assert_close(a, e, dtype, "grad", f"{msg} grad {names[i]}")
            continue
        rtol, atol = TOL[dtype]["grad"]
        a, e = a.double().cpu(), e.double().cpu()
        limit = rtol * e.abs() + atol * e.abs().max().item() + bounds[i].cpu()
        if dtype == torch.float16:
            limit = limit + 2.0**-25
        excess = (a - e).abs() - limit
        worst = excess.argmax()
        assert excess.max() <= 0 and not a.isnan().any(), (
            f"{msg} grad {names[i]}: |error| {(a - e).abs().view(-1)[worst]:.3g} exceeds the bound "
            f"{limit.view(-1)[worst]:.3g} at flat index {int(worst)} (value {e.view(-1)[worst]:.6g})")


def check_against_reference(backend, device, dtype, N, D, V, opts, reduction, chunk_size):
    opts = dict(opts)
    use_bias, use_weight = opts.pop("bias", False), opts.pop("weight", False)
    ignore_index = opts.get("ignore_index", -100)
    x, W, b, t, w = make_inputs(N, D, V, dtype, device, bias=use_bias, weight=use_weight, ignore_index=ignore_index)
    if device == "cpu":
        poison_cpu_allocator(max(N, 1) * V * 4)
    loss, grads, g = run(x, W, b, t, w, backend, reduction=reduction, chunk_size=chunk_size, **opts)
    ref_loss, ref_grads, G = expected(x, W, b, t, w, reduction=reduction, grad_out=g, logits_grad=True, **opts)
    msg = f"{backend} N={N} D={D} V={V} {opts} bias={use_bias} weight={use_weight} {reduction} chunk={chunk_size}"
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, dtype, "loss", msg)
    G = G.abs()
    # the row scale s_i of the gradient: |grad_out_i| for none, |grad_out| for sum, |grad_out| / denominator
    # for mean
    s = g.double().abs().expand(N)
    if reduction == "mean":
        kept = t != ignore_index
        s = s / ((w.double()[t.clamp(0, V - 1)] * kept).sum() if w is not None else kept.sum().double())
    # G rounded to bf16/fp16 before the gradient products: the CUDA cuBLAS path, and the fused Triton
    # kernels on any device (for fp16 they round to TF32, within the same bound)
    mixed = (device == "cuda" and _lce._mixed_precision(x)) or (
        backend == "triton" and dtype in (torch.bfloat16, torch.float16))
    assert_grads_close(grads, ref_grads, dtype, msg, matmul_bounds(G, x, W, dtype, s, mixed))


# --- the reference itself against torch ---------------------------------------------------------


@pytest.mark.skipif(not TORCH_HAS_LCE, reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_reference_matches_torch(batched, reduction, weighted, bias, label_smoothing, ignore_index):
    N, D, V = 6, 5, 7
    x = torch.randn(N, D, dtype=torch.float64) if batched else torch.randn(D, dtype=torch.float64)
    W = torch.randn(V, D, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,)) if batched else torch.tensor(4)
    if batched:
        t[::2] = ignore_index
        # the rows between stay scored: with every row ignored, a mean is 0/0 on both sides
        t[1::2] = torch.where(t[1::2] == ignore_index, (ignore_index + 1) % V, t[1::2])
    w = torch.rand(V, dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(linear_bias=b, weight=w, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    torch.testing.assert_close(reference.linear_cross_entropy(x, W, t, **kw), F.linear_cross_entropy(x, W, t, **kw))


# --- every backend against the reference ----------------------------------------------------------

SHAPES = [(1, 8, 7), (37, 24, 1023), (100, 48, 3001), (64, 128, 50257), (9, 64, 131071)]


def shape_param(N, D, V):
    marks = [pytest.mark.slow] if N * V > 2_000_000 or V * D > 4_000_000 else []
    return pytest.param(N, D, V, id=f"N{N}-D{D}-V{V}", marks=marks)


def chunk_for(kind, N):
    # (the automatic size runs in the no-grad and needed-gradient tests and opcheck; at these N, one chunk)
    return {"1": 1, "mid": max(1, N // 3), "over": N + 5}[kind]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("N,D,V", [shape_param(*s) for s in SHAPES])
@pytest.mark.parametrize("chunk", ["1", "mid", "over"])
def test_shapes(backend, device, dtype, N, D, V, chunk):
    require_backend(backend, device)
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-backend dtype")
    N = rows(backend, device, N)
    if interpreted(backend, device) and (N * V > 20_000 or chunk == "1"):
        pytest.skip("large shapes are too slow for Triton's CPU interpreter; they run on GPU")
    if chunk == "1" and N > 37:
        pytest.skip("one-row chunks of many rows: covered by the smaller shapes")
    check_against_reference(backend, device, dtype, N, D, V, OPTIONS["everything"], "mean", chunk_for(chunk, N))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(backend, device, dtype, opts, reduction):
    require_backend(backend, device)
    if device == "cpu" and (dtype != torch.float32 or interpreted(backend, device) and reduction != "mean") and (
            opts not in ("plain", "everything")):
        pytest.skip("on CPU (fp32 GEMMs for every dtype) each option in float32, bf16/fp16 with all at once "
                    "(and with Triton's interpreter each option with one reduction)")
    N = rows(backend, device, 37)
    check_against_reference(backend, device, dtype, N, 16, 257, OPTIONS[opts], reduction, max(1, N // 3))


@pytest.mark.skipif(not TORCH_HAS_LCE, reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("torch_path", ["plain", "chunked"])
def test_matches_torch(backend, device, reduction, torch_path):
    """Drop-in: the numbers of torch's F.linear_cross_entropy (its plain and its chunked path) in float32."""
    require_backend(backend, device)
    if interpreted(backend, device) and reduction != "mean":
        pytest.skip("Triton's CPU interpreter: one reduction")
    if torch_path == "chunked" and TORCH_LCE_OPTIONS is None:
        pytest.skip("torch has no LinearCrossEntropyOptions")
    N = rows(backend, device, 40)
    x, W, b, t, w = make_inputs(N, 32, 333, torch.float32, device, bias=True, weight=True, ignore_index=-100)
    g = torch.randn(N, device=device) if reduction == "none" else torch.tensor(0.7, device=device)
    cases = [{}, {"ignore_index": None}] + ([{"label_smoothing": 0.2}] if torch_path == "plain" else [])
    for kw in cases:
        ours, our_grads, _ = run(x, W, b, t, w, backend, reduction=reduction, grad_out=g, chunk_size=7, **kw)
        params = [v.detach().clone().requires_grad_() for v in (x, W, b)]
        options = TORCH_LCE_OPTIONS(batch_chunk_size=16) if torch_path == "chunked" else None
        theirs = F.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2], weight=w, reduction=reduction,
                                        options=options, **kw)
        their_grads = torch.autograd.grad(theirs, params, g)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        for a, e in zip(our_grads, their_grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


# --- layouts and shapes of the arguments ----------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["1-d", "leading-dims", "strided-input", "transposed-weight", "empty",
                                    "all-ignored"])
def test_layouts(backend, device, layout):
    require_backend(backend, device)
    D, V = 12, 41
    n = rows(backend, device, 8)
    x = torch.randn(n, D, device=device)
    W = torch.randn(V, D, device=device)
    t = torch.randint(0, V, (n,), device=device)
    if layout == "1-d":
        x, t = x[0], t[0]
    elif layout == "leading-dims":
        x, t = torch.randn(2, 3, D, device=device), torch.randint(0, V, (2, 3), device=device)
        t[0, 1] = -100
    elif layout == "strided-input":
        x = torch.randn(n, 2 * D + 1, device=device)[:, 1:2 * D + 1:2]  # row stride 2D+1, element stride 2
    elif layout == "transposed-weight":
        W = torch.randn(D, V, device=device).T  # (V, D) with stride (1, V): a tied (D, V) embedding, say
    elif layout == "empty":
        x, t = x[:0], t[:0]
    else:
        t = torch.full_like(t, -100)
    for reduction in REDUCTIONS:
        g = torch.randn(t.shape, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
        loss, grads, _ = run(x, W, None, t, None, backend, reduction=reduction, grad_out=g, chunk_size=3,
                             label_smoothing=0.1)
        ref_loss, ref_grads = expected(x, W, None, t, None, reduction=reduction, grad_out=g, label_smoothing=0.1)
        assert loss.shape == ref_loss.shape
        assert_close(loss, ref_loss, torch.float32, "loss", layout)
        for a, e in zip(grads, ref_grads):
            assert_close(a, e, torch.float32, "grad", f"{layout} {reduction}")


# --- gradients only where they are needed ---------------------------------------------------------


class _ChunkLoops(TorchDispatchMode):
    """Records the gradient flags of every chunk loop (fusedloss::linear_cross_entropy_chunks) that runs,
    whether called from Python or from the op's C++ autograd."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fusedloss.linear_cross_entropy_chunks.default:
            self.calls.append(dict(grad_scale=args[5] is not None, chunk_size=args[10], input_grad=args[11],
                                   weight_grad=args[12], bias_grad=args[13]))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def spy():
    """The calls of the chunk loop made inside the test."""
    with _ChunkLoops() as mode:
        yield mode.calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_path_builds_no_gradients(spy, reduction):
    x, W, b, t, w = make_inputs(20, 8, 33, torch.float32, "cpu", bias=True, weight=True)
    want = reference.linear_cross_entropy(x.double(), W.double(), t, linear_bias=b.double(), weight=w.double(),
                                          reduction=reduction)
    params = [v.clone().requires_grad_() for v in (x, W, b)]
    with torch.no_grad():
        loss = fusedloss.linear_cross_entropy(*params[:2], t, linear_bias=params[2], weight=w, reduction=reduction,
                                              backend="cpu")
    assert loss.grad_fn is None
    loss2 = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, backend="cpu")
    assert loss2.grad_fn is None  # nothing requires grad
    for out in (loss, loss2):
        assert_close(out, want, torch.float32, "loss", "no grad")
    assert [(c["input_grad"], c["weight_grad"], c["bias_grad"]) for c in spy] == [(False, False, False)] * 2


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_only_the_needed_gradients(spy, reduction):
    """A frozen head (linear_weight not requiring grad) never allocates its (V, D) gradient."""
    x, W, b, t, _ = make_inputs(20, 8, 33, torch.float32, "cpu", bias=True)
    xa = x.clone().requires_grad_()
    loss = fusedloss.linear_cross_entropy(xa, W, t, linear_bias=b, reduction=reduction, backend="cpu")
    loss.sum().backward()
    x64 = x.double().requires_grad_()
    reference.linear_cross_entropy(x64, W.double(), t, linear_bias=b.double(), reduction=reduction).sum().backward()
    assert_close(xa.grad, x64.grad, torch.float32, "grad", reduction)
    flags = [(c["input_grad"], c["weight_grad"], c["bias_grad"]) for c in spy]
    assert flags == ([(True, False, False)] if reduction != "none" else [(False, False, False), (True, False, False)])


def test_options_object_sets_the_chunk_size(spy):
    if TORCH_LCE_OPTIONS is None:
        pytest.skip("torch has no LinearCrossEntropyOptions")
    x, W, _, t, _ = make_inputs(20, 8, 33, torch.float32, "cpu")
    fusedloss.linear_cross_entropy(x, W, t, options=TORCH_LCE_OPTIONS(batch_chunk_size=5), backend="cpu")
    fusedloss.linear_cross_entropy(x, W, t, options=TORCH_LCE_OPTIONS(batch_chunk_size=5), chunk_size=3, backend="cpu")
    fusedloss.linear_cross_entropy(x, W, t, options=TORCH_LCE_OPTIONS(), backend="cpu")
    assert [c["chunk_size"] for c in spy] == [5, 3, _lce.auto_chunk_size(20, 8, 33, x.device, x.dtype)]


def test_auto_chunk_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # CPU: 256..512 rows, 0.4 N - 0.8 D (a fifth of the naive head's peak) within those bounds
    assert _lce.auto_chunk_size(4096, 1024, 32000, cpu, torch.float32) == 512
    assert _lce.auto_chunk_size(4096, 1024, 32000, cpu, torch.bfloat16) == 512  # fp32 logits either way
    assert _lce.auto_chunk_size(2048, 512, 128256, cpu, torch.float32) == 384
    assert _lce.auto_chunk_size(512, 4096, 32000, cpu, torch.float32) == 256  # no chunk reaches a fifth: speed
    assert _lce.auto_chunk_size(1 << 20, 4096, 1 << 20, cpu, torch.float32) * (1 << 20) * 4 <= 512 << 20
    rows_ = _lce.auto_chunk_size(1 << 20, 4096, 32000, cuda, torch.bfloat16)
    assert rows_ % 32 == 0 and 128 << 20 <= rows_ * 32000 * 4 <= 256 << 20  # a few hundred MB (fp32 logits)
    assert _lce.auto_chunk_size(10, 64, 1 << 22, cpu, torch.float32) == 10  # at least MIN_CHUNK_ROWS, at most N
    assert _lce.auto_chunk_size(1000, 64, 1 << 22, cpu, torch.float32) == _lce.MIN_CHUNK_ROWS["cpu"]
    assert _lce.auto_chunk_size(0, 64, 1000, cpu, torch.float32) == 1


# --- autograd details -----------------------------------------------------------------------------


def test_second_backward_through_a_reduced_loss_is_a_clear_error():
    x, W, _, t, _ = make_inputs(10, 8, 17, torch.float32, "cpu")
    xa, Wa = x.requires_grad_(), W.requires_grad_()
    loss = fusedloss.linear_cross_entropy(xa, Wa, t, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    # Without retain_graph the engine freed the saved gradients: torch's own message, which names it.
    loss = fusedloss.linear_cross_entropy(xa, Wa, t, backend="cpu")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_reduction_none_allows_retain_graph():
    x, W, _, t, _ = make_inputs(10, 8, 17, torch.float32, "cpu")
    xa = x.clone().requires_grad_()
    loss = fusedloss.linear_cross_entropy(xa, W, t, reduction="none", backend="cpu").sum()
    loss.backward(retain_graph=True)
    first = xa.grad.clone()
    loss.backward()
    torch.testing.assert_close(xa.grad, 2 * first)


@pytest.mark.parametrize("reduction", ["none"])
def test_gradcheck_float64(reduction):
    """reduction none only: gradcheck runs two backwards through one graph (its reentrancy check), which
    mean and sum refuse by design (their gradients are computed in the forward and consumed); their
    float64 gradients are checked against the reference at 1e-10 in test_shapes."""
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 6, 0, 3])
    w = torch.rand(7, dtype=torch.float64) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, z_loss=0.01, softcap=3.0, chunk_size=2,
              backend="cpu")
    assert torch.autograd.gradcheck(lambda x, W, b: fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, **kw),
                                    (x, W, b))


def test_double_backward_is_a_clear_error():
    x, W, _, t, _ = make_inputs(6, 4, 9, torch.float32, "cpu")
    xa = x.requires_grad_()
    loss = fusedloss.linear_cross_entropy(xa, W, t, reduction="none", backend="cpu").sum()
    (g,) = torch.autograd.grad(loss, xa, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# --- PyTorch integration --------------------------------------------------------------------------


def _op_args(device, reduction, backend):
    """Arguments of the public-level op (fusedloss::linear_cross_entropy, or its Triton twin)."""
    x, W, b, t, w = make_inputs(rows(backend, device, 9), 8, 37, torch.float32, device, bias=True, weight=True)
    r = REDUCTION[reduction]
    u = torch.rand(x.shape[0], device=device) + 0.25  # token weights
    yield (x.requires_grad_(), W.requires_grad_(), t, b.requires_grad_(), w, u, -100, r, 0.1, 1e-3, 7.0, 4)
    if reduction == "mean":  # a frozen input and bias, no class weight, no token weights, one chunk
        yield (x.detach(), W.detach().requires_grad_(), t, None, None, None, -100, r, 0.0, 0.0, 0.0, 100)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(backend, device, reduction):
    require_backend(backend, device)
    # Fake tensors (test_faketensor, and torch.compile in the aot_dispatch tests) cannot run a triton_op on
    # CPU tensors: the interpreter needs real data pointers.
    tests = ("test_schema", "test_autograd_registration") if interpreted(backend, device) else None
    op = _lce.LINEAR_CROSS_ENTROPY.op(backend)
    for args in _op_args(device, reduction, backend):
        torch.library.opcheck(op, args, test_utils=tests or torch.library._OPCHECK_DEFAULT_UTILS)
    if backend != "triton":
        x, W, t, b, w = (a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5])
        chunks = torch.ops.fusedloss.linear_cross_entropy_chunks.default
        for flags in ((True, True, True), (False, True, False)):
            torch.library.opcheck(chunks, (x, W, t, b, w, torch.randn(x.shape[0], device=device), -100, 0.0, 0.0, 0.0,
                                           3, *flags), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph(backend, device, dtype, reduction):
    """torch.compile(fullgraph=True) traces around the op, forward and backward. (The op is opaque to the
    compiler whatever its backend: on CPU the cpu backend stands for all.)"""
    require_backend(backend, device)
    if device == "cpu" and dtype == torch.bfloat16 and reduction != "mean":
        pytest.skip("on CPU: bf16 with one reduction")
    N = rows(backend, device, 16)
    x, W, b, t, w = make_inputs(N, 16, 203, dtype, device, bias=True, weight=True)
    scale = torch.linspace(0, 1, N, device=device)

    def step(x, W, b, w, backend=backend):
        loss = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                              label_smoothing=0.1, z_loss=1e-4, chunk_size=5, backend=backend)
        return (loss * scale.to(loss.dtype)).sum() if reduction == "none" else loss * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    a = [v.clone().requires_grad_() for v in (x, W, b)]
    r = [v.double().requires_grad_() for v in (x, W, b)]
    out_c, out_r = compiled(*a, w), step(*r, w.double(), backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, dtype, "loss", "compiled")
    for p, q, what in zip(a, r, ("input", "linear_weight", "linear_bias")):
        assert_close(p.grad, q.grad, dtype, "grad", f"compiled {what}")


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [17, -1, -101])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_out_of_range_raises_index_error(backend, bad, reduction):
    x, W, _, t, _ = make_inputs(5, 4, 17, torch.float32, "cpu")
    t[2] = bad
    with pytest.raises(IndexError, match="out of range"):
        fusedloss.linear_cross_entropy(x.requires_grad_(), W, t, reduction=reduction, backend=backend)
    with pytest.raises(IndexError, match="out of range"), torch.no_grad():
        fusedloss.linear_cross_entropy(x, W, t, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
def test_target_out_of_range_on_gpu_backends_gives_nan_rows(backend, device):
    """As cross_entropy on GPU: never reads out of bounds, that row's loss and gradients are NaN."""
    require_backend(backend, device)
    x, W, _, t, _ = make_inputs(3, 4, 5, torch.float32, device)
    t = torch.tensor([0, 5, 1], device=device)
    xa = x.requires_grad_()
    loss = fusedloss.linear_cross_entropy(xa, W, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(xa.grad[1]).all() and torch.isfinite(xa.grad[[0, 2]]).all()


LCE = fusedloss.linear_cross_entropy


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, W, t: LCE(x.long(), W, t), TypeError, "input"),
        (lambda x, W, t: LCE(x, W.long(), t), TypeError, "linear_weight"),
        (lambda x, W, t: LCE(x, W.double(), t), TypeError, "linear_weight has dtype"),
        (lambda x, W, t: LCE(x, W[:, :3], t), ValueError, "features"),
        (lambda x, W, t: LCE(x, W[0], t), ValueError, "linear_weight must be"),
        (lambda x, W, t: LCE(x, W.view(5, 1, 4), t), NotImplementedError, "K-dimensional"),
        (lambda x, W, t: LCE(x, W[:0], t), ValueError, "no classes"),
        (lambda x, W, t: LCE(x, W, t, linear_bias=torch.zeros(4)), ValueError, "linear_bias must have shape"),
        (lambda x, W, t: LCE(x, W, t, linear_bias=torch.zeros(5, dtype=torch.float64)), TypeError, "linear_bias"),
        (lambda x, W, t: LCE(x, W, t, linear_bias=torch.zeros(5, dtype=torch.long)), TypeError, "linear_bias"),
        (lambda x, W, t: LCE(x, W, t, linear_bias=torch.zeros(5, device="meta")), RuntimeError, "linear_bias is on"),
        (lambda x, W, t: LCE(x, W.to("meta"), t), RuntimeError, "linear_weight is on"),
        (lambda x, W, t: LCE(x, W, t.to("meta")), RuntimeError, "target is on"),
        (lambda x, W, t: LCE(x, W, t.float()), NotImplementedError, "probability targets"),
        (lambda x, W, t: LCE(x, W, t.bool()), TypeError, "target"),
        (lambda x, W, t: LCE(x, W, t[:2]), ValueError, "target must have shape"),
        (lambda x, W, t: LCE(x, W, [0, 1, 2]), TypeError, "target"),
        (lambda x, W, t: LCE(x[0, 0], W, t), ValueError, "input"),
        (lambda x, W, t: LCE(x, W, t, weight=torch.ones(4)), ValueError, "weight"),
        (lambda x, W, t: LCE(x, W, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, W, t: LCE(x, W, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda x, W, t: LCE(x, W, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda x, W, t: LCE(x, W, t, softcap=0.0), ValueError, "softcap"),
        (lambda x, W, t: LCE(x, W, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda x, W, t: LCE(x, W, t, chunk_size=2.5), ValueError, "chunk_size"),
        (lambda x, W, t: LCE(x, W, t, backend="cuda"), RuntimeError, "cuda"),
        (lambda x, W, t: LCE(x, W, t, backend="tpu"), ValueError, "backend"),
    ],
)
def test_bad_input(call, error, match):
    x = torch.randn(3, 4)
    W = torch.randn(5, 4)
    t = torch.tensor([0, 4, 1])
    with pytest.raises(error, match=match):
        call(x, W, t)


# --- the module -----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch has no LinearCrossEntropyLoss")
def test_module_is_drop_in_for_torchs_twin():
    w = torch.rand(10)
    ours = fusedloss.nn.LinearCrossEntropyLoss(6, 10, bias=True, weight=w, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(6, 10, bias=True, weight=w, ignore_index=1, label_smoothing=0.1)
    theirs.load_state_dict(ours.state_dict())
    assert list(dict(ours.named_parameters())) == list(dict(theirs.named_parameters()))
    x = torch.randn(8, 6)
    t = torch.randint(0, 10, (8,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    ours(x, t).backward()
    theirs(x, t).backward()
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    assert "in_features=6" in repr(ours) and "label_smoothing=0.1" in repr(ours)
    with pytest.raises(TypeError, match="loss\\(input, target\\)"):
        ours(x, ours.linear.weight, t)


def test_module_holding_only_options():
    loss = fusedloss.nn.LinearCrossEntropyLoss(reduction="sum", z_loss=1e-3, chunk_size=4, backend="cpu")
    assert list(loss.parameters()) == []
    x, W, b, t, _ = make_inputs(9, 5, 13, torch.float32, "cpu", bias=True)
    want = reference.linear_cross_entropy(x.double(), W.double(), t, linear_bias=b.double(), reduction="sum",
                                          z_loss=1e-3)
    assert_close(loss(x, W, t, linear_bias=b), want, torch.float32, "loss", "module")
    with pytest.raises(TypeError, match="linear_weight"):
        loss(x, t)
    with pytest.raises(ValueError, match="in_features and num_classes"):
        fusedloss.nn.LinearCrossEntropyLoss(6)
    with pytest.raises(NotImplementedError, match="out_features"):
        fusedloss.nn.LinearCrossEntropyLoss(6, 10, out_features=(3,))


# --- the CPU chunk loop's row kernel on class-major logits: fusedloss::cross_entropy_fwd_grad_cols_ ---

COLS_OPTIONS = {
    "plain": (False, -100, 0.0, 0.0, 0.0, 1.0),
    "weight": (True, -100, 0.0, 0.0, 0.0, 1.0),
    "weight+smoothing": (True, -100, 0.25, 0.0, 0.0, 1.0),
    "z_loss": (False, -100, 0.0, 1e-3, 0.0, 1.0),
    "softcap+temperature": (False, -100, 0.0, 0.0, 5.0, 0.7),
    "in-range ignore_index": (False, 3, 0.0, 0.0, 0.0, 1.0),
    "everything": (True, -100, 0.05, 1e-4, 30.0, 1.3),
}


def check_cols(N, C, dtype, opts, grad_scale, x=None, t=None):
    """The op on fresh class-major logits, in place, against the float64 reference (autograd, reduction none)."""
    use_weight, ignore_index, *scalars = COLS_OPTIONS[opts]
    if x is None:
        x = torch.randn(N, C, dtype=dtype) * 3
        t = torch.randint(0, C, (N,))
        t[::5] = ignore_index if ignore_index < 0 else t[::5]
    w = torch.rand(C, dtype=dtype) + 0.5 if use_weight else None
    g = {"none": None, "vector": torch.randn(N, dtype=dtype),
         "scalar": torch.tensor(0.37, dtype=dtype).expand(N)}[grad_scale]
    # Guard bands of NaN on both sides: a write outside the (C, N) block shows.
    pad = 64
    buf = torch.full((N * C + 2 * pad,), float("nan"), dtype=dtype)
    logits_t = buf[pad:pad + N * C].view(C, N)
    logits_t.copy_(x.T)
    poison_cpu_allocator(8 * N * 8)
    loss, lse = torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(logits_t, t, w, g, ignore_index, *scalars)

    x64 = x.double().requires_grad_()
    ref_loss, ref_lse = reference.cross_entropy(x64, t, w.double() if w is not None else None, ignore_index=ignore_index,
                                                reduction="none", label_smoothing=scalars[0], z_loss=scalars[1],
                                                softcap=scalars[2] or None, temperature=scalars[3], return_lse=True)
    (ref_grad,) = torch.autograd.grad(ref_loss, x64, g.double() if g is not None else torch.ones_like(ref_loss))
    msg = f"cols N={N} C={C} {dtype} {opts} grad_scale={grad_scale}"
    assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + N * C:]).all(), f"{msg}: wrote outside logits"
    assert loss.shape == (N,) and lse.shape == (N,) and loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", msg + " loss")
    assert_close(lse, ref_lse, dtype, "loss", msg + " lse")
    assert_close(logits_t.T, ref_grad, dtype, "grad", msg + " grad")
    ignored = t == ignore_index
    assert (logits_t.T[ignored] == 0).all() and (loss[ignored] == 0).all() and (lse[ignored] == 0).all()


# Columns: 1 (scalar path only), 31/32/33 and 65/97 around the 32-column fp32 groups (16 for fp64), 128
# (the CPU chunk at the headline shape); classes around the 128-class blocks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,C", [(1, 7), (7, 1), (31, 129), (32, 128), (33, 1023), (65, 7), (97, 300), (128, 4097),
                                 (17, 50257), (3, 131072), (40, 131071)])
def test_cols_shapes(dtype, N, C):
    check_cols(N, C, dtype, "everything", "vector")


@pytest.mark.parametrize("opts", list(COLS_OPTIONS))
@pytest.mark.parametrize("grad_scale", ["none", "vector", "scalar"])
def test_cols_options(opts, grad_scale):
    check_cols(40, 1023, torch.float32, opts, grad_scale)


def test_cols_edge_columns():
    """Non-finite and huge logits in the vector groups and in the scalar tail: torch's answers."""
    N, C = 35, 300
    x = torch.randn(N, C)
    t = torch.randint(0, C, (N,))
    x[0, 5] = float("nan")                   # NaN poisons its row
    x[1, :] = float("-inf"); x[1, 7] = 2.0   # one finite logit
    x[2, 0] = float("inf")
    x[3] *= 1e30                             # huge: the lse must keep log_s
    x[33, 9] = float("nan")                  # in the scalar tail
    x[34] *= 1e30
    t[1] = 7
    t[4] = -100                              # an ignored row with a NaN logit still gets zeros
    x[4, 3] = float("nan")
    loss, lse = torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x.T.contiguous(), t, None, None, -100, 0.0, 0.0,
                                                                 0.0, 1.0)
    x64 = x.double()
    want = F.cross_entropy(x64, t, reduction="none")
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True), (loss, want)
    assert loss[4] == 0 and lse[4] == 0


def test_cols_rejects_bad_layout_and_targets():
    x = torch.randn(50, 8)
    t = torch.randint(0, 50, (8,))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x.T, t, None, None, -100, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x.half(), t, None, None, -100, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="target must have shape"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x, t[:3], None, None, -100, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x, t, torch.ones(8), None, -100, 0.0, 0.0, 0.0, 1.0)
    before = x.clone()
    t[3] = 50
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.fusedloss.cross_entropy_fwd_grad_cols_(x, t, None, None, -100, 0.0, 0.0, 0.0, 1.0)
    assert torch.equal(x, before)


def test_cols_opcheck():
    x = torch.randn(300, 40)
    t = torch.randint(0, 300, (40,))
    torch.library.opcheck(torch.ops.fusedloss.cross_entropy_fwd_grad_cols_.default,
                          (x, t, torch.rand(300) + 0.5, torch.randn(40), -100, 0.1, 1e-3, 0.0, 1.0))


def test_cpu_class_major_loop_is_thread_count_independent(spy):
    """Chunks above CLASS_MAJOR_MIN_LOGITS take the class-major loop: its GEMMs and row kernel give the
    same bits with 1 and 2 threads (tests/test_hardening.py checks a small shape, the row-major loop)."""
    x, W, _, t, w = make_inputs(300, 64, 4001, torch.float32, "cpu", weight=True)
    assert 300 * 4001 >= _lce.CLASS_MAJOR_MIN_LOGITS
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
            loss = fusedloss.linear_cross_entropy(xa, Wa, t, weight=w, label_smoothing=0.1, backend="cpu")
            loss.backward()
            results.append((loss, xa.grad, Wa.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.fixture
def class_major_everywhere(monkeypatch):
    """Every CPU chunk takes the class-major loop, however small (the default threshold sends small
    chunks to the row-major loop)."""
    monkeypatch.setattr(_lce, "CLASS_MAJOR_MIN_LOGITS", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("N,D,V", [shape_param(*s) for s in SHAPES])
@pytest.mark.parametrize("chunk", ["1", "mid", "over"])
def test_cpu_class_major_loop_shapes(class_major_everywhere, dtype, N, D, V, chunk):
    if chunk == "1" and N > 37:
        pytest.skip("one-row chunks of many rows: covered by the smaller shapes")
    check_against_reference("cpu", "cpu", dtype, N, D, V, OPTIONS["everything"], "mean", chunk_for(chunk, N))


@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_class_major_loop_options(class_major_everywhere, opts, reduction):
    check_against_reference("cpu", "cpu", torch.float32, 37, 16, 257, OPTIONS[opts], reduction, 12)


@pytest.mark.parametrize("backend,device", backend_params() + [pytest.param("reference", "cpu", id="reference-cpu")])
@pytest.mark.parametrize("t_shape", [(), (1,)], ids=str)
def test_unbatched_input_takes_torchs_target_forms(backend, device, t_shape):
    """(D,) input with a 0-dim or (1,) target, a 0-dim result, as torch's F.linear_cross_entropy (issue #15)."""
    require_backend(backend, device)
    x, W, b, _, w = make_inputs(1, 16, 37, torch.float32, device, bias=True, weight=True)
    t = torch.randint(0, 37, t_shape, device=device)
    for reduction in REDUCTIONS:
        loss, grads, g = run(x[0], W, b, t, w, backend, reduction=reduction, label_smoothing=0.1)
        assert loss.shape == ()
        ref, ref_grads, _ = run(x[0].double(), W.double(), b.double(), t.view(()), w.double(), "reference",
                             reduction=reduction, grad_out=g.double(), label_smoothing=0.1)
        assert_close(loss, ref, torch.float32, "loss", f"{backend} {t_shape} {reduction}")
        for a, e in zip(grads, ref_grads):
            assert_close(a, e, torch.float32, "grad", f"{backend} {t_shape} {reduction}")
        if TORCH_HAS_LCE:  # (torch's forward refuses weight with label smoothing in the (1,) form)
            theirs = F.linear_cross_entropy(x[0].double(), W.double(), t, linear_bias=b.double(), reduction=reduction)
            ours = fusedloss.linear_cross_entropy(x[0], W, t, linear_bias=b, reduction=reduction, backend=backend)
            assert theirs.shape == ours.shape
            assert_close(ours, theirs, torch.float32, "loss", f"{backend} {t_shape} {reduction} vs torch")
