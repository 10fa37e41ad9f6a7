"""The child process of test_hardening.test_bad_input: runs bad calls from harden_ops and reports each.

    python tests/bad_input_child.py CASES.json

CASES.json lists keys "op|backend|device|case". For each, one JSON line on stdout: {"start": key}
before the call, {"key": key, "result": {...}} after it, so that the parent can tell which case took
the process down (a segfault, an abort, a dead CUDA context) and start a new child after it. One
process for the whole table: a process start (torch and triton imports) costs seconds, a case
milliseconds.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import harden_ops


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_case(op_name: str, backend: str, device: str, case_id: str) -> dict:
    op = harden_ops.OPS[op_name]
    case = harden_ops.case_of(op_name, case_id)
    torch.manual_seed(0)
    kwargs = op.make(3, torch.float32, device)
    for name in op.grads:
        kwargs[name].requires_grad_()
    kwargs = case.change(kwargs, device)
    backend = kwargs.pop("backend", backend)
    try:
        out = op.call(kwargs, backend)
    except Exception as exc:  # noqa: BLE001 - the parent judges the type and message
        return {"outcome": "raised", "type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc)}
    loss = out[0] if isinstance(out, tuple) else out
    result = {"outcome": "returned", "nan": torch.isnan(loss.detach()).reshape(-1).cpu().tolist()}
    leaves = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf]
    if leaves and loss.requires_grad:
        try:
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            # per input row: NaN anywhere in the row of the first gradient (the batch's)
            g = grads[0]
            result["grad_nan_rows"] = (torch.isnan(g).reshape(g.shape[0], -1).any(1).cpu().tolist()
                                       if g is not None and g.dim() else None)
            result["backward"] = "ok"
        except Exception as exc:  # noqa: BLE001
            result["backward"] = f"{type(exc).__name__}: {exc}"
    return result


def main() -> int:
    with open(sys.argv[1]) as f:
        keys = json.load(f)
    for key in keys:
        emit({"start": key})
        op_name, backend, device, case_id = key.split("|")
        t0 = time.perf_counter()
        result = run_case(op_name, backend, device, case_id)
        result["seconds"] = round(time.perf_counter() - t0, 4)
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a device-side fault: this process's CUDA context is gone
                emit({"key": key, "result": {"outcome": "crashed", "reason": f"CUDA error: {exc}"}})
                return 3
        emit({"key": key, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
