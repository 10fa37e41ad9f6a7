"""Benchmark fusedloss.info_nce against the plain PyTorch loss, eager and torch.compile: time and peak memory.

    python bench/bench_info_nce.py [--quick] [--device cpu|cuda] [--dtype float32,bfloat16] [--out DIR]
    fusedloss bench --ops info_nce ...              (the same runner)

The case: N queries against M = N keys of D features, normalized, temperature 0.07, default labels
(query i's positive is key i), mean over queries (one direction; ``symmetric`` costs one more
exp per similarity in the kernels and one more cross-entropy in PyTorch).
Providers:
- ``torch`` (the baseline): ``F.normalize`` both, ``logits = q @ k.T / 0.07``,
  ``F.cross_entropy(logits, arange(N))``: holds the (N, N) logits, their log-softmax and their gradient.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``.
- ``fusedloss-<backend>``: ``fusedloss.info_nce`` on every available kernel backend (not triton on
  CPU: the interpreter), which never holds an (N, M) matrix.
- ``inf-cl`` (CUDA only, when ``inf_cl`` imports: ``pip install inf-cl``): Inf-CL's ``cal_inf_loss`` on
  the normalized inputs with ``scale=1/0.07`` as a float (a tensor scale all-reduces its gradient, which
  needs torch.distributed). Without torch.distributed it runs its single-GPU tiled kernels (its own
  query-side loss, the mean over queries: the same loss), in fp32 whatever the input dtype (it upcasts).
  Its head_dim is 256, so D must be a multiple of 256.

What to look at: peak memory (the plot's second row), which grows as N^2 for PyTorch (4 bytes per
logit, several copies) and as (N + M) * D for the fused kernels; and time, where the fused kernels
recompute the similarity tiles in the backward (4 matmuls' worth of flops instead of 3).

Work of an ideal fused kernel, N queries, M keys, D features, e bytes per element:
- flops: fwd 2*N*M*D (S = Q K^T; exps N*M, twice that when symmetric); bwd 6*N*M*D (S again, then
  dQ = P K and dK = P^T Q); fwd+bwd 8*N*M*D. The op is compute-bound for D >~ 32: the GB/s and
  "% of floor" columns (bytes model below) say how far it is from the memory floor, which it does
  not approach; time against the baseline is the measure.
- bytes: fwd reads Q and K, (N + M)*D*e, and writes N*4 (the per-query lse); bwd reads Q and K and
  writes dQ and dK, 2*(N + M)*D*e (the per-query vectors are noise); fwd+bwd the sum.
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

OP = "info_nce"
TEMPERATURE = 0.07


def make_inputs(case: Case) -> Inputs:
    n, m, d = case.shape["N"], case.shape["M"], case.shape["D"]
    q = torch.randn(n, d, dtype=case.dtype, device=case.device).requires_grad_()
    k = torch.randn(m, d, dtype=case.dtype, device=case.device).requires_grad_()
    return Inputs(args=(q, k), grad_tensors=[q, k])


def bytes_moved(case: Case, mode: str) -> int:
    n, m, d, e = case.shape["N"], case.shape["M"], case.shape["D"], case.elem_size
    fwd = (n + m) * d * e + n * 4
    bwd = 2 * (n + m) * d * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    # N = M swept at fixed D: the memory-vs-N plot.
    if device.startswith("cuda"):
        ns = (4096, 16384) if quick else (4096, 8192, 16384, 32768)
        return [{"N": n, "M": n, "D": 256} for n in ns]
    if quick:
        return [{"N": n, "M": n, "D": 128} for n in (512, 1024)]
    # CPU: PyTorch's fwd+bwd takes about 1.6 s at N = 8192, D = 256 on 2 cores; three sizes up to
    # 4096 keep the sweep to a few minutes (pass --shapes N=8192,M=8192,D=256 for the headline case).
    return [{"N": n, "M": n, "D": 256} for n in (1024, 2048, 4096)]


def _torch_info_nce(q, k):
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def _make_compiled(case: Case):
    torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale graphs
    return torch.compile(_torch_info_nce, dynamic=False)


def _make_inf_cl(case: Case):
    from inf_cl import cal_inf_loss  # noqa: PLC0415 - optional peer, imported lazily

    if case.shape["D"] % 256:
        raise ValueError(f"inf-cl needs D a multiple of its head_dim 256, got D={case.shape['D']}")

    def inf_cl(q, k):
        return cal_inf_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), scale=1.0 / TEMPERATURE)

    return inf_cl


def providers(device: str) -> list[Provider]:
    out = [
        Provider("torch", lambda case: _torch_info_nce, warmup=2),
        Provider("torch.compile", _make_compiled, warmup=3),
    ]
    out += common.fusedloss_providers(
        device, lambda fl, b: functools.partial(fl.info_nce, temperature=TEMPERATURE, backend=b))
    if device.startswith("cuda") and common.importable("inf_cl"):
        out.append(Provider("inf-cl", _make_inf_cl, warmup=2))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
