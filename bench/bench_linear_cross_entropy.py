"""Benchmark fusedloss.linear_cross_entropy against the naive head and torch's chunked path.

    python bench/bench_linear_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    fusedloss bench --ops linear_cross_entropy ...   (the same runner)

The loss is ``cross_entropy(h @ W.T, target)``, mean over N rows, h (N, D) and W (V, D) both requiring
grad (an LM head in training). Providers:
- ``naive`` (the baseline): ``F.cross_entropy(h @ W.T, target)``: the (N, V) logits and their gradient
  in full.
- ``torch-chunked``: ``F.linear_cross_entropy(h, W, target, options=torch.nn.LinearCrossEntropyOptions())``,
  torch's own chunked path (torch >= 2.14; the provider is left out where torch lacks it).
- ``fusedloss-<backend>``: every available kernel backend (not triton on CPU: the interpreter).

Peak memory is the point of this op: the default sweeps V at fixed N and D, so the PNG's memory row
is peak memory against V. The issue's headline (N=4096, D=1024, V=32000, fp32 on CPU) is
``--shapes "N=4096,D=1024,V=32000"``.

Bytes of an ideal kernel (the op is bound by its matmuls, 6 N D V flops for fwd+bwd, so % of floor is
small by nature; the column is kept for the shared schema): fwd reads h (N*D*e), W (V*D*e) and the int64
targets, writes the loss; bwd reads h and W and writes their gradients (N*D*e + V*D*e).
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

OP = "linear_cross_entropy"


def make_inputs(case: Case) -> Inputs:
    n, d, v = case.shape["N"], case.shape["D"], case.shape["V"]
    h = torch.randn(n, d, dtype=case.dtype, device=case.device).requires_grad_()
    w = (torch.randn(v, d, device=case.device) / d**0.5).to(case.dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=case.device)
    return Inputs(args=(h, w, target), grad_tensors=[h, w])


def bytes_moved(case: Case, mode: str) -> int:
    n, d, v, e = case.shape["N"], case.shape["D"], case.shape["V"], case.elem_size
    fwd = (n * d + v * d) * e + n * 8 + 4
    bwd = 2 * (n * d + v * d) * e + n * 8
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


VOCABS = (8192, 32000, 65536, 131072, 262144)


def shapes(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        if quick:
            return [{"N": 4096, "D": 4096, "V": v} for v in (32000, 131072)]
        return [{"N": 8192, "D": 4096, "V": v} for v in VOCABS]
    if quick:
        return [{"N": 512, "D": 256, "V": v} for v in (8192, 32000)]
    # CPU: N and D scaled down, and V up to 65536 only: torch's chunked path cuts the rows into ceil(V/D)
    # chunks and each one reads and writes the whole (V, D) weight gradient, V^2 * 8 bytes a step, so its
    # steps take minutes beyond that on a small machine (the V=65536 case alone took 4.5 minutes here).
    # Larger V: --shapes "N=1024,D=512,V=262144" --providers naive,fusedloss-cpu.
    return [{"N": 1024, "D": 512, "V": v} for v in VOCABS[:3]]


def _naive(h, w, target):
    return F.cross_entropy(h @ w.T, target)


def _torch_chunked_fn():
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        return None
    return functools.partial(F.linear_cross_entropy, options=options())


def providers(device: str) -> list[Provider]:
    out = [Provider("naive", lambda case: _naive, warmup=1)]
    chunked = _torch_chunked_fn()
    if chunked is not None:
        out.append(Provider("torch-chunked", lambda case: chunked, warmup=1))
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.linear_cross_entropy, backend=b))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes,
              baseline="naive")


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
