"""Benchmark fusedloss.cross_entropy with probability targets against F.cross_entropy with the same targets.

    python bench/bench_soft_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    fusedloss bench --ops soft_cross_entropy ...        (the same runner)

The loss is the softmax cross-entropy of N rows of C logits against N rows of class probabilities
(soft labels, e.g. a teacher's distribution or mixup), mean over rows; the logits require grad, the
targets do not. Providers:
- ``torch`` (the baseline): ``F.cross_entropy(x, p)`` with float targets of the input's shape.
- ``torch.compile``: the same call under ``torch.compile``.
- ``fusedloss-<backend>``: ``fusedloss.cross_entropy(x, p)`` on every available kernel backend (not
  triton on CPU: the interpreter).
- ``fusedloss-<backend>+entropy``: the same call with ``return_entropy=True``, the entropy entering the
  backpropagated scalar (``loss - 0.01 entropy.mean()``, an entropy bonus), so its gradient runs through
  the kernels too: what the entropy costs over ``fusedloss-<backend>`` (issue #16: at most 10%). Compare
  the two rows' medians (the table's ratio column is against ``torch``); e.g.
  ``--providers fusedloss-cpu,fusedloss-cpu+entropy`` times just the pair, interleaved.

Bytes of an ideal fused kernel, N rows of C classes, e bytes per element: fwd reads the logits and the
targets (2 N C e) and writes N * 12 (loss, lse, stats); bwd reads both and writes the logits' gradient
(3 N C e).
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
from bench.bench_kl_div import shapes  # the same rows and vocabularies
from bench.common import Case, Inputs, OpSpec, Provider

OP = "soft_cross_entropy"


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    x = (2 * torch.randn(n, c, device=case.device)).to(case.dtype).requires_grad_()
    p = torch.softmax(2 * torch.randn(n, c, device=case.device), -1).to(case.dtype)
    return Inputs(args=(x, p), grad_tensors=[x])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = 2 * n * c * e + n * 12
    bwd = 3 * n * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _torch(x, p):
    return F.cross_entropy(x, p)


def _with_entropy(fl, backend: str):
    def fn(x, p):
        loss, entropy = fl.cross_entropy(x, p, return_entropy=True, backend=backend)
        return loss - 0.01 * entropy.mean()

    return fn


def providers(device: str) -> list[Provider]:
    out = common.torch_providers(_torch)
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.cross_entropy, backend=b))
    for plain in common.fusedloss_providers(device, _with_entropy):
        out.append(Provider(plain.name + "+entropy", plain.make, warmup=plain.warmup))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
