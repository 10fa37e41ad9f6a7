"""What return_logprob / return_entropy cost over the plain fused cross-entropy (issue #16: at most 10%).

    python bench/bench_ce_extras.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]

The loss is cross_entropy(logits, target), mean over N rows of C classes, logits requiring grad.
Providers, each on the default kernel backend of the device:
- ``fusedloss`` (the baseline): the loss alone.
- ``fusedloss+logprob``, ``fusedloss+entropy``, ``fusedloss+both``: the same call returning the extras,
  which enter the scalar that is backpropagated (``loss + 0.01 logprob.mean() - 0.01 entropy.mean()``,
  an RL-style objective), so their gradients run through the kernels too.
- ``torch+entropy``: what a user writes without them: ``F.cross_entropy`` plus the entropy from
  ``log_softmax`` of the same logits (the (N, C) probabilities materialized).

Bytes of an ideal fused kernel, as bench_cross_entropy's: fwd reads the logits (N C e), bwd reads them
and writes the gradient (2 N C e).
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

OP = "ce_extras"


def make_inputs(case: Case) -> Inputs:
    n, c = case.shape["N"], case.shape["C"]
    x = (3 * torch.randn(n, c, device=case.device)).to(case.dtype).requires_grad_()
    t = torch.randint(0, c, (n,), device=case.device)
    return Inputs(args=(x, t), grad_tensors=[x])


def bytes_moved(case: Case, mode: str) -> int:
    n, c, e = case.shape["N"], case.shape["C"], case.elem_size
    fwd = n * c * e + n * 4
    bwd = 2 * n * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"N": 512, "C": 32000}]
    if device.startswith("cuda"):
        return [{"N": 16384, "C": c} for c in (32000, 131072)]
    return [{"N": 4096, "C": 32000}]


def _fused(logprob: bool, entropy: bool):
    import fusedloss

    def fn(x, t):
        out = fusedloss.cross_entropy(x, t, return_logprob=logprob, return_entropy=entropy)
        if not (logprob or entropy):
            return out
        loss, *extras = out
        if logprob:
            loss = loss + 0.01 * extras.pop(0).mean()
        if entropy:
            loss = loss - 0.01 * extras.pop(0).mean()
        return loss

    return fn


def _torch_entropy(x, t):
    logp = F.log_softmax(x.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return F.cross_entropy(x, t) - 0.01 * entropy.mean()


def providers(device: str) -> list[Provider]:
    return [
        Provider("fusedloss", lambda case: _fused(False, False)),
        Provider("fusedloss+logprob", lambda case: _fused(True, False)),
        Provider("fusedloss+entropy", lambda case: _fused(False, True)),
        Provider("fusedloss+both", lambda case: _fused(True, True)),
        Provider("torch+entropy", lambda case: _torch_entropy),
    ]


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes,
              baseline="fusedloss")


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
