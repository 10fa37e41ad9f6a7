"""Cross-cutting hardening of every op (issue #8): bad input, edge input, huge sizes, determinism and
PyTorch integration, table-driven over harden_ops.OPS (one entry per op) and every backend.

The per-op test files cover each op's own basics (shapes, options, layouts, opcheck of the forward
ops, torch.compile on the cpu backend, gradcheck on the cpu backend); this file adds what cuts across
them.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_close, backend_params, interpreted, require_backend, with_reference
from harden_ops import OPS, bad_case_params, case_of, nan_rows_allowed

import fusedloss
from fusedloss import reference

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# --- 1. bad input: one table, one child process ----------------------------------------------------


def _run_children(keys: list[str]) -> dict:
    """Runs the cases in child processes: one for the whole table, plus one more after each case that
    took a child down (whose result is then "crashed")."""
    env = dict(os.environ)
    # the child must import this checkout's fusedloss (pytest puts the repo root on sys.path, a script
    # run does not)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    results: dict = {}
    todo = list(keys)
    while todo:
        with tempfile.TemporaryDirectory() as tmp:
            cases = Path(tmp) / "cases.json"
            cases.write_text(json.dumps(todo))
            proc = subprocess.run([sys.executable, str(TESTS / "bad_input_child.py"), str(cases)], env=env,
                                  capture_output=True, text=True, timeout=900, cwd=REPO)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["key"]] = msg["result"]
                started = None
        if proc.returncode != 0:
            if started is None:  # died outside a case (import, or the reporting): report it on every case left
                tail = proc.stderr[-3000:]
                for key in todo:
                    results.setdefault(key, {"outcome": "crashed", "reason": f"child exited {proc.returncode}: {tail}"})
                break
            results.setdefault(started, {"outcome": "crashed",
                                         "reason": f"child exited {proc.returncode}: {proc.stderr[-3000:]}"})
        todo = [k for k in todo if k not in results]
    return results


def _runnable(backend: str, device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        return False
    return fusedloss.backends.why_unavailable(backend, device) is None


@pytest.fixture(scope="module")
def bad_input_results():
    keys = ["|".join(p) for p in bad_case_params() if _runnable(p[1], p[2])]
    return _run_children(keys)


@pytest.mark.parametrize("op_name,backend,device,case_id",
                         [pytest.param(*p, id="-".join(p)) for p in bad_case_params()])
def test_bad_input(bad_input_results, op_name, backend, device, case_id):
    """Bad input raises a ValueError/TypeError/IndexError/RuntimeError that names the argument; an
    out-of-range target where it cannot be read on the host gives a NaN row instead; nothing crashes."""
    require_backend(backend, device)
    case = case_of(op_name, case_id)
    result = bad_input_results[f"{op_name}|{backend}|{device}|{case_id}"]
    assert result["outcome"] != "crashed", f"the call took the process down: {result['reason']}"
    if result["outcome"] == "raised":
        assert any(e.__name__ in result["mro"] for e in case.errors), (
            f"raised {result['type']} ({result['message']}), expected one of {[e.__name__ for e in case.errors]}")
        for name in case.names:
            assert name in result["message"], f"the message does not name {name!r}: {result['message']}"
        return
    assert case.nan_row is not None and nan_rows_allowed(backend, device), (
        f"returned instead of raising {[e.__name__ for e in case.errors]}")
    nan = result["nan"]
    assert nan == [i == case.nan_row for i in range(len(nan))], f"NaN rows {nan}, expected row {case.nan_row} only"
    assert result.get("backward") == "ok", f"backward failed: {result.get('backward')}"
    if result.get("grad_nan_rows") is not None:
        assert not any(r for i, r in enumerate(result["grad_nan_rows"]) if i != case.nan_row), (
            f"NaN gradient outside row {case.nan_row}: {result['grad_nan_rows']}")


# --- 2. edge input: torch's answer, NaN where torch gives NaN ------------------------------------

REDUCTIONS = ("none", "mean", "sum")
ALL_BACKENDS = with_reference(("cpu", "cuda"))


def _loss_and_grads(fn, base: dict, view, reduction: str, cast: torch.dtype | None):
    """fn's loss and its gradients with respect to the floating tensors it is given (all but
    ``weight``), for a fixed upstream gradient. They are made from ``base`` (cast to ``cast`` if given),
    then passed through ``view``: the gradient is that of the view the op sees, not of the base, whose
    gradient would be a sum over the expanded dimension (softmax gradients sum to ~0 along classes,
    and the rounding of that ~0 is no property of the op)."""
    kw = {}
    for k, v in base.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(cast) if cast is not None else v.detach().clone()
            if k != "weight":
                v.requires_grad_()
        kw[k] = v
    if view is not None:
        kw = view(kw)
    inputs = [v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    loss = fn(**kw, reduction=reduction)
    if not loss.requires_grad:
        return loss, [None] * len(inputs)
    g = torch.linspace(0.5, 1.5, max(loss.numel(), 1), dtype=loss.dtype, device=loss.device)[:loss.numel()]
    grads = torch.autograd.grad(loss, inputs, g.reshape(loss.shape), allow_unused=True)
    return loss, grads


def _edge_params():
    return [pytest.param(op.name, edge.id, id=f"{op.name}-{edge.id}") for op in OPS.values() for edge in op.edges]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op_name,edge_id", _edge_params())
def test_edge_input(op_name, edge_id, backend, device):
    """The loss and gradients of torch's twin on float32 copies (or of the float64 reference, where the
    edge says why), NaN exactly where they are NaN, for every reduction."""
    require_backend(backend, device)
    op = OPS[op_name]
    edge = next(e for e in op.edges if e.id == edge_id)
    base = edge.make(device)
    dtype = next(v.dtype for v in base.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    # Under Triton's interpreter (~30 ms a program) one reduction: the kernels are the same for all three,
    # which are PyTorch ops on the per-row losses, shared by every backend and run on the others.
    for reduction in ("none",) if interpreted(backend, device) else REDUCTIONS:
        loss, grads = _loss_and_grads(lambda **kw: op.call(kw, backend), base, edge.view, reduction, None)
        if edge.twin is not None:
            want, want_grads = _loss_and_grads(edge.twin, base, edge.view, reduction, torch.float32)
        else:
            want, want_grads = _loss_and_grads(lambda **kw: op.call_reference(kw), base, edge.view, reduction,
                                               torch.float64)
        what = f"{op_name} {edge_id} {backend} {reduction}"
        assert_close(loss, want, dtype, "loss", what)
        for got, exp in zip(grads, want_grads):
            if exp is None or got is None:
                assert got is None or not got.any(), f"{what}: a gradient where torch has none"
                continue
            assert got.dtype == exp.dtype or got.dtype == dtype, f"{what}: gradient dtype {got.dtype}"
            assert_close(got, exp, dtype, "grad", what)


# --- 3. huge sizes: N x C > 2^31 elements ------------------------------------------------------------

# N * C = 2,149,777,600 > 2^31 = 2,147,483,648 elements: 4.3 GB of bf16 (and 2^32 bytes), whose last rows
# start past element 2^31. C is odd (the vector loops' tails) and above the CPU forward's 16 x 2048 piece.
HUGE_N, HUGE_C = 65600, 32771
HUGE_BYTES = HUGE_N * HUGE_C * 2
HUGE_BACKENDS = [p for p in backend_params() if not interpreted(*p.values)]


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


@pytest.fixture(scope="module")
def huge_rows():
    """huge_rows(device) -> (x, b, t, a), made once per device for the module's huge tests (the input
    alone costs seconds of page faults) and freed after them."""
    made = {}

    def get(device):
        if device not in made:
            made.clear()  # one at a time
            gc.collect()
            made[device] = _huge_rows(device)
        return made[device]

    get.holds = lambda device: device in made
    yield get
    made.clear()
    gc.collect()


def _huge_rows(device):
    """x (HUGE_N, HUGE_C) bf16: every row the same base row b, except its target's logit a_i. The loss
    of row i is known from b and a_i alone, in float64: lse_i = log(sum_j e^b_j - e^b_t + e^a_i)."""
    base = torch.randn(HUGE_C, device=device).bfloat16()
    x = torch.empty(HUGE_N, HUGE_C, dtype=torch.bfloat16, device=device)
    x.copy_(base.expand(HUGE_N, HUGE_C))
    t = torch.randint(0, HUGE_C, (HUGE_N,), device=device)
    a = (torch.randn(HUGE_N, device=device) * 3).bfloat16()
    x[torch.arange(HUGE_N, device=device), t] = a
    return x, base.double(), t, a.double()


def _dot_rows(grad: torch.Tensor, v: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """grad @ v in float32, a chunk of rows at a time through one reused buffer (a fresh float copy per
    chunk would pay its page faults every time)."""
    buf = torch.empty(rows_per_chunk, grad.shape[1], device=grad.device)
    out = torch.empty(grad.shape[0], device=grad.device)
    for i in range(0, grad.shape[0], rows_per_chunk):
        chunk = buf[: min(rows_per_chunk, grad.shape[0] - i)]
        torch.mv(chunk.copy_(grad[i:i + chunk.shape[0]]), v, out=out[i:i + chunk.shape[0]])
    return out


def _sample_rows(n):
    return sorted({0, 1, n // 2, n - 2, n - 1} | set(torch.randint(0, n, (3,)).tolist()))


def _require_memory(device, nbytes):
    have = _available_bytes(device)
    if have < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB free on {device}, {have / 2**30:.1f} GiB available")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", HUGE_BACKENDS)
def test_huge_cross_entropy(huge_rows, backend, device):
    """Loss of every row (analytic, float64), the gradient of sampled rows (the first, middle and last
    ones, past element 2^31) against the float64 reference, and of every row through a dot product."""
    require_backend(backend, device)
    _require_memory(device, HUGE_BYTES * (1 if huge_rows.holds(device) else 2) + (2 << 30))
    x, b, t, a = huge_rows(device)
    x = x.detach().requires_grad_()  # a new leaf on the shared storage: the gradient stays here
    t = t.clone()
    t[::97] = -100
    live = t != -100
    ts = t.clamp(0)
    g = torch.rand(HUGE_N, device=device) + 0.5
    loss = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    loss.backward(g)
    grad = x.grad
    x = x.detach()
    assert grad.dtype == torch.bfloat16 and grad.shape == x.shape

    m = max(b.max().item(), a.max().item())
    eb = (b - m).exp()
    z = eb.sum() - eb[ts] + (a - m).exp()  # sum_j e^(x_ij - m), per row
    lse = m + z.log()
    want = torch.where(live, lse - a, 0.0)
    assert_close(loss, want, torch.bfloat16, "loss", "huge cross_entropy loss")

    rows = _sample_rows(HUGE_N)
    x64 = x[rows].double().requires_grad_()
    ref = reference.cross_entropy(x64, t[rows], reduction="none")
    (ref_grad,) = torch.autograd.grad(ref, x64, g[rows].double())
    assert_close(grad[rows], ref_grad, torch.bfloat16, "grad", f"huge cross_entropy gradient rows {rows}")

    # every row: grad_i . v = g_i (sum_j p_ij v_j - v_t), p_ij = e^(x_ij - lse_i); each element is
    # rounded to bf16 (relative error <= 2^-9, 2^-8 with margin), so the dot errs by at most
    # 2^-8 g_i (sum_j p_ij |v_j| + |v_t|) plus float32's sum over C terms (2^-24 C of the same sum).
    v = torch.randn(HUGE_C, dtype=torch.float64, device=device)
    p_v = ((eb * v).sum() - eb[ts] * v[ts] + (a - m).exp() * v[ts]) / z
    p_abs = ((eb * v.abs()).sum() - eb[ts] * v[ts].abs() + (a - m).exp() * v[ts].abs()) / z
    g64 = g.double()
    want_dot = torch.where(live, g64 * (p_v - v[ts]), 0.0)
    bound = g64 * (p_abs + v[ts].abs()) * (2.0**-8 + 2.0**-24 * HUGE_C)
    got_dot = _dot_rows(grad, v.float()).double()
    err = (got_dot - want_dot).abs() - bound
    worst = int(err.argmax())
    assert err.max() <= 0, (f"row {worst}: grad . v = {got_dot[worst]:.6g}, "
                            f"want {want_dot[worst]:.6g} +- {bound[worst]:.3g}")
    del x, grad, loss


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", HUGE_BACKENDS)
def test_huge_gap_loss(huge_rows, backend, device):
    """p=1, reduction sum: row i's loss is sum over j != t of max(0, b_j - a_i + margin), from the sorted
    base row by prefix sums (float64); the gradient's non-target entries are exactly 0 or 1, its target
    entry minus their count (rounded to bf16), checked on every row through a dot product and on
    sampled rows against the float64 reference."""
    require_backend(backend, device)
    _require_memory(device, HUGE_BYTES * (1 if huge_rows.holds(device) else 2) + (2 << 30))
    x, b, t, a = huge_rows(device)
    x = x.detach().requires_grad_()
    margin = 0.5
    loss = fusedloss.gap_loss(x, t, margin, reduction="none", backend=backend)
    loss.sum().backward()
    grad = x.grad
    x = x.detach()

    # sum_j max(0, b_j - theta) over the base row, theta_i = a_i - margin, by prefix sums of sorted b
    order = b.argsort()
    bs = b[order]
    suffix = torch.cat([bs.flip(0).cumsum(0).flip(0), bs.new_zeros(1)])
    theta = a - margin
    first = torch.searchsorted(bs, theta, right=True)  # first index with b_j > theta
    count = HUGE_C - first
    total = suffix[first] - count * theta
    b_t = b[t]
    t_term = (b_t - theta).clamp_min(0)
    want = total - t_term
    assert_close(loss, want, torch.bfloat16, "loss", "huge gap_loss loss")

    rows = _sample_rows(HUGE_N)
    x64 = x[rows].double().requires_grad_()
    reference.gap_loss(x64, t[rows], margin, reduction="sum").backward()
    assert_close(grad[rows], x64.grad, torch.bfloat16, "grad", f"huge gap_loss gradient rows {rows}")

    # grad_i . v = sum_{j != t, b_j > theta_i} v_j + v_t * bf16(-count_i): exact terms, float32 sums
    v = torch.randn(HUGE_C, dtype=torch.float64, device=device)
    vs = v[order]
    v_suffix = torch.cat([vs.flip(0).cumsum(0).flip(0), vs.new_zeros(1)])
    above_t = b_t > theta
    n_live = count - above_t.long()
    want_dot = v_suffix[first] - torch.where(above_t, v[t], 0.0) + v[t] * (-n_live.double()).bfloat16().double()
    bound = 2.0**-24 * HUGE_C * (v.abs().sum() + v[t].abs() * n_live) + 1e-12
    got_dot = _dot_rows(grad, v.float()).double()
    err = (got_dot - want_dot).abs() - bound
    worst = int(err.argmax())
    assert err.max() <= 0, f"row {worst}: grad . v = {got_dot[worst]:.6g}, want {want_dot[worst]:.6g}"
    del x, grad, loss


# --- 4. determinism ------------------------------------------------------------------------------------


def _fresh_call(op, kwargs: dict, backend: str, reduction: str):
    """The loss and the gradients of op.grads, from fresh leaves on the same values."""
    kw = {k: (v.detach().clone().requires_grad_() if k in op.grads else v) for k, v in kwargs.items()}
    loss = op.call({**kw, "reduction": reduction}, backend)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return [loss.detach()] + list(torch.autograd.grad(loss, [kw[k] for k in op.grads], g))


def _determinism_inputs(op, backend, device):
    # rows: enough for the CPU kernels' parallel splits (InfoNCE's query tiles: 128 rows per thread),
    # a few under Triton's interpreter
    n = 5 if interpreted(backend, device) else 300
    return op.make(n, torch.float32, device)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_bitwise_run_to_run(op_name, backend, device):
    """The same inputs give the same bits, loss and every gradient, call after call (no atomics)."""
    require_backend(backend, device)
    op = OPS[op_name]
    kwargs = _determinism_inputs(op, backend, device)
    for reduction in ("none", "mean"):
        first = _fresh_call(op, kwargs, backend, reduction)
        for _ in range(2):
            again = _fresh_call(op, kwargs, backend, reduction)
            for i, (a, b) in enumerate(zip(first, again)):
                assert torch.equal(a, b), f"{op_name} {backend} {reduction}: output {i} changed between calls"


# Outputs that are bitwise independent of the CPU thread count, by op (indices into [loss, *op.grads]).
# InfoNCE's CPU kernels split the query tiles into one part per thread; what each part owns (its rows'
# lse, their query gradients) is computed the same way whatever the split, as long as the query tile
# is the same, i.e. when N > 112 * threads (query_tile_rows in csrc/cpu/info_nce.cpp); what all parts
# touch (the column lse of symmetric, the key gradient, the temperature's gradient) is summed part by
# part, so its last bits depend on the thread count. A fixed partition would cost one (M, D) buffer per
# part beyond the thread count's, or a second pass; the README documents the guarantee instead, and
# test_info_nce.test_cpu_thread_counts_agree checks that the values agree to accumulation accuracy.
THREAD_INDEPENDENT = {"info_nce": (0, 1)}


@pytest.mark.parametrize("op_name", list(OPS))
def test_cpu_bitwise_across_thread_counts(op_name):
    """cpu backend, 1 vs 2 threads: the same bits (for InfoNCE, the outputs documented so, at N=300
    queries, non-symmetric; the others for every output)."""
    require_backend("cpu", "cpu")
    op = OPS[op_name]
    kwargs = _determinism_inputs(op, "cpu", "cpu")
    if op_name == "cross_entropy":  # few long rows: the forward cuts each row into pieces across threads
        kwargs = dict(input=torch.randn(5, 70001), target=torch.randint(0, 70001, (5,)))
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = _fresh_call(op, kwargs, "cpu", "none")
    finally:
        torch.set_num_threads(threads)
    keep = THREAD_INDEPENDENT.get(op_name, range(len(results[1])))
    for i in keep:
        assert torch.equal(results[1][i], results[2][i]), f"{op_name}: output {i} differs between 1 and 2 threads"


# --- 5. PyTorch integration ------------------------------------------------------------------------------
# (opcheck of the forward ops on every backend, opcheck of the cpu backward ops and torch.compile on the
# cpu backend are in the per-op files; here: what they leave out, for every op of the table)


def _with_leaves(op, kwargs: dict):
    """kwargs with op.grads made fresh leaves, and those leaves in order."""
    kw = {k: (v.detach().clone().requires_grad_() if k in op.grads or (isinstance(v, torch.Tensor) and v.requires_grad)
              else v) for k, v in kwargs.items()}
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    return kw, names


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_gradcheck_float64(op_name, backend):
    """torch.autograd.gradcheck in float64 with every option of the op switched on."""
    require_backend(backend, "cpu")
    op = OPS[op_name]
    kw, names = _with_leaves(op, op.gradcheck_kwargs())

    def fn(*leaves):
        return op.call({**kw, **dict(zip(names, leaves))}, backend)

    assert torch.autograd.gradcheck(fn, tuple(kw[n] for n in names))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_double_backward(op_name, backend, device):
    """The gradient of a gradient: a clear error from the kernel backends (their backward is a kernel of
    its own, with no derivative), the right answer from the reference (gradgradcheck in float64)."""
    require_backend(backend, device)
    op = OPS[op_name]
    dtype = torch.float64 if backend == "reference" or backend == "cpu" else torch.float32
    for reduction in ("mean",) if backend == "reference" else ("none", "mean"):
        kw, names = _with_leaves(op, op.make(3, dtype, device))
        kw["reduction"] = reduction
        if backend == "reference":
            def fn(*leaves):
                return op.call({**kw, **dict(zip(names, leaves))}, backend)
            assert torch.autograd.gradgradcheck(fn, tuple(kw[n] for n in names))
            continue
        with pytest.raises(RuntimeError, match="no double backward"):
            loss = op.call(kw, backend).sum()
            grads = torch.autograd.grad(loss, [kw[n] for n in names], create_graph=True)
            sum((g * g).sum() for g in grads).backward()


def _bwd_op_samples(op_name, backend, device):
    """(backward op, its arguments) for the kernel ops' backward of ``backend``, from a forward run."""
    triton = backend == "triton"
    ops = torch.ops.fusedloss
    if op_name == "cross_entropy":
        x = torch.randn(5, 37, device=device)
        t = torch.randint(0, 37, (5,), device=device)
        t[0] = -100
        w = torch.rand(37, device=device) + 0.5
        scalars = (-100, 0.1, 1e-3, 7.0, 0.8)
        fwd = fusedloss.ops.cross_entropy.KERNELS.fwd(backend)
        loss, lse, stats = fwd(x, t, w, *scalars)
        bwd = ops.cross_entropy_bwd_triton if triton else ops.cross_entropy_bwd
        return [(bwd, (torch.randn_like(loss), gl, x, t, w, stats, *scalars)) for gl in (None, torch.randn_like(lse))]
    if op_name == "gap_loss":
        x = torch.randn(5, 23, device=device)
        t = torch.randint(0, 23, (5,), device=device)
        w = torch.rand(23, device=device) + 0.5
        bwd = ops.gap_loss_bwd_triton if triton else ops.gap_loss_bwd
        g = torch.randn(5, device=device)
        return [(bwd, (g, x, t, w, 0.5, p, -100, cn, mx)) for p, cn, mx in ((1, False, False), (2, True, True))]
    if op_name == "info_nce":
        q = torch.nn.functional.normalize(torch.randn(6, 8, device=device), dim=1)
        k = torch.nn.functional.normalize(torch.randn(6, 8, device=device), dim=1)
        scale = torch.tensor(5.0, device=device)
        lr, lc, pos, npos = fusedloss.ops.info_nce.KERNELS.fwd(backend)(q, k, scale, True)
        bwd = ops.info_nce_lse_bwd_triton if triton else ops.info_nce_lse_bwd
        return [(bwd, (torch.randn_like(lr), gc, gp, q, k, scale, lr, lc if gc is not None else None, pos, npos))
                for gc, gp in ((None, None), (torch.randn_like(lc), torch.randn_like(pos)))]
    raise KeyError(op_name)


