"""The fused Triton linear cross-entropy (fusedloss/triton/linear_cross_entropy.py, issue #18) against the
float64 reference, plus shift and return_lse on every backend.

tests/test_linear_cross_entropy.py runs the triton backend through its shape / option / layout tables too;
this file covers what is particular to the fused kernels: several blocks in every dimension (small interpreter
tiles), vocabulary splits and their merge, temperature (the op takes it), the gradient of the returned lse, the
16-bit error against plain PyTorch's in the same dtype, memory (no (rows, V) buffer), determinism, opcheck and
the opt-in gradient filter. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly: sizes are small).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, interpreted, require_backend, rows, with_reference
from test_linear_cross_entropy import assert_grads_close, check_against_reference, make_inputs, matmul_bounds

import fusedloss
from fusedloss import _memory, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EVERYTHING = {"bias": True, "weight": True, "label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0}


def _kernels():
    from fusedloss.triton import linear_cross_entropy as kernels

    return kernels


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide interpreter tiles: several row, vocabulary, K and D blocks at small sizes."""
    require_backend("triton", "cpu")
    kernels = _kernels()
    if kernels._INTERPRET:
        monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_N", 16)
        monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_V", 16)
        monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_K", 16)
        monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_DO", 16)
    return kernels


def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the fused op against the reference -----------------------------------------------------------


def op_case(N, D, V, dtype, device, *, bias, weight, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
            softcap=0.0, temperature=1.0, grad_lse=True, seed_rows=None):
    """The triton ops (autograd through fwd_triton) on fresh inputs against the float64 reference with
    every option the op takes, temperature included; loss, lse and the gradients of
    sum(g * loss + h * lse)."""
    x, W, b, t, w = make_inputs(N, D, V, dtype, device, bias=bias, weight=weight, ignore_index=ignore_index)
    params = [x.clone().requires_grad_(), W.clone().requires_grad_()] + ([b.clone().requires_grad_()] if bias else [])
    loss, lse, *_ = torch.ops.fusedloss.linear_cross_entropy_fwd_triton(
        params[0], params[1], t, params[2] if bias else None, w, ignore_index, label_smoothing, z_loss, softcap,
        temperature, 0)
    g = torch.randn(N, device=device)
    h = torch.randn(N, device=device) if grad_lse else torch.zeros(N, device=device)
    grads = torch.autograd.grad((loss * g).sum() + (lse * h).sum(), params)

    p64 = [v.detach().double().requires_grad_() for v in (x, W) + ((b,) if bias else ())]
    z = p64[0] @ p64[1].T + (p64[2] if bias else 0.0)
    ref_loss, ref_lse = reference.cross_entropy(z, t, w.double() if w is not None else None, ignore_index=ignore_index,
                                                reduction="none", label_smoothing=label_smoothing, z_loss=z_loss,
                                                softcap=softcap or None, temperature=temperature, return_lse=True)
    total = (ref_loss * g.double()).sum() + (ref_lse * h.double()).sum()
    *ref_grads, G = torch.autograd.grad(total, p64 + [z])
    msg = f"fused N={N} D={D} V={V} {dtype} T={temperature} softcap={softcap} eps={label_smoothing}"
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, "loss", msg + " loss")
    assert_close(lse, ref_lse, dtype, "loss", msg + " lse")
    s = torch.ones(N, dtype=torch.float64)
    bounds = matmul_bounds(G.abs().cpu(), x.cpu(), W.cpu(), dtype, s, dtype != torch.float32)
    assert_grads_close(grads, ref_grads, dtype, msg, bounds)
    return loss, lse, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "temperature+softcap", "everything"])
def test_many_blocks(small_blocks, dtype, case):
    """37 rows (3 row blocks), D=40 (3 K steps, 3 D blocks), V=70 (5 vocabulary blocks, the last partial,
    two splits merged): every option, temperature, and the lse's own gradient."""
    if dtype != torch.float32 and case != "everything":
        pytest.skip("16-bit: all options at once")
    kw = {"plain": dict(bias=False, weight=False),
          "temperature+softcap": dict(bias=False, weight=False, softcap=5.0, temperature=0.7),
          "everything": dict(bias=True, weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=20.0,
                             temperature=1.3)}[case]
    assert small_blocks._vocab_splits(37, 70, torch.device("cpu"))[0] == 2
    op_case(37, 40, 70, dtype, triton_device(), **kw)


