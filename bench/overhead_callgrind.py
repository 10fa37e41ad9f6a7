"""Instructions per training-step loss call, counted by valgrind's callgrind: a load-independent view of
bench_overhead.py's per-call cost (no timing noise from other processes; the count is the same run to run).

    valgrind --tool=callgrind --compress-strings=no --zero-before=getppid --dump-before=getuid \\
        --callgrind-out-file=/tmp/cg.ours python bench/overhead_callgrind.py ours --steps 2000
    grep summary /tmp/cg.ours.2      # instructions of the measured steps; divide by --steps
    callgrind_annotate --inclusive=yes /tmp/cg.ours.2 | less   # where they go

The steps run between ``os.getppid()`` and ``os.getuid()``, the markers the options above zero and
dump at, so the last numbered dump (``.2``: importing torch calls getuid once too) holds the measured
steps only, import and warm-up excluded. About five
minutes a run under valgrind on this 2-core machine, most of it importing torch.

Providers: ``ours`` (fusedloss.cross_entropy), ``torch`` (F.cross_entropy), ``op`` (the public op
``torch.ops.fusedloss.cross_entropy`` without the Python checks), ``focal`` (focal_loss, gamma=0);
N=64, C=128, fp32, one thread, as bench_overhead.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fusedloss  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("provider", choices=("ours", "torch", "op", "focal"))
    parser.add_argument("--reduction", default="mean", choices=("mean", "none"))
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g).requires_grad_()
    t = torch.randint(0, 128, (64,), generator=g)
    r = args.reduction
    code = {"mean": 1, "none": 0}[r]
    op = torch.ops.fusedloss.cross_entropy.default
    loss = {
        "ours": lambda: fusedloss.cross_entropy(x, t, reduction=r),
        "torch": lambda: F.cross_entropy(x, t, reduction=r),
        "op": lambda: op(x, t, None, None, -100, code, 0.0, 0.0, 0.0, 1.0, False)[0],
        "focal": lambda: fusedloss.focal_loss(x, t, gamma=0.0, reduction=r),
    }[args.provider]

    def step():
        x.grad = None
        out = loss()
        (out.sum() if r == "none" else out).backward()

    for _ in range(200):  # warm-up: first-call costs stay out of the count
        step()
    os.getppid()  # callgrind --zero-before=getppid
    for _ in range(args.steps):
        step()
    os.getuid()  # callgrind --dump-before=getuid
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
