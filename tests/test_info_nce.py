"""fusedloss.info_nce on every backend against the float64 reference, and its lse ops against float64 torch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (FP16_SUBNORMAL_ATOL, TOL, assert_16bit_rows_make_no_float32_copies, assert_close, backend_params,
                      interpreted, poison_cpu_allocator, require_backend, rows, with_reference)

import fusedloss
from fusedloss import reference
from fusedloss.ops import info_nce as nce_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]
TEMPERATURES = ["fixed", "learnable"]
# (N, M, D): single rows, odd sizes, M > N, D not a power of two; the larger ones cross the CPU
# kernel's tiles (128 queries x 256 keys) and its split into per-thread parts.
SMALL_SHAPES = [(1, 1, 1), (1, 5, 3), (7, 7, 5), (13, 29, 24), (32, 32, 64)]
LARGE_SHAPES = [(130, 130, 100), (200, 515, 33), (300, 300, 130)]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(N, M, D, dtype, device, normalize):
    # Unnormalized rows are scaled so that |q . k| / temperature spreads over a few units (a softmax
    # that is neither uniform nor one-hot); normalized rows need no care.
    s = 1.0 if normalize else 0.6 / math.sqrt(D)
    q = (torch.randn(N, D, device=device) * s).to(dtype)
    k = (torch.randn(M, D, device=device) * s).to(dtype)
    return q, k


def make_temperature(kind, dtype, device):
    if kind == "fixed":
        return 0.07
    return torch.tensor(0.1, dtype=acc_of(dtype), device=device)  # learnable, as the module holds it


def run(q, k, labels, temperature, backend, *, grad_out=None, **kw):
    """Loss and the gradients of query, key and (a tensor) temperature from one backend."""
    qa = q.detach().clone().requires_grad_()
    ka = k.detach().clone().requires_grad_()
    ta = temperature.detach().clone().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = fusedloss.info_nce(qa, ka, labels, temperature=ta, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    wrt = [qa, ka] + ([ta] if isinstance(ta, torch.Tensor) else [])
    grads = torch.autograd.grad(loss, wrt, g)
    return loss, grads, g


def expected(q, k, labels, temperature, grad_out, **kw):
    """The float64 reference on the same rounded inputs."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    t64 = temperature.detach().double().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = reference.info_nce(q64, k64, labels, temperature=t64, **kw)
    wrt = [q64, k64] + ([t64] if isinstance(t64, torch.Tensor) else [])
    return loss, torch.autograd.grad(loss, wrt, grad_out.double())


def cancelling_parts(q, k, temperature, grad_out, *, normalize, symmetric, reduction):
    """The size of the two parts that a row's gradient is the difference of.

    The gradient of a query row is scale * (sum_j P_ij k_j - k_{labels_i}) (times its upstream
    gradient; for keys the same with q), computed in the accumulation dtype. When the softmax is
    sharp at the positive (sharp temperatures, few keys, small D) the difference is far smaller than
    either part, and its error is that of the parts: TOL's grad atol relative to max|grad| would
    demand more than float32 can give (a row of exactly 0 gradient with one key would get atol 0).
    So the atol is taken relative to the largest part, max|d(sum of lse terms)/d row| in float64
    (through the normalization: divided by the row's norm, which the normalization's Jacobian
    scales by), when that is larger than max|grad|.
    """
    q64, k64 = q.detach().double(), k.detach().double()
    qn = (F.normalize(q64, dim=1) if normalize else q64).requires_grad_()
    kn = (F.normalize(k64, dim=1) if normalize else k64).requires_grad_()
    t64 = temperature.detach().double() if isinstance(temperature, torch.Tensor) else temperature
    logits = qn @ kn.T / t64
    lse = torch.logsumexp(logits, 1)
    if symmetric:
        lse = 0.5 * (lse + torch.logsumexp(logits, 0))
    total = {"none": lambda: (lse * grad_out.double()).sum(), "sum": lambda: lse.sum() * grad_out.double(),
             "mean": lambda: lse.mean() * grad_out.double()}[reduction]()
    if not qn.numel() or not kn.numel():
        return 0.0, 0.0
    gq, gk = torch.autograd.grad(total, (qn, kn))
    if normalize:
        gq = gq / q64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gk = gk / k64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return gq.abs().max().item(), gk.abs().max().item()


