"""fusedloss.linear_kl_div / linear_jsd (chunked) against the float64 two-head formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, require_backend, rows, with_reference

import fusedloss
from fusedloss._memory import cpu_peak

ALL_BACKENDS = with_reference(("cpu",))
LOSSES = [("kl-T2", "linear_kl_div", {"temperature": 2.0}), ("jsd-b0.3", "linear_jsd", {"beta": 0.3}),
          ("jsd-b1", "linear_jsd", {"beta": 1.0})]


def expected64(xs, ws, bs, xt, wt, bt, target, fn, kw, reduction):
    """Plain float64 formula on the full logits, written apart from fusedloss.reference."""
    T = kw.get("temperature", 1.0)
    s = xs @ ws.T + (bs if bs is not None else 0)
    t = xt @ wt.T + (bt if bt is not None else 0)
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if fn == "linear_kl_div":
        per = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * T**2
    elif kw["beta"] == 1.0:
        per = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        b = kw["beta"]
        log_m = torch.log(b * log_p.exp() + (1 - b) * log_q.exp())
        per = (b * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
               + (1 - b) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
    kept = target != -100
    per = torch.where(kept, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (kept.sum() * (s.shape[-1] if reduction == "mean" else 1))


def make(N, Ds, Dt, V, dtype, bias=True):
    xs = torch.randn(N, Ds).to(dtype)
    ws = (torch.randn(V, Ds) / Ds**0.5).to(dtype)
    xt = torch.randn(N, Dt).to(dtype)
    wt = (torch.randn(V, Dt) / Dt**0.5).to(dtype)
    bs = (0.1 * torch.randn(V)).to(dtype) if bias else None
    bt = (0.1 * torch.randn(V)).to(dtype) if bias else None
    target = torch.randint(0, V, (N,))
    target[::4] = -100
    return [xs, ws, bs, xt, wt, bt], target


def check(backend, fn, kw, tensors, target, reduction, dtype, *, teacher_grad, chunk_size):
    leaves = [None if x is None else x.clone().requires_grad_(i < 3 or teacher_grad) for i, x in enumerate(tensors)]
    xs, ws, bs, xt, wt, bt = leaves
    loss = getattr(fusedloss, fn)(xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, reduction=reduction,
                                  chunk_size=chunk_size, backend=backend, **kw)
    g = torch.randn_like(loss)
    loss.backward(g)
    ref_leaves = [None if x is None else x.double().requires_grad_() for x in tensors]
    ref = expected64(*ref_leaves, target, fn, kw, reduction)
    ref.backward(g.double())
    assert_close(loss, ref, dtype, "loss", f"{backend} {fn} {reduction}")
    for i, (a, e) in enumerate(zip(leaves, ref_leaves)):
        if a is None:
            continue
        if i >= 3 and not teacher_grad:
            assert a.grad is None
            continue
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, e.grad, dtype, "grad", f"{backend} {fn} {reduction} input {i}")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("name,fn,kw", LOSSES, ids=[x[0] for x in LOSSES])
def test_matches_formula(backend, device, reduction, name, fn, kw):
    if backend != "reference":
        require_backend(backend, device)
    if backend == "triton" and device == "cpu" and reduction in ("sum", "mean"):
        pytest.skip("interpreted Triton: batchmean and none only (time); the cpu backend runs every reduction")
    N = rows(backend, device, 11)
    tensors, target = make(N, 24, 16, 37, torch.float32)
    check(backend, fn, kw, tensors, target, reduction, torch.float32, teacher_grad=reduction != "sum",
          chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_cpu(dtype):
    tensors, target = make(20, 32, 32, 300, dtype, bias=False)
    # The logits are rounded to the inputs' dtype by the matmul: compare the loss with the float64 formula
    # on those same rounded logits' inputs, with the loss tolerance of a float32 accumulation of rounded logits.
    xs, ws, _, xt, wt, _ = [None if x is None else x.clone().requires_grad_(i < 3) for i, x in enumerate(tensors)]
    loss = fusedloss.linear_kl_div(xs, ws, xt, wt, target, chunk_size=7, backend="cpu")
    s = (xs.detach() @ ws.detach().T).double()
    t = (xt @ wt.T).double()
    ref = fusedloss.reference.kl_div_logits(s, t, target)
    assert_close(loss, ref, dtype, "loss")
    loss.backward()
    assert xs.grad.dtype == dtype and ws.grad.dtype == dtype and torch.isfinite(ws.grad.float()).all()


def test_leading_dims_and_no_target():
    tensors, _ = make(12, 8, 8, 19, torch.float32)
    xs, ws, bs, xt, wt, bt = tensors
    out = fusedloss.linear_jsd(xs.view(3, 4, 8), ws, xt.view(3, 4, 8), wt, reduction="none", chunk_size=5,
                               backend="cpu")
    ref = fusedloss.jsd_logits(xs @ ws.T, xt @ wt.T, reduction="none", backend="reference")
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), ref, rtol=2e-5, atol=1e-6)


def test_no_grad_equals_grad_path():
    tensors, target = make(16, 8, 8, 50, torch.float32)
    xs, ws, bs, xt, wt, bt = tensors
    with torch.no_grad():
        a = fusedloss.linear_kl_div(xs, ws, xt, wt, target, chunk_size=3, backend="cpu")
    b = fusedloss.linear_kl_div(xs.requires_grad_(), ws, xt, wt, target, chunk_size=3, backend="cpu")
    assert torch.equal(a, b.detach())


def test_peak_memory_is_a_fraction_of_naive():
    """The chunked op never holds the (N, V) logits: its peak is a fraction of the naive computation's."""
    N, D, V = 512, 64, 8192
    xs = torch.randn(N, D).requires_grad_()
    ws = (torch.randn(V, D) / 8).requires_grad_()
    xt, wt = torch.randn(N, D), torch.randn(V, D) / 8

    def naive():
        F.kl_div(F.log_softmax(xs @ ws.T, -1), F.log_softmax(xt @ wt.T, -1), log_target=True,
                 reduction="batchmean").backward()

    def fused():
        fusedloss.linear_kl_div(xs, ws, xt, wt, chunk_size=64, backend="cpu").backward()

    naive_peak, fused_peak = cpu_peak(naive), cpu_peak(fused)
    if naive_peak is None or fused_peak is None:
        pytest.skip("the profiler's memory events are unavailable")
    assert fused_peak < naive_peak / 3, (fused_peak, naive_peak)


def test_bad_input():
    tensors, target = make(6, 8, 4, 10, torch.float32)
    xs, ws, bs, xt, wt, bt = tensors
    f = fusedloss.linear_kl_div
    cases = [
        ((xs.long(), ws, xt, wt), {}, TypeError, "student_input"),
        ((xs, ws[:, :5], xt, wt), {}, ValueError, "student_weight"),
        ((xs, ws, xt, wt[:3]), {}, ValueError, "teacher_weight"),
        ((xs, ws, xt[:5], wt), {}, ValueError, "teacher_input"),
        ((xs, ws, xt, wt), {"student_bias": bs[:3]}, ValueError, "student_bias"),
        ((xs, ws, xt, wt, target[:2]), {}, ValueError, "target"),
        ((xs, ws, xt, wt), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((xs, ws, xt, wt), {"temperature": -1.0}, ValueError, "temperature"),
        ((xs, ws, xt, wt), {"reduction": "avg"}, ValueError, "reduction"),
    ]
    for args, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            f(*args, **kw)
    with pytest.raises(ValueError, match="beta"):
        fusedloss.linear_jsd(xs, ws, xt, wt, beta=-0.1)
