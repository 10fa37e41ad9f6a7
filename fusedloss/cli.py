"""The command line: ``python -m fusedloss <command>`` (also installed as ``fusedloss``).

Commands:
  info    versions, build flags and the backends available on each device
  check   every available backend against the float64 reference on random inputs (exit 1 on a mismatch)
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
import random
import sys
import time
from pathlib import Path

import torch

import fusedloss
from fusedloss import reference

try:  # progress bars are optional
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    report = fusedloss.info()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
        return 0
    backends = report.pop("backends", {})
    width = max(len(k) for k in report) + 2
    print(f"fusedloss {report.get('fusedloss')}")
    for key, value in report.items():
        if key == "fusedloss":
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"  {key.replace('_', ' '):<{width}}{'-' if value is None else value}")
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
# (rtol, atol) per dtype, elementwise |actual - expected| <= atol + rtol * |expected|, against the
# float64 reference on the same (rounded) inputs. The loss is accumulated and returned in float32
# for every low-precision dtype. For the gradient, atol is relative to max|expected gradient| (a
# mean-reduced gradient is O(1/N), so a fixed atol would mean nothing); its rtol covers the rounding
# of the gradient to the input dtype. tests/ holds the stricter table the test-suite uses.
CHECK_TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"loss": (1e-3, 1e-3), "grad": (1.6e-2, 2e-2)},
    torch.float16: {"loss": (1e-3, 1e-3), "grad": (2e-3, 1e-3)},
}
CHECK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (N, C) and one (N, C, d) shape; odd class counts on purpose. Triton's CPU interpreter gets small ones.
CHECK_SHAPES = [(37, 7), (3, 7, 5), (64, 1023), (6, 50257)]
CHECK_SHAPES_INTERPRETED = [(3, 7), (2, 7, 2), (2, 1023)]

_ALL = dict(weight=True, ignore=-100, label_smoothing=0.1, z_loss=1e-2, softcap=10.0, temperature=1.5,
            return_lse=True)
# (label, options, reduction). "weight"/"ignore" are expanded into tensors/targets by _check_one.
CHECK_OPTIONS = [
    ("plain", {}, "mean"),
    ("plain", {}, "sum"),
    ("plain", {}, "none"),
    ("weight", {"weight": True}, "mean"),
    ("ignore_index=-100", {"ignore": -100}, "mean"),
    ("weight ignore_index=2", {"weight": True, "ignore": 2}, "mean"),
    ("label_smoothing=0.1", {"label_smoothing": 0.1}, "mean"),
    ("label_smoothing=0.2 weight", {"label_smoothing": 0.2, "weight": True}, "none"),
    ("z_loss=1e-2", {"z_loss": 1e-2}, "mean"),
    ("softcap=4", {"softcap": 4.0}, "mean"),
    ("temperature=0.7", {"temperature": 0.7}, "sum"),
    ("all + lse", _ALL, "mean"),
    ("all + lse", _ALL, "none"),
]


def _check_targets(devices: list[str], backends_filter: list[str] | None) -> list[tuple[str, str]]:
    """(device, backend) pairs to check: every available backend except the reference."""
    pairs = []
    for device in devices:
        for b in fusedloss.backends.available(device):
            if b == "reference" or (backends_filter and b not in backends_filter):
                continue
            pairs.append((device, b))
    return pairs


def _max_err(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    """(max |a - e|, whether every element is within atol + rtol |e|), NaN/inf positions must agree."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return float("inf"), False
    finite = torch.isfinite(e)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf"), False
    if a.numel() == 0:
        return 0.0, True
    diff = (a - e).abs()[finite]
    if diff.numel() == 0:
        return 0.0, True
    ok = bool((diff <= atol + rtol * e.abs()[finite]).all())
    return float(diff.max()), ok


