"""Benchmark fusedloss.siglip_loss against the plain PyTorch SigLIP loss, eager and torch.compile: time and
peak memory.

    python bench/bench_siglip.py [--quick] [--device cpu|cuda] [--dtype float32,bfloat16] [--out DIR]
    fusedloss bench --ops siglip ...                (the same runner)

The case: N queries against M = N keys of D features, normalized, learnable temperature and bias (0-dim
tensors requiring grad, at SigLIP's initialization t = 10, b = -10), default labels (query i's positive
is key i), mean over queries.
Providers:
- ``torch`` (the baseline), as open_clip's SigLipLoss writes it: ``F.normalize`` both,
  ``logits = t * q @ k.T + b``, ``labels = 2 * eye(N, M) - 1``, ``-logsigmoid(labels * logits).sum() / N``:
  holds the (N, M) logits, the label matrix, their product, its logsigmoid and their gradients.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``.
- ``fusedloss-<backend>``: ``fusedloss.siglip_loss`` on every available kernel backend (not triton on
  CPU: the interpreter), which never holds an (N, M) matrix.

Work of an ideal fused kernel, N queries, M keys, D features, e bytes per element:
- flops: fwd 2*N*M*D (T = Q K^T; one exp and one log1p per pair); bwd 6*N*M*D (T again, then
  dQ = W K and dK = W^T Q; one exp per pair); fwd+bwd 8*N*M*D. Compute-bound: time against the
  baseline is the measure, the GB/s columns are for the schema.
- bytes: fwd reads Q and K, (N + M)*D*e, writes N*4; bwd reads Q and K and writes dQ and dK,
  2*(N + M)*D*e; fwd+bwd the sum.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench import common
from bench.common import Case, Inputs, OpSpec, Provider

OP = "siglip"


def make_inputs(case: Case) -> Inputs:
    n, m, d = case.shape["N"], case.shape["M"], case.shape["D"]
    q = torch.randn(n, d, dtype=case.dtype, device=case.device).requires_grad_()
    k = torch.randn(m, d, dtype=case.dtype, device=case.device).requires_grad_()
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    t = torch.tensor(10.0, dtype=acc, device=case.device, requires_grad=True)
    b = torch.tensor(-10.0, dtype=acc, device=case.device, requires_grad=True)
    return Inputs(args=(q, k, t, b), grad_tensors=[q, k, t, b])


def bytes_moved(case: Case, mode: str) -> int:
    n, m, d, e = case.shape["N"], case.shape["M"], case.shape["D"], case.elem_size
    fwd = (n + m) * d * e + n * 4
    bwd = 2 * (n + m) * d * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        ns = (4096, 16384) if quick else (4096, 8192, 16384, 32768)
        return [{"N": n, "M": n, "D": 256} for n in ns]
    if quick:
        return [{"N": n, "M": n, "D": 128} for n in (512, 1024)]
    return [{"N": n, "M": n, "D": 256} for n in (1024, 4096)]


def _torch_siglip(q, k, t, b):
    logits = t * (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T) + b
    labels = 2 * torch.eye(q.shape[0], k.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / q.shape[0]


def providers(device: str) -> list[Provider]:
    out = common.torch_providers(_torch_siglip)
    out += common.fusedloss_providers(
        device, lambda fl, backend: lambda q, k, t, b: fl.siglip_loss(q, k, temperature=t, bias=b, backend=backend))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
