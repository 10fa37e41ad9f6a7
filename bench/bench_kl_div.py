"""Benchmark fusedloss.kl_div_logits against the same loss in PyTorch ops.

    python bench/bench_kl_div.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    fusedloss bench --ops kl_div ...               (the same runner)

The loss is distillation's KL(p_teacher || p_student) at T = 1, batchmean over N rows of C classes;
the student's logits require grad, the teacher's do not (a frozen teacher). Providers:
- ``torch`` (the baseline): ``F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
  reduction="batchmean")``, as the issue states it.
- ``torch.compile``: the same function under ``torch.compile``.
- ``fusedloss-<backend>``: every available kernel backend (not triton on CPU: the interpreter).
- ``liger`` (CUDA only, when ``liger_kernel`` is installed): Liger-Kernel's ``LigerJSD(beta=0.0)``, its
  forward KL(P || Q) with P the teacher, on ``log_softmax`` of both logits (it takes log-probabilities,
  so those two passes are part of its time), summed and divided by the rows: the same loss.

Bytes of an ideal fused kernel, N rows of C classes, e bytes per logit: fwd reads both rows (2 N C e)
and writes N * 4; bwd reads both rows and writes the student's gradient (3 N C e).
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

OP = "kl_div"


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    s = (2 * torch.randn(n, c, device=case.device)).to(case.dtype).requires_grad_()
    t = (2 * torch.randn(n, c, device=case.device)).to(case.dtype)
    return Inputs(args=(s, t), grad_tensors=[s])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = 2 * n * c * e + n * 4
    bwd = 3 * n * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"N": 512, "C": 32000}]
    if device.startswith("cuda"):
        return [{"N": 16384, "C": c} for c in (32000, 131072)]
    return [{"N": 4096, "C": 32000}]


def _torch(s, t):
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")


def _make_liger(case: Case):
    from liger_kernel.transformers import LigerJSD  # noqa: PLC0415 - optional peer, imported lazily

    jsd = LigerJSD(beta=0.0)

    def liger(s, t):
        return jsd(F.log_softmax(s, -1), F.log_softmax(t, -1))

    return liger


def providers(device: str) -> list[Provider]:
    out = common.torch_providers(_torch)
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.kl_div_logits, backend=b))
    if device.startswith("cuda") and common.importable("liger_kernel"):
        out.append(Provider("liger", _make_liger, warmup=2))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
