"""Per-call cost at tiny sizes: forward + backward of every op against its PyTorch twin.

    python bench/bench_overhead.py [--device cpu|cuda] [--threads 1] [--reductions mean,none] [--out DIR]

At these sizes the kernels take a few microseconds and what a call costs is everything around them:
argument checks, the dispatcher, autograd, the launches of the reduction. Each step is a training
step's loss part: clear ``.grad``, call the loss, ``backward()`` (``loss.sum().backward()`` for
``reduction="none"``). The twins:

- cross_entropy (N=64, C=128) and focal_loss(gamma=0) vs ``F.cross_entropy``,
- gap_loss(margin=1, class_normalize=True), which is torch's multi-margin loss, vs ``F.multi_margin_loss``,
- linear_cross_entropy (N=64, D=32, V=128) vs ``F.cross_entropy(h @ W.T, t)``,
- info_nce (N=64, D=32) vs ``F.cross_entropy(F.normalize(q) @ F.normalize(k).T / t, arange(N))``.

Timed interleaved, one block of each provider in turn (bench/common.py's time_many), so load from
other processes hits both alike: read the ratio, not the absolute times. One CSV in the common schema
(``shape`` names the reduction); ``vs torch`` is torch's median over ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402


def _cases(device: str):
    """op -> (shape label, make() -> (ours(reduction), torch's(reduction), tensors to clear))."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    def classes(n, c):
        return torch.randint(0, c, (n,), generator=g).to(device)

    import fusedloss

    def ce():
        x, t = randn(64, 128), classes(64, 128)
        return (lambda r: fusedloss.cross_entropy(x, t, reduction=r),
                lambda r: F.cross_entropy(x, t, reduction=r), [x])

    def focal():
        x, t = randn(64, 128), classes(64, 128)
        return (lambda r: fusedloss.focal_loss(x, t, gamma=0.0, reduction=r),
                lambda r: F.cross_entropy(x, t, reduction=r), [x])

    def gap():
        x, t = randn(64, 128), classes(64, 128)
        return (lambda r: fusedloss.gap_loss(x, t, margin=1.0, class_normalize=True, reduction=r),
                lambda r: F.multi_margin_loss(x, t, reduction=r), [x])

    def lce():
        h, w, t = randn(64, 32), randn(128, 32), classes(64, 128)
        return (lambda r: fusedloss.linear_cross_entropy(h, w, t, reduction=r),
                lambda r: F.cross_entropy(h @ w.T, t, reduction=r), [h, w])

    def nce():
        q, k = randn(64, 32), randn(64, 32)
        labels = torch.arange(64, device=device)

        def plain(r):
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.07
            return F.cross_entropy(logits, labels, reduction=r)

        return (lambda r: fusedloss.info_nce(q, k, temperature=0.07, reduction=r), plain, [q, k])

    return {"cross_entropy": ("N=64 C=128", ce), "focal_loss": ("N=64 C=128 gamma=0", focal),
            "gap_loss": ("N=64 C=128", gap), "linear_cross_entropy": ("N=64 D=32 V=128", lce),
            "info_nce": ("N=64 D=32", nce)}


def _step(fn, reduction, tensors):
    def step():
        for t in tensors:
            t.grad = None
        loss = fn(reduction)
        (loss.sum() if reduction == "none" else loss).backward()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as a data loader worker)")
    parser.add_argument("--reductions", default="mean,none")
    parser.add_argument("--ops", default=",".join(_cases("cpu")))
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per provider and case")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = common.TimingConfig(min_run_time=args.min_run_time, min_samples=15)
    env = {"versions": common.versions(), "git sha": common.git_sha(), "setting": common.setting(),
           "device name": common.device_name(args.device), "threads": str(torch.get_num_threads())}
    cases = _cases(args.device)
    rows = []
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        label, make = cases[op]
        ours, theirs, tensors = make()
        for reduction in [r.strip() for r in args.reductions.split(",") if r.strip()]:
            steps = {"fusedloss": _step(ours, reduction, tensors), "torch": _step(theirs, reduction, tensors)}
            for step in steps.values():
                for _ in range(20):  # warm-up: first-call costs (kernel caches, autograd graph code)
                    step()
            case = common.Case(op, {"shape": label, "reduction": reduction}, torch.float32, args.device)
            load = common._load_average()
            for provider, timing in common.time_many(steps, args.device, cfg).items():
                note = "" if not isinstance(timing, BaseException) else common._short(timing)
                row = common._row(case, provider, "fwd+bwd", {**env, "load avg": load}, 0, 1.0,
                                  None if note else timing, note=note)
                row["shape"] = f"{label} reduction={reduction}"
                rows.append(row)
    print(f"[bench] per-call fwd+bwd on {args.device} ({common.device_name(args.device)}), "
          f"{torch.get_num_threads()} thread(s); {common.versions()}")
    print(_table(rows))
    if not args.no_csv:
        path = common.write_csv(rows, Path(args.out) / f"overhead-{args.device}-{common._dt.date.today()}.csv")
        print(f"\nwrote {path}")
    return 0


def _table(rows) -> str:
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    lines = [f"{'op':22s} {'case':38s} {'torch us':>9s} {'ours us':>9s} {'ours/torch':>10s}"]
    for (op, shape), p in by_case.items():
        t, o = common._num(p["torch"]["median"]), common._num(p["fusedloss"]["median"])
        ratio = f"{o / t:.2f}x" if t and o else "failed"
        lines.append(f"{op:22s} {shape:38s} {t * 1e3 if t else float('nan'):9.1f} "
                     f"{o * 1e3 if o else float('nan'):9.1f} {ratio:>10s}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
