"""What return_logprob / return_entropy cost over the plain linear_cross_entropy (issue #16: at most 10%).

    python bench/bench_lce_extras.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    python bench/bench_lce_extras.py --device cpu --dtype float32 --modes fwd+bwd   (the issue's CPU case)

The loss is linear_cross_entropy(h, W, target), h (N, D) and W (V, D) both requiring grad (an LM head in
training), on the default kernel backend of the device. Providers:
- ``fusedloss`` (the baseline): ``reduction="mean"``, the loss alone (its gradients are made in the
  forward's pass, so the backward is a scaling).
- ``fusedloss+logprob``, ``fusedloss+both``: the same call returning the extras, which enter the scalar that
  is backpropagated (``loss + 0.01 logprob.mean() - 0.01 entropy.mean()``, an RL-style objective). Their
  gradients are only known in the backward, so it recomputes each chunk's logits: one GEMM more than the
  baseline.
- ``fusedloss-none``, ``fusedloss-none+both``: ``reduction="none"`` (then ``.mean()``), whose backward
  recomputes the logits with or without the extras: the extras' own cost at equal GEMM count.

TFLOP/s counts the ideal 6 N D V flops of fwd+bwd (2 forward, 4 backward), as bench_linear_cross_entropy.
Bytes as bench_linear_cross_entropy's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.bench_linear_cross_entropy import bytes_moved, flops, make_inputs
from bench.common import OpSpec, Provider

OP = "lce_extras"


def shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"N": 512, "D": 256, "V": 8192}]
    if device.startswith("cuda"):
        return [{"N": 16384, "D": 4096, "V": 131072}]
    return [{"N": 4096, "D": 1024, "V": 32000}]


def _fused(reduction: str, logprob: bool, entropy: bool):
    import fusedloss

    def fn(h, w, t):
        out = fusedloss.linear_cross_entropy(h, w, t, reduction=reduction, return_logprob=logprob,
                                             return_entropy=entropy)
        loss, *extras = out if (logprob or entropy) else (out,)
        loss = loss.mean() if reduction == "none" else loss
        if logprob:
            loss = loss + 0.01 * extras.pop(0).mean()
        if entropy:
            loss = loss - 0.01 * extras.pop(0).mean()
        return loss

    return fn


def providers(device: str) -> list[Provider]:
    return [
        Provider("fusedloss", lambda case: _fused("mean", False, False)),
        Provider("fusedloss+logprob", lambda case: _fused("mean", True, False)),
        Provider("fusedloss+both", lambda case: _fused("mean", True, True)),
        Provider("fusedloss-none", lambda case: _fused("none", False, False)),
        Provider("fusedloss-none+both", lambda case: _fused("none", True, True)),
    ]


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes,
              baseline="fusedloss", flops=flops)


if __name__ == "__main__":
    sys.exit(common.script_main(OP))