@pytest.mark.parametrize("N,D,V", [(1, 5, 7), (5, 3, 1), (17, 16, 33), (9, 70, 129)])
def test_edge_shapes(N, D, V):
    """V below one block, V = 1, D below 16 (tl.dot's minimum tile), one row, D above a block."""
    require_backend("triton", triton_device())
    op_case(N, D, V, torch.float32, triton_device(), bias=True, weight=True, label_smoothing=0.2, z_loss=1e-3)


def test_in_range_ignore_index_and_all_ignored():
    require_backend("triton", triton_device())
    device = triton_device()
    op_case(9, 12, 41, torch.float32, device, bias=False, weight=True, ignore_index=3, label_smoothing=0.1)
    x, W, _, t, w = make_inputs(6, 8, 19, torch.float32, device, weight=True)
    t = torch.full_like(t, -100)
    xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
    for reduction in ("none", "sum", "mean"):
        loss, lse = fusedloss.linear_cross_entropy(xa, Wa, t, weight=w, reduction=reduction, return_lse=True,
                                                   backend="triton")
        assert (lse == 0).all()
        if reduction == "mean":
            assert torch.isnan(loss)  # 0 / 0, as torch
            continue
        assert (loss == 0).all()
        gx, gW = torch.autograd.grad(loss.sum(), (xa, Wa))
        assert (gx == 0).all() and (gW == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_error_against_plain_pytorch(dtype):
    """The 16-bit rule: the fused kernels' error against float64 is within a small multiple of plain
    PyTorch's in the same dtype (F.cross_entropy(x @ W.T, t) on bf16/fp16 tensors)."""
    device = triton_device()
    require_backend("triton", device)
    x, W, _, t, _ = make_inputs(17, 64, 300, dtype, device)

    def errors(fn):
        xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(xa, Wa)
        gx, gW = torch.autograd.grad(loss, (xa, Wa))
        return loss, gx, gW

    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    ref = F.cross_entropy(x64 @ W64.T, t)
    ref_grads = torch.autograd.grad(ref, (x64, W64))
    ours = errors(lambda a, b: fusedloss.linear_cross_entropy(a, b, t, backend="triton"))
    plain = errors(lambda a, b: F.cross_entropy(a @ b.T, t))
    for name, o, p, e in zip(("loss", "grad input", "grad weight"), ours, plain, (ref,) + ref_grads):
        err_ours = (o.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6 * e.abs().max().item(), (name, err_ours, err_plain)


def test_float64_on_the_triton_backend_takes_the_chunked_path():
    device = triton_device()
    require_backend("triton", device)
    check_against_reference("triton", device, torch.float64, 9, 8, 37, EVERYTHING, "mean", 4)


# --- shift and return_lse on every backend ----------------------------------------------------------

ALL_BACKENDS = with_reference(("cpu",))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift(backend, device, reduction):
    """shift=1 on (B, T, D) input with (B, T) targets equals the unshifted loss of x[:, :-1] against t[:, 1:]
    (the last position 0 with reduction none), forward and gradients (0 for the last positions)."""
    require_backend(backend, device)
    if interpreted(backend, device) and reduction == "sum":
        pytest.skip("Triton's CPU interpreter: two reductions")
    B, T, D, V = 2, rows(backend, device, 7) // 2 + 2, 12, 53
    x = torch.randn(B, T, D, device=device)
    W = torch.randn(V, D, device=device) * 0.5
    t = torch.randint(0, V, (B, T), device=device)
    t[0, 2] = -100
    t[1, 0] = -100  # the first target is never scored anyway
    xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss, lse = fusedloss.linear_cross_entropy(xa, Wa, t, shift=1, reduction=reduction, label_smoothing=0.1,
                                               return_lse=True, backend=backend)
    g = torch.randn(B, T, device=device) if reduction == "none" else torch.tensor(1.7, device=device)
    gx, gW = torch.autograd.grad(loss, (xa, Wa), g)

    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    want, want_lse = reference.linear_cross_entropy(x64[:, :-1], W64, t[:, 1:], reduction=reduction,
                                                    label_smoothing=0.1, return_lse=True)
    if reduction == "none":
        want = torch.cat([want, want.new_zeros(B, 1)], 1)
        want_lse = torch.cat([want_lse, want_lse.new_zeros(B, 1)], 1)
        rx, rW = torch.autograd.grad(want, (x64, W64), g.double())
    else:
        rx, rW = torch.autograd.grad(want, (x64, W64), g.double())
        want_lse = torch.cat([want_lse, want_lse.new_zeros(B, 1)], 1)
    assert loss.shape == want.shape and lse.shape == (B, T)
    assert_close(loss, want, torch.float32, "loss", f"{backend} shift {reduction}")
    assert_close(lse, want_lse, torch.float32, "loss", f"{backend} shift lse")
    assert_close(gx, rx, torch.float32, "grad", f"{backend} shift grad input")
    assert_close(gW, rW, torch.float32, "grad", f"{backend} shift grad weight")
    assert (gx[:, -1] == 0).all()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_shift_of_one_sequence_and_bad_values(backend, device):
    require_backend(backend, device)
    x = torch.randn(5, 4, device=device)
    W = torch.randn(9, 4, device=device)
    t = torch.randint(0, 9, (5,), device=device)
    got = fusedloss.linear_cross_entropy(x, W, t, shift=1, reduction="none", backend=backend)
    want = reference.linear_cross_entropy(x.double(), W.double(), torch.cat([t[1:], t.new_tensor([-100])]),
                                          reduction="none")
    assert_close(got, want, torch.float32, "loss", f"{backend} 1-sequence shift")
    assert fusedloss.linear_cross_entropy(x[0], W, t[0], shift=1, reduction="none", backend=backend) == 0
    for bad in (2, -1, True, 0.5):
        with pytest.raises(ValueError, match="shift"):
            fusedloss.linear_cross_entropy(x, W, t, shift=bad, backend=backend)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse(backend, device, reduction):
    """lse per element, float32, 0 where ignored, for every backend (softcap applied first)."""
    require_backend(backend, device)
    N = rows(backend, device, 12)
    x, W, b, t, w = make_inputs(N, 8, 45, torch.float32, device, bias=True, weight=True)
    loss, lse = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, softcap=4.0, reduction=reduction,
                                               return_lse=True, backend=backend)
    z = x.double() @ W.double().T + b.double()
    want = torch.logsumexp(4.0 * torch.tanh(z / 4.0), 1).masked_fill(t == -100, 0.0)
    assert lse.dtype == torch.float32 and lse.shape == t.shape
    assert_close(lse, want, torch.float32, "loss", f"{backend} lse")
    plain = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, softcap=4.0, reduction=reduction,
                                           backend=backend)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)


