"""The command line: ``python -m fusedloss <command>`` (also installed as ``fusedloss``).

Commands:
  info    versions, build flags and the backends available on each device
  check   every op on every available backend against the float64 reference (exit 1 on a mismatch)
  bench   time and peak memory of every op and backend against PyTorch: table, CSV and PNG
  demo    a small GPT trained twice, head + F.cross_entropy vs fusedloss.linear_cross_entropy

``bench`` runs the benchmark package in the repository's ``bench/`` directory, which is not part of
the installed package: it is found beside the ``fusedloss`` package of a source checkout (an
editable install) or in the current directory or one of its parents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import fusedloss
from fusedloss import _selfcheck as _check

# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    r = fusedloss.info()
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=False))
        return 0
    yes = lambda v: "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))  # noqa: E731
    gpu = "none"
    if r["cuda_available"]:
        gpu = f"{r['gpu']} ({r['gpu_arch']})"
        if r["gpu_arch_supported"] is False:
            gpu += ": NOT among the architectures fusedloss was compiled for; rebuild with TORCH_CUDA_ARCH_LIST"
    cuda_kernels = "yes" if r["cuda_kernels_built"] else "no (CPU-only build)"
    if r["cuda_kernels_built"]:
        cuda_kernels += f", for {r['cuda_archs']}"
    sections = [
        ("versions", [("fusedloss", r["fusedloss"]), ("python", r["python"]), ("torch", r["torch"]),
                      ("triton", yes(r["triton"]) if r["triton"] else "not installed"),
                      ("CUDA runtime (torch's)", yes(r["torch_cuda"]) if r["torch_cuda"] else "none (CPU build of torch)")]),
        ("build of fusedloss._C", [("extension", r["extension"]), ("path", yes(r["extension_path"])),
                                   ("CUDA kernels", cuda_kernels),
                                   ("CPU kernels (at::vec ISA)", yes(r["cpu_vector_isa"]))]),
        ("this machine", [("CUDA device", gpu), ("CPU threads", str(r["cpu_threads"])),
                          ("TRITON_INTERPRET", yes(r["triton_interpret"])),
                          ("FUSEDLOSS_BACKEND", yes(r["default_backend_override"]))]),
    ]
    width = max(len(k) for _, items in sections for k, _ in items) + 2
    for title, items in sections:
        print(f"{title}:")
        for key, value in items:
            print(f"  {key:<{width}}{value}")
    backends = r["backends"]
    print("backends (fastest first):")
    for device in ["cpu", "cuda"]:
        names = backends.get(device)
        if names is None:
            print(f"  {device}: - (no CUDA device)" if device == "cuda" else f"  {device}: -")
            continue
        print(f"  {device}: {', '.join(names) or '-'}")
        for b in fusedloss.backends.BACKENDS:
            if b not in names:
                reason = fusedloss.backends.why_unavailable(b, device)
                if reason and not (device == "cpu" and b == "cuda") and not (device == "cuda" and b == "cpu"):
                    print(f"      {b}: unavailable: {reason}")
    return 0


# ----------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------
def _cmd_check(args: argparse.Namespace) -> int:
    devices = [args.device] if args.device else None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backend.split(",")] if args.backend else None
    if backends:
        unknown = [b for b in backends if b not in fusedloss.backends.BACKENDS or b == "reference"]
        if unknown:
            print(f"error: unknown backend {', '.join(unknown)}; choose from cpu, cuda, triton", file=sys.stderr)
            return 2
    dtypes = None
    if args.dtype:
        try:
            dtypes = [_check.CHECK_DTYPES[d.strip()] for d in args.dtype.split(",")]
        except KeyError as exc:
            print(f"error: unknown dtype {exc}; choose from {', '.join(_check.CHECK_DTYPES)}", file=sys.stderr)
            return 2
    ops = None
    if args.ops:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        have = _check.available_ops()
        unknown = [o for o in ops if o not in have]
        if unknown:
            print(f"error: unknown op {', '.join(unknown)}; choose from {', '.join(have)}", file=sys.stderr)
            return 2
    return _check.run_check(devices, backends, dtypes, ops, seed=args.seed, quiet=args.quiet, full=args.full,
                            progress=not args.no_progress, inject=args.inject_error)


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------
class BenchNotFound(RuntimeError):
    pass


def _bench_roots() -> list[Path]:
    roots = [Path(fusedloss.__file__).resolve().parent.parent]
    cwd = Path.cwd().resolve()
    roots += [cwd, *cwd.parents]
    seen, out = set(), []
    for r in roots:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def import_bench():
    """The ``bench.common`` module of the source checkout (adds the checkout root to sys.path)."""
    for root in _bench_roots():
        # A fusedloss checkout only: bench/ beside the fusedloss package, never any directory named bench.
        if all((root / f).is_file() for f in ("bench/__init__.py", "bench/common.py", "fusedloss/__init__.py")):
            existing = sys.modules.get("bench")
            if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve().parent != root / "bench":
                raise BenchNotFound(f"a different module named 'bench' is already imported ({existing!r})")
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            import bench.common as common

            return common
    raise BenchNotFound(
        "the benchmark scripts (bench/common.py) were not found: they live in the fusedloss source "
        "checkout, not in the installed package. Run this command from a checkout (or an editable "
        "install: pip install -e .), e.g. `cd fusedloss && python -m fusedloss bench`.")


def _default_bench_out() -> Path:
    beside = Path.cwd() / "bench" / "results"
    return beside if beside.is_dir() else Path.cwd() / "fusedloss-bench"


def _cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_error", None):
        print(f"error: {args.bench_error}", file=sys.stderr)
        return 2
    common = import_bench()
    return common.run_from_args(args)


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from fusedloss import _demo

    return _demo.run(args)


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedloss",
        description="fusedloss: fused loss kernels for PyTorch (CUDA, Triton and CPU backends).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, build flags and the backends available on each device",
                       description="Print versions, build flags and which backends can run on each device.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "check", help="compare every op on every available backend with the float64 reference (exit 1 on a mismatch)",
        description=f"Run every op ({', '.join(_check.OPS)}; cross_entropy_probs is cross_entropy with "
                    "probability targets) on every available backend (except 'reference') and device on random "
                    "inputs over dtypes, shapes, options and reductions; compare every output and the gradient "
                    "of every differentiable input with fusedloss.reference computed in float64 on the same "
                    "rounded inputs. Prints one row per case; the exit code is 1 when any case is out of "
                    "tolerance or raises. Each option runs on one of the op's shapes in turn (--full: on "
                    "all). Triton runs on CPU tensors only when TRITON_INTERPRET=1 is set (then on small "
                    "shapes).")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="only this device (default: all)")
    p.add_argument("--backend", default=None, help="comma-separated backends to check (default: all available)")
    p.add_argument("--ops", default=None, help="comma-separated ops to check (default: all)")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated dtypes among {', '.join(_check.CHECK_DTYPES)} (default: all)")
    p.add_argument("--full", action="store_true", help="every option on every shape (slower)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--quiet", action="store_true", help="print only failing cases and the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Perturbs the named op's outputs by 1% before the comparison: a known failure, so that tests can
    # see the exit code and the report of a mismatch without a broken kernel.
    p.add_argument("--inject-error", default=None, metavar="OP", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "bench", help="time and peak memory of every op and backend against PyTorch: table, CSV and PNG",
        description="Benchmark fusedloss against PyTorch eager and torch.compile (and Liger on CUDA when "
                    "installed): median/p20/p80 time, GB/s, percent of the copy-bandwidth floor and peak "
                    "memory per op, provider, mode and size. Prints a table, writes one CSV per op and a PNG "
                    "plotted from it. On CPU, run it also with THP_MEM_ALLOC_ENABLE=1 in the environment: "
                    "the CSV records the setting and the plot shows both. Needs the bench/ directory of a "
                    "source checkout.")
    try:
        common = import_bench()
        common.add_arguments(p, default_out=_default_bench_out(), ops=True)
    except Exception as exc:  # noqa: BLE001 - the other commands must work without bench/
        p.set_defaults(bench_error=str(exc))
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "demo", help="train a small GPT twice, with F.cross_entropy and with fusedloss: speed, memory, loss curves",
        description="Train a small GPT-style language model on the Python standard library's own sources "
                    "(no download; word-level tokens, cached) twice from the same weights on the same batches: "
                    "once with the LM head and F.cross_entropy, once with fusedloss.linear_cross_entropy. "
                    "Prints steps/s, tokens/s, peak memory and the final loss of each, checks that the two "
                    "loss curves agree within fp32 rounding (exit 1 if not), and writes losses.csv and "
                    "loss_curves.png. The defaults take about two minutes on a 2-core CPU.")
    from fusedloss import _demo

    _demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "bench_error", None):  # without bench/, `bench` explains instead
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `fusedloss info | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BenchNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