def assert_grad_close(actual, expected, dtype, parts, msg):
    """conftest.assert_close for gradients, with atol relative to max(max|grad|, parts) (see
    cancelling_parts) instead of max|grad|."""
    rtol, atol = TOL[dtype]["grad"]
    e = expected.detach().double().cpu()
    scale = max(e.abs().max().item() if e.numel() else 0.0, parts)
    atol = atol * scale + (FP16_SUBNORMAL_ATOL if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(actual.detach().double().cpu(), e, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg} [{dtype}] {m}")


def temperature_atol(q, k, temperature, grad_out, dtype, *, normalize, reduction):
    """Tolerance of d loss / d temperature, a scalar summed over all N * M similarities.

    With scale = 1 / t: dL/dt = -scale^2 dL/dscale, and dL/dscale = sum_i w_i (sum_j P_ij T_ij -
    T_{i,labels_i}) (plus the same per column when symmetric, with the same total weight), T = q . k
    unscaled, P a softmax over j, w_i the upstream gradient of row i. It cancels (the positive term
    against the softmax average), so a relative tolerance on the result means nothing; each term is
    accumulated with the loss's accuracy, so the error is bounded by the loss's rtol times the sum of
    the terms' magnitudes, sum_i |w_i| * 2 max|T| (softmax weights sum to 1), times scale^2.
    """
    q64, k64 = q.double(), k.double()
    if normalize:
        q64, k64 = F.normalize(q64, dim=1), F.normalize(k64, dim=1)
    max_t = (q64.norm(dim=1).max() * k64.norm(dim=1).max()).item() if q.numel() and k.numel() else 0.0
    n = q.shape[0]
    w = grad_out.double().abs()
    w_sum = w.sum().item() if reduction == "none" else w.item() * (n if reduction == "sum" else 1.0)
    scale = 1.0 / temperature.item()
    rtol = TOL[dtype]["loss"][0]
    return rtol * scale**2 * w_sum * 2 * max_t + TOL[dtype]["loss"][1]


def check_against_reference(backend, device, dtype, N, M, D, *, normalize, symmetric, reduction, temp_kind,
                            labels=None, groups=None):
    q, k = make_inputs(N, M, D, dtype, device, normalize)
    t = make_temperature(temp_kind, dtype, device)
    kw = dict(normalize=normalize, symmetric=symmetric, reduction=reduction)
    if groups is not None:
        kw.update(query_groups=groups[0], key_groups=groups[1])
    if device == "cpu":
        poison_cpu_allocator((N + M) * D * 8)
    loss, grads, g = run(q, k, labels, t, backend, **kw)
    ref_loss, ref_grads = expected(q, k, labels, t, g, **kw)
    what = f"{backend} N={N} M={M} D={D} {kw} temperature={temp_kind}"
    assert loss.dtype == acc_of(dtype)
    assert loss.shape == ((N,) if reduction == "none" else ())
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", f"loss {what}")
    parts_q, parts_k = cancelling_parts(q, k, t, g, normalize=normalize, symmetric=symmetric, reduction=reduction)
    assert_grad_close(grads[0], ref_grads[0], dtype, parts_q, f"grad query {what}")
    assert_grad_close(grads[1], ref_grads[1], dtype, parts_k, f"grad key {what}")
    if isinstance(t, torch.Tensor):
        atol = temperature_atol(q, k, t, g, dtype, normalize=normalize, reduction=reduction)
        err = (grads[2].double().cpu() - ref_grads[2].cpu()).abs().item()
        assert err <= atol, f"grad temperature {what}: {grads[2].item()} vs {ref_grads[2].item()} (atol {atol:.3g})"


# --- the reference itself -----------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_by_hand(symmetric, normalize):
    """CLIP's loss written out with log_softmax, row by row."""
    q = torch.randn(6, 5, dtype=torch.float64)
    k = torch.randn(6, 5, dtype=torch.float64)
    t = 0.3
    qn = q / q.norm(dim=1, keepdim=True) if normalize else q
    kn = k / k.norm(dim=1, keepdim=True) if normalize else k
    want = []
    for i in range(6):
        row = -torch.log_softmax(torch.stack([qn[i] @ kn[j] / t for j in range(6)]), 0)[i]
        col = -torch.log_softmax(torch.stack([qn[j] @ kn[i] / t for j in range(6)]), 0)[i]
        want.append(0.5 * (row + col) if symmetric else row)
    want = torch.stack(want)
    got = reference.info_nce(q, k, temperature=t, normalize=normalize, symmetric=symmetric, reduction="none")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(reference.info_nce(q, k, temperature=t, normalize=normalize, symmetric=symmetric),
                               want.mean())


def test_reference_extra_negatives_and_labels():
    q = torch.randn(3, 4, dtype=torch.float64)
    k = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.tensor([5, 0, 7])
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5
    want = F.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(reference.info_nce(q, k, labels, temperature=0.5, reduction="sum"), want)


# --- every backend against the reference --------------------------------------------------------


def _loss_params():
    """backend x dtype x shape x normalize x symmetric x reduction x temperature: in full for the
    small shapes on the compiled backends; one option combination in four for the large shapes
    (they test the tiling, the options are covered by the small ones); under Triton's CPU
    interpreter (each program ~30 ms) small shapes only, one combination in five. The selection
    rotates with the shape and dtype, so that every option value still meets every shape."""
    params = []
    combos = list(itertools.product([False, True], [False, True], REDUCTIONS, TEMPERATURES))
    for bp in backend_params():
        backend, device = bp.values
        slow = (backend, device) == ("triton", "cpu")
        for dtype in DTYPES:
            if dtype == torch.float64 and backend != "cpu":
                continue  # float64 is a CPU-backend dtype
            for s_i, (N, M, D) in enumerate(SMALL_SHAPES + ([] if slow else LARGE_SHAPES)):
                for c_i, (normalize, symmetric, reduction, temp) in enumerate(combos):
                    if symmetric and M != N:
                        continue
                    if slow and (c_i + s_i + DTYPES.index(dtype)) % 5:
                        continue
                    if (N, M, D) in LARGE_SHAPES and (c_i + s_i + DTYPES.index(dtype)) % 4:
                        continue  # the tile-crossing shapes: one combination in four, rotating
                    tid = (f"{backend}-{device}-{str(dtype)[6:]}-N{N}-M{M}-D{D}-{'norm' if normalize else 'raw'}-"
                           f"{'sym' if symmetric else 'q2k'}-{reduction}-{temp}")
                    marks = [pytest.mark.slow] if N * M * D > 5_000_000 else []
                    params.append(pytest.param(backend, device, dtype, N, M, D, normalize, symmetric, reduction,
                                               temp, id=tid, marks=marks))
    return params


@pytest.mark.parametrize("backend,device,dtype,N,M,D,normalize,symmetric,reduction,temp_kind", _loss_params())
def test_against_reference(backend, device, dtype, N, M, D, normalize, symmetric, reduction, temp_kind):
    require_backend(backend, device)
    check_against_reference(backend, device, dtype, N, M, D, normalize=normalize, symmetric=symmetric,
                            reduction=reduction, temp_kind=temp_kind)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temp_kind", TEMPERATURES)
def test_explicit_labels(backend, device, dtype, temp_kind):
    """Labels pick any key (repeats allowed); M > N gives extra negatives."""
    require_backend(backend, device)
    N, M = rows(backend, device, 40), rows(backend, device, 300) * 3
    q, k = make_inputs(N, M, 24, dtype, device, True)
    labels = torch.randint(0, M, (N,), device=device)
    labels[0] = M - 1
    if N > 1:
        labels[1] = labels[0]
    t = make_temperature(temp_kind, dtype, device)
    for reduction in REDUCTIONS:
        loss, grads, g = run(q, k, labels, t, backend, reduction=reduction)
        ref_loss, ref_grads = expected(q, k, labels, t, g, reduction=reduction)
        parts_q, parts_k = cancelling_parts(q, k, t, g, normalize=True, symmetric=False, reduction=reduction)
        assert_close(loss, ref_loss, dtype, "loss", f"labels {reduction}")
        assert_grad_close(grads[0], ref_grads[0], dtype, parts_q, f"labels grad query {reduction}")
        assert_grad_close(grads[1], ref_grads[1], dtype, parts_k, f"labels grad key {reduction}")


# --- several positives per query (query_groups / key_groups, issue #17) --------------------------


def supcon_by_hand(q, k, query_groups, key_groups, temperature):
    """Khosla et al. 2020's supervised-contrastive loss, "out" form, per query, with a loop over the
    positives, in float64: -mean over the keys of the query's group of log softmax(q_i . K / t); 0 for a
    query whose group has no key."""
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    out = []
    for i in range(q.shape[0]):
        logits = qn[i] @ kn.T / temperature
        log_p = logits - torch.logsumexp(logits, 0)
        positives = [j for j in range(k.shape[0]) if key_groups[j] == query_groups[i]]
        out.append(-sum(log_p[j] for j in positives) / len(positives) if positives else log_p.new_zeros(()))
    return torch.stack(out)


def test_groups_reference_by_hand():
    q, k = torch.randn(9, 5), torch.randn(11, 5)
    qg = torch.tensor([0, 1, 2, 0, 1, 5, 2, 2, -3])  # group 5 has no key: left out
    kg = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, -3, 4, 4])
    want = supcon_by_hand(q, k, qg, kg, 0.3)
    got = reference.info_nce(q.double(), k.double(), query_groups=qg, key_groups=kg, temperature=0.3,
                             reduction="none")
    torch.testing.assert_close(got, want)
    mean = reference.info_nce(q.double(), k.double(), query_groups=qg, key_groups=kg, temperature=0.3)
    torch.testing.assert_close(mean, want.sum() / 8)


