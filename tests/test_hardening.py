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
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close, backend_params, interpreted, require_backend
from harden_ops import OPS, bad_case_params, case_of, float64_kwargs, nan_rows_allowed

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
        cases = TESTS / f".bad_input_cases.{os.getpid()}.json"
        cases.write_text(json.dumps(todo))
        try:
            proc = subprocess.run([sys.executable, str(TESTS / "bad_input_child.py"), str(cases)], env=env,
                                  capture_output=True, text=True, timeout=900, cwd=REPO)
        finally:
            cases.unlink()
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
ALL_BACKENDS = backend_params() + [pytest.param("reference", d, id=f"reference-{d}") for d in ("cpu", "cuda")]


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