@pytest.mark.parametrize("backend,device", backend_params(("cuda", "triton")))
@pytest.mark.parametrize("op_name", ["cross_entropy", "gap_loss", "info_nce"])
def test_opcheck_backward_ops(op_name, backend, device):
    """opcheck of the backward kernel ops of the cuda and triton backends (the cpu ones are in the
    per-op files; linear cross-entropy's ops are opchecked there on every backend)."""
    require_backend(backend, device)
    # Fake tensors cannot run a triton_op on CPU tensors (the interpreter needs data pointers).
    tests = (("test_schema", "test_autograd_registration") if interpreted(backend, device)
             else torch.library._OPCHECK_DEFAULT_UTILS)
    for bwd, args in _bwd_op_samples(op_name, backend, device):
        torch.library.opcheck(bwd, args, test_utils=tests)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_inputs(op, device):
    # 64 KB per input and per gradient: a leak of one such tensor a call is 64 MB over 1,000 calls
    return {"cross_entropy": lambda: dict(input=torch.randn(64, 256, device=device),
                                          target=torch.randint(0, 256, (64,), device=device)),
            "gap_loss": lambda: dict(input=torch.randn(64, 256, device=device),
                                     target=torch.randint(0, 256, (64,), device=device)),
            "focal_loss": lambda: dict(input=torch.randn(64, 256, device=device),
                                       target=torch.randint(0, 256, (64,), device=device),
                                       alpha=torch.rand(256, device=device)),
            "linear_cross_entropy": lambda: dict(input=torch.randn(64, 64, device=device),
                                                 linear_weight=torch.randn(256, 64, device=device),
                                                 target=torch.randint(0, 256, (64,), device=device)),
            "info_nce": lambda: dict(query=torch.randn(64, 256, device=device),
                                     key=torch.randn(64, 256, device=device)),
            }.get(op.name, lambda: op.make(64, torch.float32, device))()


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if not interpreted(*p.values)])
@pytest.mark.parametrize("op_name", list(OPS))
def test_no_memory_growth(op_name, backend, device):
    """1,000 forward + backward calls: no growth of the process's resident memory (CPU; 16 MB of slack
    for the allocator's caching, against 64 MB for a leak of one input-sized tensor a call) or of
    CUDA's allocated bytes (exactly)."""
    require_backend(backend, device)
    op = OPS[op_name]
    kwargs = _memory_inputs(op, device)

    def step():
        kw, names = _with_leaves(op, kwargs)
        loss = op.call(kw, backend)
        torch.autograd.grad(loss, [kw[n] for n in names])

    # One CPU thread: a leak does not need the pool, and on this shared 2-core machine each parallel
    # region's wake-up of the second thread can cost milliseconds (1,000 calls took 50 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(50):
            step()
        gc.collect()
        before = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()
        for _ in range(1000):
            step()
        gc.collect()
    finally:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    else:
        growth = _rss_bytes() - before
        assert growth < 16 << 20, f"resident memory grew by {growth / 2**20:.1f} MB over 1,000 calls"


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_python_threads(op_name, backend, device):
    """Four Python threads calling the op at once (the C++ ops release the GIL) each get the bits a
    lone call gives on their inputs."""
    require_backend(backend, device)
    if interpreted(backend, device):
        pytest.skip("Triton's CPU interpreter is not thread-safe (it patches triton.language while a kernel "
                    "runs); the triton backend runs this on GPU")
    op = OPS[op_name]
    n = 200
    calls = 10
    inputs = [op.make(n, torch.float32, device) for _ in range(4)]
    alone = [_fresh_call(op, kw, backend, "none") for kw in inputs]
    failures = []

    def worker(i):
        try:
            for _ in range(calls):
                got = _fresh_call(op, inputs[i], backend, "none")
                if not all(torch.equal(a, b) for a, b in zip(got, alone[i])):
                    failures.append(f"thread {i}: a result differs from the lone call's")
                    return
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"thread {i}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures
