"""Instructions per training-step loss call, counted by valgrind's callgrind: a load-independent view of
bench_overhead.py's per-call cost (no timing noise from other processes; the count is the same run to run).

    valgrind --tool=callgrind --compress-strings=no --zero-before=getppid --dump-before=getuid \\
        --callgrind-out-file=/tmp/cg.ours python bench/overhead_callgrind.py cross_entropy fusedloss --steps 2000
    grep summary /tmp/cg.ours.2      # instructions of the measured steps; divide by --steps
    callgrind_annotate --inclusive=yes /tmp/cg.ours.2 | less   # where they go

The steps run between ``os.getppid()`` and ``os.getuid()``, the markers the options above zero and
dump at, so the last numbered dump (``.2``: importing torch calls getuid once too) holds the measured
steps only, import and warm-up excluded. About five minutes a run under valgrind on this 2-core machine,
most of it importing torch.

The cases and the step are bench_overhead.py's (the op, its PyTorch twin, the sizes, one thread):
``fusedloss`` runs ours, ``torch`` the twin.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_overhead import _cases, _step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=sorted(_cases("cpu")))
    parser.add_argument("provider", choices=("fusedloss", "torch"))
    parser.add_argument("--reduction", default="mean", choices=("mean", "none"))
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ours, theirs, tensors = _cases("cpu")[args.op][1]()
    step = _step(ours if args.provider == "fusedloss" else theirs, args.reduction, tensors)
    for _ in range(200):  # warm-up: first-call costs stay out of the count
        step()
    os.getppid()  # callgrind --zero-before=getppid
    for _ in range(args.steps):
        step()
    os.getuid()  # callgrind --dump-before=getuid
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