def test_return_lse_gradient_on_the_triton_backend():
    """lse is differentiable on the triton backend: loss + sum(r * lse) against autograd on the reference."""
    device = triton_device()
    require_backend("triton", device)
    x, W, _, t, _ = make_inputs(9, 8, 45, torch.float32, device)
    r = torch.randn(9, device=device)
    xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss, lse = fusedloss.linear_cross_entropy(xa, Wa, t, z_loss=1e-3, return_lse=True, backend="triton")
    gx, gW = torch.autograd.grad(loss + (r * lse).sum(), (xa, Wa))
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    l64, lse64 = reference.linear_cross_entropy(x64, W64, t, z_loss=1e-3, return_lse=True)
    rx, rW = torch.autograd.grad(l64 + (r.double() * lse64).sum(), (x64, W64))
    assert_close(gx, rx, torch.float32, "grad", "lse grad input")
    assert_close(gW, rW, torch.float32, "grad", "lse grad weight")


# --- memory, determinism, opcheck, the filter -----------------------------------------------------


def test_memory_is_O_rows_plus_vocabulary(monkeypatch):
    """Peak memory of forward + backward beyond the inputs and the gradients: O(N + V) floats, never a
    (rows, V) buffer. N=256, V=32768: the chunked cpu backend's logits buffer alone is 32 MB at this shape
    (the same measure shows it, so the measure can fail); the fused kernels stay within the gradients plus
    16 (N + V) floats (measured here: 2.03 MB, the gradients' size, against 34.0 MB for the chunked path)."""
    require_backend("triton", "cpu")
    require_backend("cpu", "cpu")
    kernels = _kernels()
    # large interpreter tiles: few programs, so that the interpreter's time stays a few seconds
    monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_N", 128)
    monkeypatch.setitem(kernels.INTERPRET_BLOCKS, "BLOCK_V", 2048)
    N, D, V = 256, 16, 32768
    x, W, _, t, _ = make_inputs(N, D, V, torch.float32, "cpu")
    xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
    logits_bytes = N * V * 4
    grad_bytes = (N * D + V * D) * 4

    def step(backend):
        def run():
            xa.grad = Wa.grad = None
            loss = fusedloss.linear_cross_entropy(xa, Wa, t, backend=backend, chunk_size=N)
            loss.backward()
        return run

    fused = _memory.cpu_peak(step("triton"))
    chunked = _memory.cpu_peak(step("cpu"))
    if fused is None or chunked is None:
        pytest.skip("the profiler's memory events are unavailable")
    assert chunked >= logits_bytes, f"the measure misses the chunked path's logits: {chunked} bytes"
    assert fused <= grad_bytes + 16 * (N + V) * 4, f"fused fwd+bwd peak {fused / 2**20:.2f} MB"
    assert fused < logits_bytes / 4


