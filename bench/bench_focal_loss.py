"""Benchmark fusedloss.focal_loss against the same loss in PyTorch ops (eager and torch.compile).

    python bench/bench_focal_loss.py [--quick] [--device cpu|cuda] [--dtype float32,bfloat16] [--out DIR]
    fusedloss bench --ops focal_loss ...          (the same runner)

Every provider computes the multi-class focal loss with gamma = 2, no alpha or weight, mean reduction.
Providers (each only where it can run now):
- ``torch``: the formula in PyTorch ops, eager: log_softmax in float32, gather log p_y,
  ``-(1 - p_y) ** gamma * log p_y``, mean. Autograd keeps the (N, C) log-probabilities for the backward.
- ``torch.compile``: that formula under ``torch.compile(dynamic=False)``, compiled per case (dynamo is
  reset first) and warmed up before timing.
- ``fusedloss-<backend>``: ``fusedloss.focal_loss(..., backend=b)`` for every backend that
  ``fusedloss.backends.available(device)`` lists, except ``reference`` (the oracle, not a competitor)
  and ``triton`` on CPU (Triton's interpreter is far too slow to time).

Bytes of an ideal fused kernel, N rows of C classes, e bytes per logit (the focal finish only adds
per-row values to the cross-entropy's traffic):
- fwd: read the logits N*C*e and the int64 targets N*8, write per-row loss, coefficient and stats N*4*4.
- bwd: read the logits N*C*e, write the gradient N*C*e (the per-row reads are noise).
- fwd+bwd: the sum.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common
from bench.common import Case, Inputs, OpSpec, Provider

OP = "focal_loss"
GAMMA = 2.0


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    x = torch.randn(n, c, dtype=case.dtype, device=case.device).requires_grad_()
    target = torch.randint(0, c, (n,), device=case.device)
    return Inputs(args=(x, target), grad_tensors=[x])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = n * c * e + n * 8 + n * 4 * 4
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


def _torch_focal_loss(x, target):
    logp = torch.log_softmax(x.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    q = -torch.expm1(logp)  # 1 - p_y
    return (-(q**GAMMA) * logp).mean()


def providers(device: str) -> list[Provider]:
    out = common.torch_providers(_torch_focal_loss)
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.focal_loss, gamma=GAMMA, backend=b))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