def _groups(N, M, n_groups, device):
    """Random group ids with several keys per group, one query group without keys, negative ids too."""
    g = torch.Generator().manual_seed(N * 1000 + M)
    key_groups = torch.randint(-1, n_groups - 1, (M,), generator=g)
    query_groups = torch.randint(-1, n_groups - 1, (N,), generator=g)
    query_groups[0] = n_groups + 7  # no key has it
    return query_groups.to(device), key_groups.to(device)


@pytest.mark.parametrize("backend,device", with_reference())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temp_kind", TEMPERATURES)
def test_groups_against_reference(backend, device, dtype, reduction, temp_kind):
    """Every backend against the float64 reference (checked by hand above), tiles crossed where the
    backend is fast: several positives per query, queries without one, any group ids."""
    require_backend(backend, device)
    if dtype == torch.float64 and backend not in ("cpu", "reference"):
        pytest.skip("float64 is a CPU-backend dtype")
    shapes = [(13, 29, 24, 4)] + ([] if interpreted(backend, device) else [(300, 515, 33, 6), (130, 130, 100, 40)])
    for N, M, D, n_groups in shapes:
        check_against_reference(backend, device, dtype, N, M, D, normalize=True, symmetric=False,
                                reduction=reduction, temp_kind=temp_kind, groups=_groups(N, M, n_groups, device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_groups_of_single_keys_equal_labels(backend, device):
    """Groups that give each query one key are the labels form, to float32 rounding."""
    require_backend(backend, device)
    q, k = make_inputs(20, 31, 16, torch.float32, device, True)
    labels = torch.randperm(31, device=device)[:20]
    t = torch.tensor(0.1, device=device)
    by_labels = run(q, k, labels, t, backend, reduction="none", grad_out=torch.ones(20, device=device))
    by_groups = run(q, k, None, t, backend, reduction="none", grad_out=torch.ones(20, device=device),
                    query_groups=labels, key_groups=torch.arange(31, device=device))
    assert_close(by_groups[0], by_labels[0], torch.float32, "loss")
    for a, b in zip(by_groups[1], by_labels[1]):
        assert_close(a, b, torch.float32, "grad")


@pytest.mark.parametrize("backend,device", with_reference())
def test_groups_without_any_positive(backend, device):
    """No query has a positive: the mean is NaN (torch's mean over nothing), none is zeros, and the
    gradients are zero."""
    require_backend(backend, device)
    q, k = make_inputs(5, 7, 8, torch.float32, device, True)
    qg, kg = torch.full((5,), 3, device=device), torch.zeros(7, dtype=torch.long, device=device)
    q.requires_grad_()
    assert torch.isnan(fusedloss.info_nce(q, k, query_groups=qg, key_groups=kg, backend=backend))
    none = fusedloss.info_nce(q, k, query_groups=qg, key_groups=kg, reduction="none", backend=backend)
    assert torch.equal(none, torch.zeros_like(none))
    (grad,) = torch.autograd.grad(none.sum(), q)
    assert torch.equal(grad, torch.zeros_like(grad))
    (grad,) = torch.autograd.grad(fusedloss.info_nce(q, k, query_groups=qg, key_groups=kg, backend=backend), q)
    assert torch.equal(grad, torch.zeros_like(grad))  # the NaN mean's gradient: 0, not 0 * inf


def test_groups_bad_input():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    qg, kg = torch.zeros(4, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    nce = fusedloss.info_nce
    cases = [
        (lambda: nce(q, k, query_groups=qg), ValueError, "query_groups needs key_groups|key_groups needs"),
        (lambda: nce(q, k, key_groups=kg), ValueError, "needs query_groups"),
        (lambda: nce(q, k, torch.zeros(4, dtype=torch.long), query_groups=qg, key_groups=kg), ValueError,
         "exclusive"),
        (lambda: nce(q, k[:4], query_groups=qg, key_groups=kg[:4], symmetric=True), ValueError, "symmetric"),
        (lambda: nce(q, k, query_groups=qg.float(), key_groups=kg), TypeError, "query_groups must hold integer"),
        (lambda: nce(q, k, query_groups=qg, key_groups=kg.bool()), TypeError, "key_groups must hold integer"),
        (lambda: nce(q, k, query_groups=qg[:3], key_groups=kg), ValueError, r"query_groups must have shape \(4,\)"),
        (lambda: nce(q, k, query_groups=qg, key_groups=kg[None]), ValueError, r"key_groups must have shape \(6,\)"),
        (lambda: nce(q, k, query_groups=qg, key_groups=kg.to("meta")), RuntimeError, "key_groups is on meta"),
        (lambda: nce(q, k, query_groups=[0, 0, 0, 0], key_groups=kg), TypeError, "query_groups"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_groups_module_and_build_loss():
    """InfoNCELoss and a build_loss component take the group ids as inputs, with the functional's result."""
    q, k = make_inputs(12, 17, 8, torch.float32, "cpu", True)
    qg, kg = _groups(12, 17, 4, "cpu")
    want = fusedloss.info_nce(q, k, query_groups=qg, key_groups=kg, temperature=0.1)
    module = fusedloss.nn.InfoNCELoss(0.1)
    torch.testing.assert_close(module(q, k, query_groups=qg, key_groups=kg), want)
    composed = fusedloss.build_loss({"losses": [{"name": "info_nce", "params": {"temperature": 0.1},
                                                 "inputs": {"query": "q", "key": "k", "query_groups": "qg",
                                                            "key_groups": "kg"}}]})
    torch.testing.assert_close(composed({"q": q, "k": k, "qg": qg, "kg": kg}), want)


def test_groups_compile_fullgraph():
    q, k = make_inputs(12, 17, 8, torch.float32, "cpu", True)
    qg, kg = _groups(12, 17, 4, "cpu")
    t = torch.tensor(0.1, requires_grad=True)
    fn = torch.compile(lambda a, b, tt: fusedloss.info_nce(a, b, query_groups=qg, key_groups=kg, temperature=tt,
                                                           backend="cpu"), fullgraph=True)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = fn(qa, ka, t)
    got = torch.autograd.grad(out, (qa, ka, t))
    ref = fusedloss.info_nce(q.requires_grad_(), k.requires_grad_(), query_groups=qg, key_groups=kg,
                             temperature=t, backend="cpu")
    want = torch.autograd.grad(ref, (q, k, t))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "row-slice", "expanded-key"])
def test_noncontiguous_inputs(backend, device, layout):
    require_backend(backend, device)
    n = rows(backend, device, 20)

    def randn(*shape):  # raw dot products of a few units, so unnormalized logits stay moderate
        return torch.randn(*shape, device=device) * 0.25

    if layout == "transposed":
        q = randn(16, n).t()
        k = randn(16, n + 3).t()
    elif layout == "row-slice":
        q = randn(n, 40)[:, 3:20]
        k = randn(2 * n, 17)[::2]
    else:  # one query row broadcast to every row: stride 0 (distinct keys, so no gradient is 0)
        q = randn(1, 9).expand(n, 9)
        k = randn(n, 9)
    assert not q.is_contiguous() or not k.is_contiguous()
    t = torch.tensor(0.2, device=device)
    for kw in ({"symmetric": False}, {"symmetric": layout != "transposed", "normalize": False}):
        loss, grads, g = run(q, k, None, t, backend, **kw)
        ref_loss, ref_grads = expected(q, k, None, t, g, **kw)
        parts_q, parts_k = cancelling_parts(q, k, t, g, normalize=kw.get("normalize", True), symmetric=kw["symmetric"],
                                            reduction="mean")
        assert_close(loss, ref_loss, torch.float32, "loss", layout)
        assert_grad_close(grads[0], ref_grads[0], torch.float32, parts_q, f"{layout} grad query")
        assert_grad_close(grads[1], ref_grads[1], torch.float32, parts_k, f"{layout} grad key")


# --- the kernel ops against float64 torch --------------------------------------------------------


def _op_reference(q, k, scale, g, h, u, labels, normalize=False):
    """lse of S = scale * q k^T along rows and columns and the positives S[i, labels_i] in float64, and
    the gradients of sum g * lse_rows + sum h * lse_cols + sum u * pos. ``normalize``: of F.normalize's
    rows, the gradients those of the raw rows (the NORMED ops)."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    S = s64 * ((F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).T) if normalize else q64 @ k64.T)
    lr, lc = torch.logsumexp(S, 1), torch.logsumexp(S, 0)
    pos = S.gather(1, labels[:, None])[:, 0]
    total = (lr * g.double()).sum() + ((lc * h.double()).sum() if h is not None else 0.0) + (pos * u.double()).sum()
    return lr, lc, pos, torch.autograd.grad(total, (q64, k64, s64))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("NMD", [(1, 1, 1), (9, 31, 7), (300, 600, 40), (257, 129, 64)], ids=str)
def test_lse_ops(backend, device, dtype, cols, NMD):
    require_backend(backend, device)
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-backend dtype")
    N, M, D = NMD
    if interpreted(backend, device) and N * M > 1000:
        pytest.skip("too many programs for Triton's CPU interpreter; runs on GPU")
    acc = acc_of(dtype)
    q = (torch.randn(N, D, device=device) / math.sqrt(D)).to(dtype)
    k = (torch.randn(M, D, device=device) / math.sqrt(D)).to(dtype)
    scale = torch.tensor(4.5, dtype=acc, device=device)
    if device == "cpu":
        poison_cpu_allocator((N + M) * D * 8)
    fwd = nce_ops.KERNELS.fwd(backend)
    qa, ka, sa = q.clone().requires_grad_(), k.clone().requires_grad_(), scale.clone().requires_grad_()
    # Explicit labels (repeats, any key) when there are fewer keys than queries; else the default i.
    labels = torch.randint(0, M, (N,), device=device) if M < N else None
    lse_rows, lse_cols, pos, npos = fwd(qa, ka, sa, cols, labels)
    assert npos.dtype == torch.int64 and torch.equal(npos, torch.ones_like(npos))
    assert lse_rows.dtype == acc and lse_rows.shape == (N,) and pos.dtype == acc and pos.shape == (N,)
    assert lse_cols.dtype == acc and lse_cols.shape == ((M,) if cols else (0,))
    g = torch.randn(N, dtype=acc, device=device)
    h = torch.randn(M, dtype=acc, device=device) if cols else None
    u = torch.randn(N, dtype=acc, device=device)
    total = (lse_rows * g).sum() + ((lse_cols * h).sum() if cols else 0.0) + (pos * u).sum()
    grads = torch.autograd.grad(total, (qa, ka, sa))
    ref_r, ref_c, ref_pos, ref_grads = _op_reference(q, k, scale, g, h, u,
                                                     labels if labels is not None else torch.arange(N, device=device))
    assert_close(lse_rows, ref_r, dtype, "loss", "lse_rows")
    assert_close(pos, ref_pos, dtype, "loss", "pos")
    if cols:
        assert_close(lse_cols, ref_c, dtype, "loss", "lse_cols")
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == acc
    # The gradient is g P + u at a positive: where the two nearly cancel (g ~ -u and P ~ 1, a confident
    # row), the float32 rounding of P is relative to the terms, not to their difference, so the
    # tolerance's scale is the larger of the two terms' gradients (each in float64).
    lse_part = _op_reference(q, k, scale, g, h, torch.zeros_like(u), labels if labels is not None
                             else torch.arange(N, device=device))[3]
    pos_part = _op_reference(q, k, scale, torch.zeros_like(g), None, u, labels if labels is not None
                             else torch.arange(N, device=device))[3]
    for i, name in ((0, "grad query"), (1, "grad key")):
        terms = max(lse_part[i].abs().max().item(), pos_part[i].abs().max().item()) if q.numel() and k.numel() else 1.0
        assert_close(grads[i], ref_grads[i], dtype, "grad", name, scale=terms)
    # d scale = sum_ij P_ij T_ij: bounded terms, |T| <= max|q| max|k|; see temperature_atol.
    bound = (g.abs().sum() + u.abs().sum() + (h.abs().sum() if cols else 0)).item() * (
        q.double().norm(dim=1).max() * k.double().norm(dim=1).max()).item()
    rtol, atol = TOL[dtype]["loss"]
    assert abs(grads[2].item() - ref_grads[2].item()) <= rtol * bound + atol, "grad scale"


@pytest.mark.parametrize("backend,device", backend_params())
def test_lse_ops_empty_sides(backend, device):
    """No keys: lse -inf (torch.logsumexp of an empty row); no queries: lse_cols -inf."""
    require_backend(backend, device)
    fwd = nce_ops.KERNELS.fwd(backend)
    scale = torch.tensor(2.0, device=device)
    no_labels = torch.zeros(0, dtype=torch.long, device=device)
    lr, lc, pos, _ = fwd(torch.randn(0, 4, device=device), torch.randn(5, 4, device=device), scale, True, no_labels)
    assert lr.shape == (0,) and lc.shape == (5,) and torch.all(lc == float("-inf")) and pos.shape == (0,)
    with pytest.raises((RuntimeError, ValueError), match="at least as many keys"):
        fwd(torch.randn(3, 4, device=device), torch.randn(0, 4, device=device), scale, True)


TRITON = [p for p in backend_params() if p.values[0] == "triton"]


def _normed_row_scales(q, k, scale, g, h, u, labels):
    """Per row of query and key, the size of the terms its gradient is a difference of: the lse's and
    the positives' gradients of the normalized row (the two cancel for a confident row), and then the
    normalization's own difference g - x_hat (x_hat . g) (all of g when the row is parallel to it),
    divided by the row's norm as the normalization's Jacobian divides it."""
    eps_norm = lambda x: x.detach().double().norm(dim=1).clamp_min(1e-12)  # noqa: E731
    qn, kn = F.normalize(q.detach().double(), dim=1), F.normalize(k.detach().double(), dim=1)
    parts = [_op_reference(qn, kn, scale, g, h, torch.zeros_like(u), labels)[3],
             _op_reference(qn, kn, scale, torch.zeros_like(g), None, u, labels)[3]]
    return [torch.maximum(parts[0][i].abs().amax(1), parts[1][i].abs().amax(1)) / eps_norm(x)
            for i, x in ((0, q), (1, k))]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cols", [False, True])
# D = 200: the 16-bit backward's chunked path (float32 scratch, a first pass for each row's radial
# part); D = 300: the forward's chunks too.
@pytest.mark.parametrize("NMD", [(1, 1, 1), (9, 31, 7), (20, 13, 200), (12, 17, 300)], ids=str)
def test_normed_lse_ops(backend, device, dtype, cols, NMD):
    """The Triton ops that normalize inside their kernels (the 16-bit rows' path of fusedloss.info_nce)
    against float64 F.normalize + torch: rows of norms from 1e-3 to 1e3 (a product of raw 16-bit rows
    is exact; only the inverse norms scale it), explicit labels, the columns, the positives' gradient."""
    require_backend(backend, device)
    N, M, D = NMD
    acc = acc_of(dtype)
    spread = lambda n: torch.logspace(-3, 3, n, device=device)[torch.randperm(n, device=device)][:, None]  # noqa: E731
    q = (torch.randn(N, D, device=device) * spread(N)).to(dtype)
    k = (torch.randn(M, D, device=device) * spread(M)).to(dtype)
    scale = torch.tensor(4.5, dtype=acc, device=device)
    if device == "cpu":
        poison_cpu_allocator()
    fwd = nce_ops.NORMED.fwd(backend)
    qa, ka, sa = q.clone().requires_grad_(), k.clone().requires_grad_(), scale.clone().requires_grad_()
    labels = torch.randint(0, M, (N,), device=device)
    lse_rows, lse_cols, pos, npos, q_norm, k_norm = fwd(qa, ka, sa, cols, labels)
    assert torch.equal(npos, torch.ones_like(npos))
    assert lse_rows.dtype == acc and lse_cols.shape == ((M,) if cols else (0,)) and q_norm.dtype == acc
    assert_close(q_norm, q.double().norm(dim=1), dtype, "loss", "query_norm")
    assert_close(k_norm, k.double().norm(dim=1), dtype, "loss", "key_norm")
    g = torch.randn(N, dtype=acc, device=device)
    h = torch.randn(M, dtype=acc, device=device) if cols else None
    u = torch.randn(N, dtype=acc, device=device)
    total = (lse_rows * g).sum() + ((lse_cols * h).sum() if cols else 0.0) + (pos * u).sum()
    grads = torch.autograd.grad(total, (qa, ka, sa))
    ref_r, ref_c, ref_pos, ref_grads = _op_reference(q, k, scale, g, h, u, labels, normalize=True)
    assert_close(lse_rows, ref_r, dtype, "loss", "lse_rows")
    assert_close(pos, ref_pos, dtype, "loss", "pos")
    if cols:
        assert_close(lse_cols, ref_c, dtype, "loss", "lse_cols")
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == acc
    # The rows' norms span six decades, and so do their gradients (divided by the norm): each row is
    # compared at its own scale, that of the terms it is a difference of.
    row_scales = _normed_row_scales(q, k, scale, g, h, u, labels)
    for i, name in ((0, "grad query"), (1, "grad key")):
        for r in range(grads[i].shape[0]):
            assert_close(grads[i][r], ref_grads[i][r], dtype, "grad", f"{name} row {r}",
                         scale=row_scales[i][r].item())
    bound = (g.abs().sum() + u.abs().sum() + (h.abs().sum() if cols else 0)).item()  # |T| <= 1: unit rows
    rtol, atol = TOL[dtype]["loss"]
    assert abs(grads[2].item() - ref_grads[2].item()) <= rtol * bound + atol, "grad scale"


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normed_zero_and_tiny_rows(backend, device, dtype):
    """F.normalize divides by max(|x|, 1e-12): a zero row is a zero row of S, and a row below eps is
    divided by eps with no radial part in its gradient (the clamp passes none). Each such row's
    gradient is about 1e12 times the others', so every row is compared at its own scale."""
    require_backend(backend, device)
    N, M, D = 6, 7, 24
    q = torch.randn(N, D, device=device)
    k = torch.randn(M, D, device=device)
    q[0] = 0.0
    q[1] *= 1e-14  # |q_1| ~ 5e-14 < eps, still normal in float32 and bfloat16
    k[2] = 0.0
    q, k = q.to(dtype), k.to(dtype)
    scale = torch.tensor(3.0, device=device)
    labels = torch.randint(0, M, (N,), device=device)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    lse_rows, lse_cols, pos, *_ = nce_ops.NORMED.fwd(backend)(qa, ka, scale, True, labels)
    g, h, u = torch.randn(N, device=device), torch.randn(M, device=device), torch.randn(N, device=device)
    grads = torch.autograd.grad((lse_rows * g).sum() + (lse_cols * h).sum() + (pos * u).sum(), (qa, ka))
    ref_r, ref_c, ref_pos, ref_grads = _op_reference(q, k, scale, g, h, u, labels, normalize=True)
    assert_close(lse_rows, ref_r, dtype, "loss", "lse_rows")
    assert_close(lse_cols, ref_c, dtype, "loss", "lse_cols")
    assert_close(pos, ref_pos, dtype, "loss", "pos")
    row_scales = _normed_row_scales(q, k, scale, g, h, u, labels)
    for i, name in ((0, "grad query"), (1, "grad key")):
        for r in range(grads[i].shape[0]):
            assert_close(grads[i][r], ref_grads[i][r], dtype, "grad", f"{name} row {r}",
                         scale=row_scales[i][r].item())


def test_normed_16bit_rows_make_no_float32_copies():
    """bf16 info_nce on the triton backend reads the rows as they are: forward + backward (symmetric,
    D = 128: no chunked scratch) hold the bf16 gradients and O(N + M) floats beyond the inputs. The
    cpu backend's float32 copies, normalized, show in the same measure (so it can fail): about four
    float32 copies of the inputs there."""
    assert_16bit_rows_make_no_float32_copies(
        lambda q, k, backend: fusedloss.info_nce(q, k, symmetric=True, backend=backend))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("symmetric", [False, True])
def test_deterministic(backend, device, symmetric):
    """Two runs give the same bits (no atomics), forward and every gradient (one direction: on CPU the
    gradients made in the forward)."""
    require_backend(backend, device)
    n = rows(backend, device, 300)
    q, k = make_inputs(n, n, 48, torch.float32, device, True)
    t = torch.tensor(0.07, device=device)
    first = run(q, k, None, t, backend, symmetric=symmetric, grad_out=torch.tensor(1.0, device=device))
    second = run(q, k, None, t, backend, symmetric=symmetric, grad_out=torch.tensor(1.0, device=device))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cpu_thread_counts_agree(symmetric):
    """Bits may differ with the thread count (the column lse, dK and d scale are summed per part);
    the values agree to accumulation accuracy."""
    q, k = make_inputs(600, 600, 32, torch.float32, "cpu", True)
    t = torch.tensor(0.07)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, None, t, "cpu", symmetric=symmetric, grad_out=torch.tensor(1.0))
    finally:
        torch.set_num_threads(threads)
    many = run(q, k, None, t, "cpu", symmetric=symmetric, grad_out=torch.tensor(1.0))
    assert_close(one[0], many[0], torch.float32, "loss")
    for a, b in zip(one[1][:2], many[1][:2]):
        assert_close(a, b, torch.float32, "grad")


# --- CPU: gradients made in the forward (reduced loss, one direction) ----------------------------


def _graph_names(t):
    """The names of every node of t's autograd graph."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("wants", ["all", "query", "key", "temperature", "query+temperature"])
def test_cpu_forward_gradients(reduction, wants):
    """The reduced CPU loss takes the fused op (its gradients made in the forward, scaled in the
    backward), for any subset of inputs that need a gradient (a frozen key queue, a learnable
    temperature alone): against the float64 reference, and the ones not asked for stay None."""
    N, M, D = 150, 333, 40  # several blocks per part, a row length that is not a vector multiple
    q, k = make_inputs(N, M, D, torch.float32, "cpu", True)
    labels = torch.randint(0, M, (N,))
    t = torch.tensor(0.1)
    qa, ka, ta = q.clone(), k.clone(), t.clone()
    for x, name in ((qa, "query"), (ka, "key"), (ta, "temperature")):
        x.requires_grad_(wants == "all" or name in wants.split("+"))
    loss = fusedloss.info_nce(qa, ka, labels, temperature=ta, reduction=reduction, backend="cpu")
    assert any("InfoNCEFwdGrad" in n for n in _graph_names(loss))
    g = torch.tensor(0.75)
    loss.backward(g)
    ref_loss, ref_grads = expected(q, k, labels, t, g, reduction=reduction)
    assert_close(loss, ref_loss, torch.float32, "loss", f"fused {reduction} {wants}")
    parts_q, parts_k = cancelling_parts(q, k, t, g, normalize=True, symmetric=False, reduction=reduction)
    if qa.requires_grad:
        assert_grad_close(qa.grad, ref_grads[0], torch.float32, parts_q, "fused grad query")
    if ka.requires_grad:
        assert_grad_close(ka.grad, ref_grads[1], torch.float32, parts_k, "fused grad key")
    if ta.requires_grad:
        atol = temperature_atol(q, k, t, g, torch.float32, normalize=True, reduction=reduction)
        assert abs(ta.grad.double().item() - ref_grads[2].item()) <= atol
    for x in (qa, ka, ta):
        assert (x.grad is not None) == x.requires_grad


def test_cpu_forward_gradients_retained_graph():
    """backward twice through a retained graph: the saved gradients are scaled again, not consumed."""
    q = torch.randn(20, 8, requires_grad=True)
    k = torch.randn(30, 8, requires_grad=True)
    loss = fusedloss.info_nce(q, k, backend="cpu")
    loss.backward(retain_graph=True)
    first = q.grad.clone(), k.grad.clone()
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(q.grad, 3 * first[0])
    torch.testing.assert_close(k.grad, 3 * first[1])


def test_cpu_forward_gradients_many_keys():
    """Enough keys that the fused kernel's strip budget cuts its blocks below one per thread (fewer
    queries per block), several blocks per part; against float64."""
    N, M, D = 300, 20_000, 64  # D = 8 would put even plain PyTorch past float32 TOL (20000 near keys)
    q, k = make_inputs(N, M, D, torch.float32, "cpu", True)
    labels = torch.randint(0, M, (N,))
    labels[0] = M - 1
    t = torch.tensor(0.1)
    loss, grads, g = run(q, k, labels, t, "cpu", grad_out=torch.tensor(1.3))
    ref_loss, ref_grads = expected(q, k, labels, t, g)
    assert_close(loss, ref_loss, torch.float32, "loss", "many keys")
    parts_q, parts_k = cancelling_parts(q, k, t, g, normalize=True, symmetric=False, reduction="mean")
    assert_grad_close(grads[0], ref_grads[0], torch.float32, parts_q, "many keys grad query")
    assert_grad_close(grads[1], ref_grads[1], torch.float32, parts_k, "many keys grad key")
    atol = temperature_atol(q, k, t, g, torch.float32, normalize=True, reduction="mean")
    assert abs(grads[2].double().item() - ref_grads[2].item()) <= atol


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    q = torch.randn(4, 8)
    k = torch.randn(6, 8)
    nce = fusedloss.info_nce
    return [
        ("key feature size", lambda: nce(q, torch.randn(6, 7)), ValueError, "same feature size"),
        ("query 1-D", lambda: nce(q[0], k), ValueError, "query must be 2-D"),
        ("key 3-D", lambda: nce(q, k[None]), ValueError, "key must be 2-D"),
        ("integer query", lambda: nce(q.long(), k), TypeError, "query"),
        ("integer key", lambda: nce(q, k.int()), TypeError, "key"),
        ("dtype mismatch", lambda: nce(q, k.double()), TypeError, "key must have query's dtype"),
        ("device mismatch", lambda: nce(q, k.to("meta")), RuntimeError, "key is on meta"),
        ("labels out of range", lambda: nce(q, k, torch.tensor([0, 1, 6, 2])), IndexError, "labels must be in"),
        ("negative label", lambda: nce(q, k, torch.tensor([0, -1, 2, 2])), IndexError, "labels must be in"),
        ("float labels", lambda: nce(q, k, torch.zeros(4)), TypeError, "labels"),
        ("bool labels", lambda: nce(q, k, torch.zeros(4, dtype=torch.bool)), TypeError, "labels"),
        ("labels shape", lambda: nce(q, k, torch.zeros(3, dtype=torch.long)), ValueError, "labels must have shape"),
        ("labels 2-D", lambda: nce(q, k, torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must have shape"),
        ("labels list", lambda: nce(q, k, [0, 1, 2, 3]), TypeError, "labels"),
        ("labels device", lambda: nce(q, k, torch.zeros(4, dtype=torch.long, device="meta")), RuntimeError,
         "labels is on meta"),
        ("M < N", lambda: nce(k, q), ValueError, "at least as many keys"),
        ("symmetric M != N", lambda: nce(q, k, symmetric=True), ValueError, "symmetric=True needs"),
        ("symmetric labels", lambda: nce(q, q, torch.arange(4), symmetric=True), ValueError, "symmetric=True uses"),
        ("zero temperature", lambda: nce(q, k, temperature=0.0), ValueError, "temperature"),
        ("negative temperature", lambda: nce(q, k, temperature=-0.1), ValueError, "temperature"),
        ("temperature shape", lambda: nce(q, k, temperature=torch.ones(1)), ValueError, "temperature"),
        ("integer temperature tensor", lambda: nce(q, k, temperature=torch.tensor(1)), TypeError, "temperature"),
        ("temperature device", lambda: nce(q, k, temperature=torch.tensor(0.1, device="meta")), RuntimeError,
         "temperature is on meta"),
        ("temperature string", lambda: nce(q, k, temperature="0.1"), TypeError, "temperature"),
        ("reduction", lambda: nce(q, k, reduction="avg"), ValueError, "reduction"),
        ("backend", lambda: nce(q, k, backend="tpu"), ValueError, "backend"),
        ("cuda backend on CPU", lambda: nce(q, k, backend="cuda"), RuntimeError, "cuda"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input(case):
    _, call, error, match = case
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda q, k, s: (q[:, :3], k, s, False), "same feature size"),
        (lambda q, k, s: (q, k.double(), s, False), "key must have query's dtype"),
        (lambda q, k, s: (q.t(), k.t(), s, False), "contiguous|same feature size"),
        (lambda q, k, s: (q, k, s.half(), False), "scale must be Float"),
        (lambda q, k, s: (q, k, s.reshape(1), False), "scale must be a 0-dim"),
        (lambda q, k, s: (q.long(), k.long(), s, False), "query must be float32"),
    ],
)
def test_op_checks(args, match):
    """The C++ op's own checks, for callers that bypass the functional API."""
    q, k, s = torch.randn(4, 6), torch.randn(5, 6), torch.tensor(2.0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fusedloss.info_nce_lse_fwd(*args(q, k, s))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fusedloss.info_nce_fwd_grad(*args(q, k, s)[:3])
    lr, lc, pos, npos = torch.ops.fusedloss.info_nce_lse_fwd(q, k, s, True)
    bwd = torch.ops.fusedloss.info_nce_lse_bwd
    with pytest.raises(RuntimeError, match="grad_rows must have shape"):
        bwd(lr[:3], None, None, q, k, s, lr, None, pos, npos)
    with pytest.raises(RuntimeError, match="grad_cols needs lse_cols"):
        bwd(lr, lc, None, q, k, s, lr, None, pos, npos)
    with pytest.raises(RuntimeError, match="lse_rows must be Float"):
        bwd(lr, None, None, q, k, s, lr.double(), None, pos, npos)
    with pytest.raises(RuntimeError, match="grad_pos must have shape"):
        bwd(lr, None, lr[:2], q, k, s, lr, None, pos, npos)
    with pytest.raises(RuntimeError, match="pos must have shape"):
        bwd(lr, None, None, q, k, s, lr, None, pos[:2], npos)
    with pytest.raises(RuntimeError, match="npos must be an int64"):
        bwd(lr, None, None, q, k, s, lr, None, pos, npos.float())


@pytest.mark.parametrize(
    "labels,error,match",
    [
        (torch.tensor([0, 1, 5, 2]), IndexError, r"labels must be in \[0, M\) = \[0, 5\), got 5 at position 2"),
        (torch.tensor([0, -1, 2, 2]), IndexError, "got -1 at position 1"),
        (torch.tensor([0, 1, 2]), RuntimeError, r"labels must have shape \(4,\)"),
        (torch.tensor([0, 1, 2, 3], dtype=torch.int32), RuntimeError, "labels must be int64"),
    ],
)
def test_op_label_checks(labels, error, match):
    """The C++ op checks its labels itself (on CPU, where reading them costs no sync)."""
    q, k, s = torch.randn(4, 6), torch.randn(5, 6), torch.tensor(2.0)
    with pytest.raises(error, match=match):
        torch.ops.fusedloss.info_nce_lse_fwd(q, k, s, False, labels)
    with pytest.raises(RuntimeError, match="at least as many keys as queries"):
        torch.ops.fusedloss.info_nce_lse_fwd(torch.randn(6, 6), k, s, False)
    with pytest.raises(RuntimeError, match="key_groups needs labels"):
        torch.ops.fusedloss.info_nce_lse_fwd(q, k, s, False, None, torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"key_groups must have shape \(5,\)"):
        torch.ops.fusedloss.info_nce_lse_fwd(q, k, s, False, torch.zeros(4, dtype=torch.long),
                                             torch.zeros(4, dtype=torch.long))


# --- the module ----------------------------------------------------------------------------------


def test_module_fixed_temperature():
    loss_fn = fusedloss.nn.InfoNCELoss(0.2, symmetric=True, reduction="sum")
    q, k = torch.randn(10, 16), torch.randn(10, 16)
    torch.testing.assert_close(loss_fn(q, k), fusedloss.info_nce(q, k, temperature=0.2, symmetric=True,
                                                                 reduction="sum"))
    assert list(loss_fn.parameters()) == []
    assert "temperature=0.2" in repr(loss_fn) and "symmetric=True" in repr(loss_fn)
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.nn.InfoNCELoss(0.0)


def test_module_learnable_temperature():
    loss_fn = fusedloss.nn.InfoNCELoss(0.07, learnable_temperature=True)
    (name, param), = loss_fn.named_parameters()
    assert name == "logit_scale"
    torch.testing.assert_close(param.detach(), torch.tensor(math.log(1 / 0.07)))
    q, k = torch.randn(12, 8), torch.randn(15, 8)
    loss = loss_fn(q, k)
    torch.testing.assert_close(loss, fusedloss.info_nce(q, k, temperature=0.07))
    loss.backward()
    # d loss / d logit_scale = d loss / d scale * scale, against the reference
    ls = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    reference.info_nce(q.double(), k.double(), temperature=torch.exp(-ls)).backward()
    assert abs(param.grad.item() - ls.grad.item()) <= 1e-5 * (1 + abs(ls.grad.item()))
    # CLIP's clamp: a scale above 100 acts as 100 and gets no gradient
    with torch.no_grad():
        param.fill_(10.0)
    param.grad = None
    loss = loss_fn(q, k)
    torch.testing.assert_close(loss, fusedloss.info_nce(q, k, temperature=0.01))
    loss.backward()
    assert param.grad.item() == 0.0
    assert "temperature=learnable" in repr(loss_fn)


# --- PyTorch integration ------------------------------------------------------------------------


def _op_samples(dtype, device="cpu"):
    acc = acc_of(dtype)
    for N, M, D in ((9, 13, 7), (1, 1, 1)):
        q = torch.randn(N, D, device=device).to(dtype)
        k = torch.randn(M, D, device=device).to(dtype)
        s = torch.tensor(1.7, dtype=acc, device=device)
        for cols in (False, True):
            yield q.clone().requires_grad_(), k.clone().requires_grad_(), s.clone().requires_grad_(), cols


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_cpu(dtype):
    for args in _op_samples(dtype):
        torch.library.opcheck(torch.ops.fusedloss.info_nce_lse_fwd, args)
        q, k, s, cols = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        labels = torch.randint(0, k.shape[0], (q.shape[0],))
        torch.library.opcheck(torch.ops.fusedloss.info_nce_lse_fwd, (*args, labels))
        groups = torch.randint(0, 3, (k.shape[0],))
        query_groups = groups[labels]  # every query has a positive (opcheck compares without NaN)
        torch.library.opcheck(torch.ops.fusedloss.info_nce_lse_fwd, (*args, query_groups, groups))
        for lab, kg in ((labels, None), (query_groups, groups)):
            lr, lc, pos, npos = torch.ops.fusedloss.info_nce_lse_fwd(q, k, s, cols, lab, kg)
            g = torch.randn_like(lr)
            grad_cols = torch.randn_like(lc) if cols else None
            for grad_pos in (None, torch.randn_like(pos)):
                torch.library.opcheck(torch.ops.fusedloss.info_nce_lse_bwd,
                                      (g, grad_cols, grad_pos, q, k, s, lr, lc if cols else None, pos, npos, lab, kg))
        if not cols:
            fwd_grad = torch.ops.fusedloss.info_nce_fwd_grad
            for lab, kg in ((None, None), (labels, None), (query_groups, groups)):
                torch.library.opcheck(fwd_grad, (*args[:3], lab, kg))
                torch.library.opcheck(fwd_grad, (*args[:3], lab, kg, True, False, False))


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck_kernel_ops(backend, device):
    require_backend(backend, device)
    if interpreted(backend, device):
        # Fake tensors (test_faketensor, and torch.compile in test_aot_dispatch_dynamic) cannot run a
        # triton_op on CPU tensors: the interpreter needs real data pointers.
        tests = ("test_schema", "test_autograd_registration")
    else:
        tests = torch.library._OPCHECK_DEFAULT_UTILS
    fwd = nce_ops.KERNELS.fwd(backend)
    for args in _op_samples(torch.float32, device):
        torch.library.opcheck(fwd, args, test_utils=tests)
    if backend == "triton":
        for args in _op_samples(torch.bfloat16, device):
            torch.library.opcheck(nce_ops.NORMED.fwd(backend), args, test_utils=tests)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values != ("triton", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_compile_fullgraph(backend, device, dtype, symmetric):
    """torch.compile(fullgraph=True) traces through the op, forward and backward, learnable temperature."""
    require_backend(backend, device)
    q, k = make_inputs(24, 24, 20, dtype, device, True)

    def step(q, k, t, backend=backend):
        return fusedloss.info_nce(q, k, temperature=t, symmetric=symmetric, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    ins_c = [q.clone().requires_grad_(), k.clone().requires_grad_(), torch.tensor(0.1, device=device,
                                                                                 requires_grad=True)]
    ins_r = [x.detach().double().requires_grad_() for x in ins_c]
    out_c = compiled(*ins_c)
    out_r = step(*ins_r, backend="reference")
    out_c.backward()
    out_r.backward()
    assert_close(out_c, out_r, dtype, "loss", "compiled")
    for a, b, what in zip(ins_c, ins_r, ("query", "key", "temperature")):
        assert_close(a.grad, b.grad, dtype, "grad", f"compiled {what}")


def test_compile_fullgraph_labels_and_module():
    """Explicit labels (their host-side range check is skipped while compiling) and the module."""
    loss_fn = fusedloss.nn.InfoNCELoss(learnable_temperature=True, backend="cpu")
    q, k = torch.randn(8, 12), torch.randn(20, 12)
    labels = torch.randint(0, 20, (8,))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, labels), loss_fn(q, k, labels))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(symmetric, normalize):
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda q, k, t: fusedloss.info_nce(q, k, temperature=t, normalize=normalize, symmetric=symmetric,
                                               reduction=reduction, backend="cpu"), (q, k, t))


def test_double_backward_is_a_clear_error():
    q = torch.randn(3, 4, requires_grad=True)
    loss = fusedloss.info_nce(q, torch.randn(3, 4), normalize=False, backend="cpu")
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_queries(reduction):
    q = torch.randn(0, 5, requires_grad=True)
    k = torch.randn(3, 5)
    ours = fusedloss.info_nce(q, k, reduction=reduction, backend="cpu")
    theirs = reference.info_nce(q.detach(), k, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


# --- the temperature's gradient against plain PyTorch's precision (issue #15) ---------------------


def _plain_pytorch_info_nce(q, k, labels, temperature, symmetric):
    """What a user would write: the (N, M) logits and F.cross_entropy, in the inputs' dtype."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    loss = F.cross_entropy(logits, labels)
    return 0.5 * (loss + F.cross_entropy(logits.T, labels)) if symmetric else loss


def _float32_ulp(x: float) -> float:
    return 2.0 ** (math.frexp(abs(x))[1] - 24) if x else 2.0 ** -149


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", ["default", "symmetric", "labels"])
def test_temperature_gradient_as_accurate_as_plain_pytorch(backend, device, case):
    """d loss / d temperature of float32 inputs against float64, at the temperatures of a trained CLIP
    with similar positives, where the softmax's part and the positive's part nearly cancel (at 0.02 the
    gradient is ~1e-6 of its parts). Each draw: our error at most 2x plain PyTorch's float32 error, plus
    2 units in the last place of the float32 result (both answers are float32 numbers, and both start
    from the same float32 F.normalize rows, so a draw where plain lands within a fraction of an ulp is
    luck, not precision). Over all draws: at most plain's summed error. The float64 reference takes the
    float32 temperature's exact value, so that the error is the computation's, not the input's."""
    require_backend(backend, device)
    N, D = (96, 16) if interpreted(backend, device) else (512, 256)
    symmetric = case == "symmetric"
    total = {"ours": 0.0, "plain": 0.0}
    for seed, t in itertools.product(range(2), (0.02, 0.05, 0.07)):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(N, D, generator=g).to(device)
        M = N + 37 if case == "labels" else N  # extra negatives, positives anywhere
        k = torch.randn(M, D, generator=g).to(device)
        labels = torch.randperm(M, generator=g)[:N].to(device) if case == "labels" else torch.arange(N, device=device)
        k[labels] = q + 1.5 * torch.randn(N, D, generator=g).to(device)  # positives similar, as after training
        t32 = torch.tensor(t, dtype=torch.float32)

        def grad_of(fn, dtype):
            temp = t32.to(dtype=dtype, device=device).requires_grad_()
            (grad,) = torch.autograd.grad(fn(q.to(dtype), k.to(dtype), temp), temp)
            return grad.double().item()

        exact = grad_of(lambda a, b, tt: _plain_pytorch_info_nce(a, b, labels, tt, symmetric), torch.float64)
        plain = abs(grad_of(lambda a, b, tt: _plain_pytorch_info_nce(a, b, labels, tt, symmetric), torch.float32)
                    - exact)
        ours = abs(grad_of(lambda a, b, tt: fusedloss.info_nce(a, b, labels if case == "labels" else None,
                                                                temperature=tt, symmetric=symmetric,
                                                                backend=backend), torch.float32) - exact)
        assert ours <= 2 * plain + 2 * _float32_ulp(exact), (seed, t, ours, plain, exact)
        total["ours"] += ours
        total["plain"] += plain
    assert total["ours"] <= total["plain"], total
