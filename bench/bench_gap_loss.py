"""Benchmark fusedloss.gap_loss against PyTorch's multi_margin_loss and the same loss in torch ops.

    python bench/bench_gap_loss.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    fusedloss bench --ops gap_loss ...              (the same runner)

The loss is the default gap hinge, sum_{j != y} max(0, x_j - x_y + 0.5) averaged over rows.
Providers:
- ``torch`` (the baseline): ``F.multi_margin_loss(x, t, margin=0.5) * C``, the same value (torch
  divides each row by C).
- ``torch-ops`` / ``torch-ops.compile``: ``fusedloss.reference.gap_loss``, the loss written in plain
  torch ops (gather, where, scatter, sum), eager and under ``torch.compile``.
- ``fusedloss-<backend>``: every available kernel backend (not triton on CPU: the interpreter).

Bytes of an ideal fused kernel, N rows of C classes, e bytes per score: fwd reads N*C*e + N*8 and
writes N*4; bwd reads N*C*e and writes N*C*e.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench import common
from bench.common import Case, Inputs, OpSpec, Provider

OP = "gap_loss"
MARGIN = 0.5


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    x = torch.randn(n, c, dtype=case.dtype, device=case.device).requires_grad_()
    target = torch.randint(0, c, (n,), device=case.device)
    return Inputs(args=(x, target), grad_tensors=[x])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = n * c * e + n * 8 + n * 4
    bwd = 2 * n * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"N": 1024, "C": 100}, {"N": 1024, "C": 1000}]
    if device.startswith("cuda"):
        return [{"N": 16384, "C": c} for c in (10, 100, 1000, 32768)]
    return [{"N": 4096, "C": c} for c in (10, 100, 1000)] + [{"N": 512, "C": 32768}]


def _multi_margin_times_c(x, target):
    return F.multi_margin_loss(x, target, margin=MARGIN) * x.shape[1]


def _torch_ops(x, target):
    from fusedloss import reference

    return reference.gap_loss(x, target, MARGIN)


def providers(device: str) -> list[Provider]:
    out = [Provider("torch", lambda case: _multi_margin_times_c, warmup=2)]
    out += common.torch_providers(_torch_ops, eager="torch-ops", compiled="torch-ops.compile")
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.gap_loss, margin=MARGIN,
                                                                                backend=b))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
