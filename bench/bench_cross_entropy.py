"""Benchmark fusedloss.cross_entropy against PyTorch (eager and torch.compile), Liger on CUDA.

    python bench/bench_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype float32,bfloat16] [--out DIR]
    fusedloss bench --ops cross_entropy ...          (the same runner)

Providers (each only where it can run now):
- ``torch``: ``torch.nn.functional.cross_entropy``, eager.
- ``torch.compile``: ``torch.compile(F.cross_entropy, dynamic=False)``, compiled per case (dynamo is
  reset first) and warmed up before timing.
- ``fusedloss-<backend>``: ``fusedloss.cross_entropy(..., backend=b)`` for every backend that
  ``fusedloss.backends.available(device)`` lists, except ``reference`` (the oracle, not a competitor)
  and ``triton`` on CPU (Triton's interpreter is far too slow to time).
- ``liger`` (CUDA only, when ``liger_kernel`` imports): ``LigerCrossEntropyLoss``. It writes the
  gradient into the logits during the forward, so it gets its own copy of the inputs.
  (Cut Cross-Entropy, ``cut_cross_entropy``, only has a linear + cross-entropy entry point; it races
  in the linear_cross_entropy benchmark, not here.)

Bytes of an ideal fused kernel, N rows of C classes, e bytes per logit:
- fwd: read the logits N*C*e and the int64 targets N*8, write per-row loss and lse N*4*2.
- bwd: read the logits N*C*e, write the gradient N*C*e (the per-row lse/target reads are noise).
- fwd+bwd: the sum.
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

OP = "cross_entropy"


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    x = torch.randn(n, c, dtype=case.dtype, device=case.device).requires_grad_()
    target = torch.randint(0, c, (n,), device=case.device)
    return Inputs(args=(x, target), grad_tensors=[x])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = n * c * e + n * 8 + n * 4 * 2
    bwd = n * c * e + n * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        if quick:
            return [{"N": 4096, "C": c} for c in (8192, 32000)]
        return [{"N": 4096, "C": c} for c in (1024, 8192, 32000, 131072)]
    if quick:
        return [{"N": 512, "C": 8192}, {"N": 512, "C": 32000}]
    # CPU: N scaled down at the largest C so the sweep finishes (and fits) on a small machine.
    return [{"N": 4096, "C": c} for c in (1024, 8192, 32000)] + [{"N": 1024, "C": 131072}]


def _torch_cross_entropy(x, target):
    return F.cross_entropy(x, target)


def providers(device: str) -> list[Provider]:
    out = common.torch_providers(_torch_cross_entropy)
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.cross_entropy, backend=b))
    if device.startswith("cuda"):
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        except Exception:  # noqa: BLE001 - optional competitor
            LigerCrossEntropyLoss = None
        if LigerCrossEntropyLoss is not None:
            out.append(Provider("liger", lambda case: LigerCrossEntropyLoss(), warmup=2, fresh_inputs=True))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