def test_deterministic_bitwise():
    """Bitwise equal run to run (each output element has one writer, every sum a fixed order; several
    vocabulary splits merged)."""
    device = triton_device()
    require_backend("triton", device)
    if device == "cpu":
        assert _kernels()._vocab_splits(9, 200, torch.device("cpu"))[0] > 1
    x, W, b, t, w = make_inputs(9, 20, 200, torch.float32, device, bias=True, weight=True)
    results = []
    for _ in range(2):
        params = [v.clone().requires_grad_() for v in (x, W, b)]
        loss, lse = fusedloss.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2], weight=w,
                                                   label_smoothing=0.1, reduction="sum", return_lse=True,
                                                   backend="triton")
        results.append((loss, lse) + torch.autograd.grad(loss, params))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_opcheck_fused_ops():
    device = triton_device()
    require_backend("triton", device)
    # Fake tensors cannot run a triton_op on CPU tensors (the interpreter needs data pointers).
    tests = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    x, W, b, t, w = make_inputs(9, 8, 37, torch.float32, device, bias=True, weight=True)
    args = (x.requires_grad_(), W.requires_grad_(), t, b.requires_grad_(), w, -100, 0.1, 1e-3, 7.0, 0.9, 0)
    opts = {"test_utils": tests} if tests else {}
    torch.library.opcheck(torch.ops.fusedloss.linear_cross_entropy_fwd_triton, args, **opts)
    _, _, stats, *_ = torch.ops.fusedloss.linear_cross_entropy_fwd_triton(*(a.detach() if torch.is_tensor(a) else a
                                                                         for a in args))
    bwd_args = (torch.randn(9, device=device), torch.randn(9, device=device), x.detach(), W.detach(), t, b.detach(),
                w, stats, -100, 0.1, 1e-3, 7.0, 0.9, 3, True, True, True, 0.0)
    torch.library.opcheck(torch.ops.fusedloss.linear_cross_entropy_bwd_triton, bwd_args, **opts)
    # with the extras (logprob, entropy): (N, 4) stats, and their gradients into the backward
    torch.library.opcheck(torch.ops.fusedloss.linear_cross_entropy_fwd_triton, args + (True,), **opts)
    _, _, stats, *_ = torch.ops.fusedloss.linear_cross_entropy_fwd_triton(*(a.detach() if torch.is_tensor(a) else a
                                                                         for a in args), True)
    assert stats.shape == (9, 4)
    torch.library.opcheck(torch.ops.fusedloss.linear_cross_entropy_bwd_triton,
                          bwd_args[:7] + (stats,) + bwd_args[8:] + (torch.randn(9, device=device),
                                                                   torch.randn(9, device=device)), **opts)


