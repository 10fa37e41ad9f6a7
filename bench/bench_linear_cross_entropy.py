"""Benchmark fusedloss.linear_cross_entropy against the naive head and torch's chunked path.

    python bench/bench_linear_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    fusedloss bench --ops linear_cross_entropy ...   (the same runner)

The loss is ``cross_entropy(h @ W.T, target)``, mean over N rows, h (N, D) and W (V, D) both requiring
grad (an LM head in training). Providers:
- ``naive`` (the baseline): ``F.cross_entropy(h @ W.T, target)``: the (N, V) logits and their gradient
  in full.
- ``torch-chunked``: ``F.linear_cross_entropy(h, W, target, options=torch.nn.LinearCrossEntropyOptions())``,
  torch's own chunked path (torch >= 2.14; the provider is left out where torch lacks it).
- ``cce``: Cut Cross-Entropy (``pip install cut-cross-entropy``), ``linear_cross_entropy(h, W, target,
  impl="cce")`` with its defaults (its gradient filter on: ``filter_eps="high"`` in the PyPI wheel 25.1.1);
  CUDA only.
- ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (``pip install liger-kernel``); CUDA only.
- ``fusedloss-<backend>``: every available kernel backend (not triton on CPU: the interpreter). On CUDA,
  ``fusedloss-cuda`` is our chunked cuBLAS path and ``fusedloss-triton`` our fused kernel (logits only in
  registers, fusedloss/triton/linear_cross_entropy.py), side by side.
- ``fusedloss-<backend>-rows<c>``: the same with ``chunk_size=c``, one provider per c in the environment
  variable ``FUSEDLOSS_BENCH_CHUNKS`` (e.g. ``FUSEDLOSS_BENCH_CHUNKS=128,256,512``): the measurements behind
  the ``chunk_size=None`` policy (bench/linear_cross_entropy_chunks.md).
The peers are imported lazily; one that is missing (or cannot run on the device) is left out with a printed
reason.

TFLOP/s counts the ideal 2 N D V flops per GEMM: 2 N D V forward, 4 N D V backward, 6 N D V fwd+bwd
(recomputations and the providers' own extra work are not counted: a provider that recomputes shows a lower
rate for the same time).

Peak memory is the point of this op: the default sweeps V at fixed N and D, so the PNG's memory row
is peak memory against V. The issue's headline (N=4096, D=1024, V=32000, fp32 on CPU) is
``--shapes "N=4096,D=1024,V=32000"``.

Bytes of an ideal kernel (the op is bound by its matmuls, 6 N D V flops for fwd+bwd, so % of floor is
small by nature; the column is kept for the shared schema): fwd reads h (N*D*e), W (V*D*e) and the int64
targets, writes the loss; bwd reads h and W and writes their gradients (N*D*e + V*D*e).
"""

from __future__ import annotations

import dataclasses
import functools
import os
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


def flops(case: Case, mode: str) -> int:
    n, d, v = case.shape["N"], case.shape["D"], case.shape["V"]
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * n * d * v


VOCABS = (8192, 32000, 65536, 131072, 262144)


def shapes(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        if quick:
            return [{"N": 4096, "D": 4096, "V": v} for v in (32000, 131072)]
        # issue #18's race: N=8192, D=4096, V in {32000, 131072, 262144}
        return [{"N": 8192, "D": 4096, "V": v} for v in (32000, 131072, 262144)]
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


def _cce_fn():
    from cut_cross_entropy import linear_cross_entropy as cce  # noqa: PLC0415 - optional peer, imported lazily

    return functools.partial(cce, impl="cce")


def _liger_fn():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: PLC0415 - optional peer

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, target: loss(w, h, target)  # Liger takes the weight first


# The peers: (provider name, factory, pip name). CUDA only (Triton kernels).
PEERS = (("cce", _cce_fn, "cut-cross-entropy"), ("liger", _liger_fn, "liger-kernel"))


def _peer_providers(device: str) -> list[Provider]:
    out = []
    for name, factory, pip_name in PEERS:
        if not device.startswith("cuda"):
            print(f"[bench] {OP}: provider {name} skipped: it runs on CUDA tensors only")
            continue
        try:
            fn = factory()
        except Exception as exc:  # noqa: BLE001 - ImportError, or a version that does not load here
            print(f"[bench] {OP}: provider {name} skipped: {type(exc).__name__}: {exc} (pip install {pip_name})")
            continue
        out.append(Provider(name, lambda case, fn=fn: fn, warmup=2))
    return out


def providers(device: str) -> list[Provider]:
    out = [Provider("naive", lambda case: _naive, warmup=1)]
    chunked = _torch_chunked_fn()
    if chunked is not None:
        out.append(Provider("torch-chunked", lambda case: chunked, warmup=1))
    else:
        print(f"[bench] {OP}: provider torch-chunked skipped: this torch has no F.linear_cross_entropy options")
    out += _peer_providers(device)
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.linear_cross_entropy, backend=b))
    for rows in [int(c) for c in os.environ.get("FUSEDLOSS_BENCH_CHUNKS", "").split(",") if c.strip()]:
        fixed = common.fusedloss_providers(
            device, lambda fl, b, rows=rows: functools.partial(fl.linear_cross_entropy, backend=b, chunk_size=rows))
        out += [dataclasses.replace(p, name=f"{p.name}-rows{rows}") for p in fixed]
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes,
              baseline="naive", flops=flops)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