def _check_one(device: str, backend: str, dtype: torch.dtype, shape: tuple, opts: dict, reduction: str,
               gen: torch.Generator) -> dict:
    C = shape[1] if len(shape) > 1 else shape[0]
    x_full = torch.randn(shape, generator=gen) * 3
    x = x_full.to(dtype).to(device)
    target_shape = shape[:1] + shape[2:]
    target = torch.randint(0, C, target_shape, generator=gen)
    kwargs = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap", "temperature", "return_lse") if k in opts}
    ignore = opts.get("ignore")
    if ignore is not None:
        kwargs["ignore_index"] = ignore
        mask = torch.rand(target_shape, generator=gen) < 0.25
        mask.view(-1)[0] = False  # at least one element counts in the mean
        target = torch.where(mask, torch.full_like(target, ignore), target)
        if ignore >= 0:
            target.view(-1)[0] = (ignore + 1) % C
    target = target.to(device)
    weight = (torch.rand(C, generator=gen) * 1.5 + 0.25).to(device) if opts.get("weight") else None
    return_lse = kwargs.get("return_lse", False)
    upstream = torch.randn(target_shape, generator=gen, dtype=torch.float64).to(device)
    upstream_lse = torch.randn(target_shape, generator=gen, dtype=torch.float64).to(device)

    def objective(out):
        loss, lse = out if return_lse else (out, None)
        total = (loss.double() * upstream).sum() if reduction == "none" else loss.double()
        if lse is not None:
            total = total + (lse.double() * upstream_lse).sum()
        return loss, lse, total

    x_ref = x.detach().double().requires_grad_()
    ref_loss, ref_lse, ref_total = objective(reference.cross_entropy(
        x_ref, target, None if weight is None else weight.double(), reduction=reduction, **kwargs))
    (ref_grad,) = torch.autograd.grad(ref_total, x_ref)

    tol = CHECK_TOL[dtype]
    row = {"loss": None, "grad": None, "lse": None, "ok": False, "why": ""}
    try:
        x_fl = x.detach().clone().requires_grad_()
        loss, lse, total = objective(fusedloss.cross_entropy(x_fl, target, weight, reduction=reduction,
                                                             backend=backend, **kwargs))
        (grad,) = torch.autograd.grad(total, x_fl)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed row, not a crashed command
        row["why"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        return row
    problems = []
    if loss.dtype != torch.float32:
        problems.append(f"loss dtype {loss.dtype}")
    if grad.dtype != dtype:
        problems.append(f"grad dtype {grad.dtype}")
    row["loss"], ok_loss = _max_err(loss, ref_loss, *tol["loss"])
    grad_scale = float(ref_grad.abs().max()) or 1.0
    g_err, ok_grad = _max_err(grad / grad_scale, ref_grad / grad_scale, tol["grad"][0], tol["grad"][1])
    row["grad"] = g_err
    ok_lse = True
    if return_lse:
        row["lse"], ok_lse = _max_err(lse, ref_lse, *tol["loss"])
    for name, good in (("loss", ok_loss), ("grad", ok_grad), ("lse", ok_lse)):
        if not good:
            problems.append(f"{name} out of tolerance")
    row["ok"] = not problems
    row["why"] = "; ".join(problems)
    return row


def run_check(devices: list[str] | None = None, backends: list[str] | None = None,
              dtypes: list[torch.dtype] | None = None, *, seed: int | None = None, quiet: bool = False,
              progress: bool = True) -> int:
    """Compare every available backend with the float64 reference; print a table; return 0 or 1."""
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    dtypes = dtypes or list(CHECK_TOL)
    seed = random.randrange(2**31) if seed is None else seed
    pairs = _check_targets(devices, backends)
    if not pairs:
        print("check: no kernel backend is available on " + ", ".join(devices) + " (see `fusedloss info`)")
        return 1
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for device, backend in pairs:
        interpreted = backend == "triton" and device == "cpu"
        shapes = CHECK_SHAPES_INTERPRETED if interpreted else CHECK_SHAPES
        for dtype in dtypes:
            for shape in shapes:
                for label, opts, reduction in CHECK_OPTIONS:
                    plan.append((device, backend, dtype, shape, label, opts, reduction))
    print(f"check: {len(plan)} cases, backends {', '.join(f'{b}@{d}' for d, b in pairs)}, seed {seed} "
          f"(replay with --seed {seed}); reference: fusedloss.reference in float64")
    header = ["device", "backend", "dtype", "shape", "options", "reduction", "loss err", "grad err", "lse err",
              "result"]
    rows, failures = [], 0
    start = time.perf_counter()
    it = plan
    bar = None
    if progress and _tqdm is not None:
        bar = it = _tqdm(plan, desc="check", leave=False)
    for device, backend, dtype, shape, label, opts, reduction in it:
        r = _check_one(device, backend, dtype, shape, opts, reduction, gen)
        failures += not r["ok"]
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        result = "PASS" if r["ok"] else "FAIL" + (f" ({r['why']})" if r["why"] else "")
        rows.append([device, backend, str(dtype).replace("torch.", ""), "x".join(map(str, shape)), label,
                     reduction, fmt(r["loss"]), fmt(r["grad"]), fmt(r["lse"]), result])
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    shown = rows if not quiet else [r for r in rows if not r[-1].startswith("PASS")]
    if shown:
        widths = [max(len(h), *(len(r[i]) for r in shown)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        prev = None
        for r in shown:
            if prev is not None and r[:3] != prev:
                print()
            prev = r[:3]
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("tolerances (rtol, atol; grad atol relative to max|grad|): "
          + "; ".join(f"{str(d).replace('torch.', '')} loss {t['loss']} grad {t['grad']}"
                      for d, t in CHECK_TOL.items() if d in dtypes))
    verdict = "PASS" if failures == 0 else "FAIL"
    print(f"check: {verdict}: {len(rows) - failures}/{len(rows)} cases match the reference ({elapsed:.1f} s)")
    return 1 if failures else 0


def _cmd_check(args: argparse.Namespace) -> int:
    devices = [args.device] if args.device else None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backend.split(",")] if args.backend else None
    dtypes = None
    if args.dtype:
        try:
            dtypes = [CHECK_DTYPES[d.strip()] for d in args.dtype.split(",")]
        except KeyError as exc:
            print(f"error: unknown dtype {exc}; choose from {', '.join(CHECK_DTYPES)}", file=sys.stderr)
            return 2
    return run_check(devices, backends, dtypes, seed=args.seed, quiet=args.quiet)


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
        "check", help="compare every available backend with the float64 reference (exit 1 on a mismatch)",
        description="Run fusedloss.cross_entropy on every available backend (except 'reference') and device "
                    "on random inputs over dtypes, shapes, options and reductions; compare the loss, the "
                    "gradient and the lse with fusedloss.reference computed in float64. Prints one row per "
                    "case; the exit code is 1 when any case is out of tolerance. Triton runs on CPU tensors "
                    "only when TRITON_INTERPRET=1 is set (then on small shapes).")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="only this device (default: all)")
    p.add_argument("--backend", default=None, help="comma-separated backends to check (default: all available)")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated dtypes among {', '.join(CHECK_DTYPES)} (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--quiet", action="store_true", help="print only failing cases and the summary")
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