def test_gradient_filter_is_opt_in():
    """grad_filter = 0 (the default) is exact; a threshold below every |G| changes no bit; one above every
    |G| skips every product (zero gradients): the flag reaches the kernels and does what it says."""
    device = triton_device()
    require_backend("triton", device)
    x, W, _, t, _ = make_inputs(9, 8, 45, torch.float32, device)
    _, _, stats, *_ = torch.ops.fusedloss.linear_cross_entropy_fwd_triton(x, W, t, None, None, -100, 0.0, 0.0, 0.0,
                                                                         1.0, 0)
    g = torch.randn(9, device=device)

    def grads(eps):
        return torch.ops.fusedloss.linear_cross_entropy_bwd_triton(g, None, x, W, t, None, None, stats, -100, 0.0, 0.0,
                                                                   0.0, 1.0, 0, True, True, False, eps)

    exact = grads(0.0)
    for a, b in zip(exact, grads(1e-30)):
        assert torch.equal(a, b)
    skipped = grads(1e30)
    assert (skipped[0] == 0).all() and (skipped[1] == 0).all()


@pytest.mark.parametrize("which", ["input", "bias"])
def test_only_the_needed_gradients(which):
    """A frozen head gets no gradient (and no (V, D) buffer); the bias alone, or the input alone, is right."""
    device = triton_device()
    require_backend("triton", device)
    x, W, b, t, _ = make_inputs(9, 8, 45, torch.float32, device, bias=True)
    xa = x.clone().requires_grad_(which == "input")
    ba = b.clone().requires_grad_(which == "bias")
    loss = fusedloss.linear_cross_entropy(xa, W, t, linear_bias=ba, label_smoothing=0.1, backend="triton")
    (got,) = torch.autograd.grad(loss, [xa if which == "input" else ba])
    x64 = x.double().requires_grad_(which == "input")
    b64 = b.double().requires_grad_(which == "bias")
    ref = reference.linear_cross_entropy(x64, W.double(), t, linear_bias=b64, label_smoothing=0.1)
    (want,) = torch.autograd.grad(ref, [x64 if which == "input" else b64])
    assert_close(got, want, torch.float32, "grad", which)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile traces a triton_op on CUDA tensors only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_cuda(dtype):
    """torch.compile(fullgraph=True) traces into the fused ops (wrap_triton, autotuned kernels), forward and
    backward, and gives eager's numbers."""
    require_backend("triton", "cuda")
    x, W, b, t, w = make_inputs(64, 96, 1000, dtype, "cuda", bias=True, weight=True)

    def step(x, W, b):
        loss, lse = fusedloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, label_smoothing=0.1,
                                                   z_loss=1e-4, return_lse=True, backend="triton")
        return loss + lse.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    a = [v.clone().requires_grad_() for v in (x, W, b)]
    e = [v.clone().requires_grad_() for v in (x, W, b)]
    out_c, out_e = compiled(*a), step(*e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for p, q in zip(a, e):
        torch.testing.assert_close(p.grad, q.grad)


def test_compile_fullgraph_cpu_shift_and_lse():
    """shift and return_lse stay traceable on the CPU-traceable path (the cpu backend's chunked op)."""
    require_backend("cpu", "cpu")
    x = torch.randn(2, 9, 16)
    W = torch.randn(203, 16) * 0.3
    t = torch.randint(0, 203, (2, 9))

    def step(x, W):
        loss, lse = fusedloss.linear_cross_entropy(x, W, t, shift=1, return_lse=True, backend="cpu")
        return loss + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    a = [v.clone().requires_grad_() for v in (x, W)]
    e = [v.clone().requires_grad_() for v in (x, W)]
    out_c, out_e = compiled(*a), step(*e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for p, q in zip(a, e):
        torch.testing.assert_close(p.grad, q.grad)
