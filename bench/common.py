"""Shared benchmark machinery for every fusedloss op: cases, providers, timing, bytes, memory, CSV, table.

One script per op (``bench/bench_<op>.py``) describes the op as an :class:`OpSpec` (how to make
inputs, which providers race, how many bytes an ideal kernel moves, which sizes to sweep); this module
runs the race the same way for every op and writes one CSV schema for all of them.

What is measured, and how
-------------------------
- Modes: ``fwd`` (forward only, inputs require grad as in training, so the graph is built and
  dropped), ``bwd`` (backward only, ``loss.backward(retain_graph=True)`` on a graph built once before
  timing, as Liger's benchmarks do), ``fwd+bwd`` (a training step). Every step that runs a backward
  first sets each input's ``.grad`` to None, as a training loop's ``zero_grad()`` does, so every step
  pays for a fresh gradient allocation (on CPU: its first-touch page faults).
- Time, CPU: ``torch.utils.benchmark.Timer`` with the process's thread count (the Timer's default is
  1 thread), after warm-up calls, in blocks (``timeit(number)``, one call per block unless a call takes
  under 2 ms) until both ``min_run_time`` seconds and ``min_samples`` blocks are reached (or
  ``max_run_time``). The providers of a case and mode are timed interleaved, one block each in turn,
  so that load from other processes on a shared machine hits them alike (see :func:`time_many`).
  median/p20/p80 are over the blocks.
- Time, CUDA: ``triton.testing.do_bench`` with ``quantiles=[0.5, 0.2, 0.8]``.
- Bytes: explicit per op and mode (the traffic of an ideal fused kernel, see each op's
  ``bytes_moved``), giving ``GB/s = bytes / median``.
- Floor: ``bytes / copy bandwidth``, the copy bandwidth measured by this very process with
  ``dst.copy_(src)`` on large buffers of the device (read + write bytes counted; destination already
  touched). ``% of floor = floor time / median * 100``: 100 % means as fast as copying the bytes.
  Read-mostly modes (``fwd``) can pass 100 %, since reading alone is faster than copying.
- Peak memory (bytes), measured in one extra, separate call of the step:
  CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call.
  CPU: the running sum of the allocation/free events that PyTorch's CPU allocator reports to the
  profiler (``torch.profiler.profile(profile_memory=True)``), maximum over the call. It counts every
  tensor allocated through c10's allocator (eager ops, Inductor's generated code, our C++ kernels'
  ``at::empty``), so it is comparable between providers; it does not see memory a kernel takes
  outside PyTorch's allocator (malloc scratch, OpenMP stacks) nor page-level effects (huge pages).
  Both are the growth over what was allocated before the call; what the call keeps (a gradient, a
  saved graph) counts.

CSV columns (one schema for every op), units: ``median``/``p20``/``p80`` in milliseconds,
``GB/s`` in 1e9 bytes per second, ``% of floor`` in percent, ``peak memory`` and ``bytes`` in bytes,
``copy GB/s`` the measured copy bandwidth. ``setting`` names the environment knobs that change
results (``THP_MEM_ALLOC_ENABLE=1`` or ``default``); ``load avg`` is the machine's 1-minute load average
when the case was timed (the benchmark itself adds about its thread count; well above that, other
work shared the CPU and the times are inflated); ``note`` holds an error when a provider failed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib
import importlib.util
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"

MODES = ("fwd", "bwd", "fwd+bwd")
OPS = ("cross_entropy", "focal_loss", "gap_loss", "info_nce", "linear_cross_entropy", "kl_div", "linear_kl_div",
       "ce_extras", "lce_extras", "siglip", "soft_cross_entropy")

COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "device",
    "median", "p20", "p80", "GB/s", "% of floor", "peak memory",
    "versions", "git sha",
    # additions, the same for every op
    "setting", "device name", "threads", "load avg", "bytes", "copy GB/s", "timestamp", "note",
    "TFLOP/s",  # ops whose OpSpec counts flops (linear_cross_entropy: 6 N D V for fwd+bwd), else empty
]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}

try:  # progress bars are optional
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - tqdm missing
    _tqdm = None


# ----------------------------------------------------------------------------------------------
# What is benchmarked
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One problem: an op at one shape, dtype and device. ``shape`` maps dimension names to sizes."""

    op: str
    shape: dict
    dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def elements(self) -> int:
        return math.prod(self.shape.values())

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def __hash__(self) -> int:  # dicts are not hashable; the label is
        return hash((self.op, self.label, self.dtype, self.device))


@dataclass
class Inputs:
    """Arguments of the loss call, and the tensors whose ``.grad`` a training step clears."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    grad_tensors: list = field(default_factory=list)


@dataclass
class Provider:
    """A competitor: ``make(case)`` returns ``fn(*args, **kwargs) -> scalar loss``.

    ``make`` may do per-case work (``torch.compile`` resets dynamo and builds a fresh compiled
    function); ``warmup`` calls of the step run before timing (compilation happens there).
    ``fresh_inputs``: the provider writes into its inputs (Liger stores the gradient in the logits),
    so it gets its own copy.
    """

    name: str
    make: Callable[[Case], Callable]
    warmup: int = 2
    fresh_inputs: bool = False


@dataclass
class OpSpec:
    """Everything the shared runner needs to know about an op."""

    name: str
    make_inputs: Callable[[Case], Inputs]
    providers: Callable[[str], list]  # device -> [Provider] that can run there now
    bytes_moved: Callable[[Case, str], int]  # (case, mode) -> bytes an ideal kernel reads + writes
    shapes: Callable[[str, bool], list]  # (device, quick) -> [shape dict]
    baseline: str = "torch"  # the provider speed-ups are measured against
    flops: Callable[[Case, str], int] | None = None  # (case, mode) -> flops of the ideal kernel, or None


def importable(module: str) -> bool:
    """True when an optional peer's package is installed (looked up, not imported: its import, and any
    failure of it, comes at the provider's set-up, which the runner reports per provider)."""
    return importlib.util.find_spec(module) is not None


def torch_providers(fn: Callable, *, eager: str = "torch", compiled: str = "torch.compile") -> list[Provider]:
    """The PyTorch baselines of a benchmark: ``fn`` eager, and ``torch.compile(fn)`` compiled afresh for
    each case (dynamo reset: no recompile limit, no stale graphs; the warmup calls compile)."""
    def make_compiled(case: Case):
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    return [Provider(eager, lambda case: fn, warmup=2), Provider(compiled, make_compiled, warmup=3)]


def fusedloss_providers(device: str, make_fn: Callable[[object, str], Callable]) -> list:
    """One ``fusedloss-<backend>`` Provider per kernel backend available on ``device``.

    ``make_fn(fusedloss, backend)`` returns the callable to time (fusedloss imported here, so that a
    broken build still lets the baselines run). The reference (the oracle, not a competitor)
    and Triton on CPU (its interpreter) are left out.
    """
    try:
        import fusedloss

        backends = fusedloss.backends.available(device)
    except Exception as exc:  # noqa: BLE001 - a broken build still lets the baselines run
        print(f"[bench] fusedloss unavailable: {exc}", file=sys.stderr)
        return []
    return [Provider(f"fusedloss-{b}", lambda case, b=b: make_fn(fusedloss, b), warmup=2)
            for b in backends if b != "reference" and not (b == "triton" and not device.startswith("cuda"))]


def load_op(name: str) -> OpSpec:
    """The OpSpec of ``bench/bench_<name>.py``."""
    if name not in OPS:
        raise SystemExit(f"unknown op {name!r}; benchmarks exist for: {', '.join(OPS)}")
    module = importlib.import_module(f"bench.bench_{name}")
    return module.SPEC


# ----------------------------------------------------------------------------------------------
# The environment a result belongs to
# ----------------------------------------------------------------------------------------------
def setting() -> str:
    """The environment knobs that change results, as recorded in the CSV ``setting`` column."""
    knobs = []
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        knobs.append("THP_MEM_ALLOC_ENABLE=1")
    return " ".join(knobs) or "default"


def setting_slug(value: str) -> str:
    return "" if value == "default" else "-thp" if value == "THP_MEM_ALLOC_ENABLE=1" else "-" + "".join(
        c if c.isalnum() else "_" for c in value.lower())


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        import fusedloss

        parts.append(f"fusedloss {fusedloss.__version__}")
    except Exception as exc:  # noqa: BLE001 - report rather than fail
        parts.append(f"fusedloss import failed: {type(exc).__name__}")
    return "; ".join(parts)


def git_sha(root: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD`` of the checkout, ``+dirty`` when its tree differs; '' without git."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------------------------
# Timing, memory, bandwidth
# ----------------------------------------------------------------------------------------------
@dataclass
class TimingConfig:
    min_run_time: float = 1.0  # CPU: seconds of measurement at least
    min_samples: int = 10  # CPU: measured blocks at least (stretches min_run_time for slow calls)
    max_run_time: float = 20.0  # CPU: ... but not longer than this
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100

    @classmethod
    def quick(cls) -> "TimingConfig":
        return cls(min_run_time=0.2, min_samples=5, max_run_time=3.0, cuda_warmup_ms=10, cuda_rep_ms=40)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_many(fns: dict, device: str, cfg: TimingConfig) -> dict:
    """name -> (median, p20, p80) in ms, or the exception the call raised. Warm-up is the caller's job.

    CPU: the competitors are timed interleaved, one block of each in turn, round after round, so a
    change in the machine's load (other processes on a shared CPU) hits all of them alike and their
    ratios stay meaningful. A competitor leaves the rotation once it has both ``min_run_time`` seconds
    and ``min_samples`` blocks (or ``max_run_time`` seconds and 3 blocks). Each block is a
    ``torch.utils.benchmark.Timer.timeit(number)`` with the process's thread count; ``number`` is 1
    unless a call takes under 2 ms. (Not blocked_autorange: its overhead-based block sizing makes
    one 10-call block out of a 20 ms call, which leaves no spread to report.)
    CUDA: ``triton.testing.do_bench`` with quantiles [0.5, 0.2, 0.8], one competitor after the other.
    """
    results: dict = {}
    if device.startswith("cuda"):
        import triton.testing

        for name, fn in fns.items():
            try:
                med, p20, p80 = triton.testing.do_bench(fn, warmup=cfg.cuda_warmup_ms, rep=cfg.cuda_rep_ms,
                                                        quantiles=[0.5, 0.2, 0.8])
                results[name] = (float(med), float(p20), float(p80))
            except Exception as exc:  # noqa: BLE001 - reported per competitor
                results[name] = exc
        return results

    from torch.utils import benchmark

    timers, numbers, times, totals = {}, {}, {}, {}
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            fn()
            estimate = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001
            results[name] = exc
            continue
        numbers[name] = 1 if estimate >= 2e-3 else max(1, math.ceil(2e-3 / max(estimate, 1e-7)))
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times[name], totals[name] = [], 0.0
    active = list(timers)
    while active:
        for name in list(active):
            try:
                block = timers[name].timeit(numbers[name]).mean  # seconds per call
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
                active.remove(name)
                continue
            times[name].append(block)
            totals[name] += block * numbers[name]
            n = len(times[name])
            if (totals[name] >= cfg.min_run_time and n >= cfg.min_samples) or (
                    totals[name] > cfg.max_run_time and n >= 3):
                active.remove(name)
    for name, ts in times.items():
        if name not in results:
            results[name] = (_quantile(ts, 0.5) * 1e3, _quantile(ts, 0.2) * 1e3, _quantile(ts, 0.8) * 1e3)
    return results


def time_fn(fn: Callable[[], object], device: str, cfg: TimingConfig) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of ``fn()`` alone; warm-up is the caller's job."""
    result = time_many({"fn": fn}, device, cfg)["fn"]
    if isinstance(result, BaseException):
        raise result
    return result


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it (see module doc)."""
    from fusedloss._memory import peak_memory as measure  # the demo's measure too

    return measure(fn, device)


_COPY_BW: dict[str, float] = {}


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes per second of ``dst.copy_(src)``, read + write bytes counted, measured once per process."""
    if device in _COPY_BW:
        return _COPY_BW[device]
    if nbytes is None:
        nbytes = (1 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the destination: the floor is the steady-state copy
    med, _, _ = time_fn(lambda: dst.copy_(src), device, TimingConfig(min_run_time=0.5, min_samples=10))
    bw = 2 * nbytes / (med * 1e-3)
    del src, dst
    _COPY_BW[device] = bw
    return bw


# ----------------------------------------------------------------------------------------------
# Steps and the runner
# ----------------------------------------------------------------------------------------------
def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def make_step(fn: Callable, inputs: Inputs, mode: str) -> Callable[[], object]:
    """The callable that one timed iteration runs for ``mode``."""
    args, kwargs, grads = inputs.args, inputs.kwargs, inputs.grad_tensors
    if mode == "fwd":
        return lambda: fn(*args, **kwargs)
    if mode == "fwd+bwd":
        def train_step():
            _clear_grads(grads)
            fn(*args, **kwargs).backward()

        return train_step
    if mode == "bwd":
        loss = fn(*args, **kwargs)

        def backward_step():
            _clear_grads(grads)
            loss.backward(retain_graph=True)

        return backward_step
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _row(case: Case, provider: str, mode: str, env: dict, nbytes: int, copy_bw: float, timing=None,
         peak=None, note: str = "") -> dict:
    row = {c: "" for c in COLUMNS}
    row.update({
        "op": case.op, "provider": provider, "mode": mode, "shape": case.label,
        "dtype": str(case.dtype).replace("torch.", ""), "device": case.device.split(":")[0],
        "bytes": nbytes, "copy GB/s": f"{copy_bw / 1e9:.2f}", "note": note, **env,
    })
    if timing is not None:
        med, p20, p80 = timing
        floor_ms = nbytes / copy_bw * 1e3
        row.update({"median": f"{med:.4f}", "p20": f"{p20:.4f}", "p80": f"{p80:.4f}",
                    "GB/s": f"{nbytes / (med * 1e-3) / 1e9:.2f}", "% of floor": f"{floor_ms / med * 100:.1f}"})
    if peak is not None:
        row["peak memory"] = str(peak)
    return row


def run_op(spec: OpSpec, device: str, dtypes: Sequence[torch.dtype], modes: Sequence[str] = MODES, *,
           quick: bool = False, providers: Sequence[str] | None = None, shapes: Sequence[dict] | None = None,
           timing: TimingConfig | None = None, memory: bool = True, progress: bool = True) -> list[dict]:
    """Run every (shape, dtype, mode) of one op, all providers side by side; return CSV rows."""
    cfg = timing or (TimingConfig.quick() if quick else TimingConfig())
    env = {"versions": versions(), "git sha": git_sha(), "setting": setting(), "device name": device_name(device),
           "threads": str(torch.get_num_threads()),
           "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    available = spec.providers(device)
    if providers:
        unknown = [p for p in providers if p not in {q.name for q in available}]
        if unknown:
            print(f"[bench] {spec.name}: providers not available on {device}, skipped: {', '.join(unknown)}")
        available = [p for p in available if p.name in providers]
    shapes = list(shapes) if shapes is not None else spec.shapes(device, quick)
    copy_bw = copy_bandwidth(device)
    torch.manual_seed(0)

    bar = _tqdm(total=len(shapes) * len(dtypes) * len(modes), desc=f"{spec.name} {device}", leave=False,
                disable=not progress) if _tqdm is not None else None
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            case = Case(spec.name, dict(shape), dtype, device)
            _free(device)
            # Set up every provider of the case: one shared set of inputs, except for providers that
            # write into theirs.
            entries, failed = [], {}
            shared = None
            for prov in available:
                try:
                    if prov.fresh_inputs:
                        inputs = spec.make_inputs(case)
                    else:
                        shared = shared or spec.make_inputs(case)
                        inputs = shared
                    entries.append((prov, prov.make(case), inputs))
                except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the race
                    _warn(case, prov.name, "setup", exc)
                    failed[prov.name] = exc
            for mode in modes:
                if bar is not None:
                    bar.set_postfix_str(f"{case.label} {str(dtype).replace('torch.', '')} {mode}")
                nbytes = spec.bytes_moved(case, mode)
                steps, result = {}, dict(failed)
                for prov, fn, inputs in entries:
                    try:
                        step = make_step(fn, inputs, mode)
                        for _ in range(prov.warmup):  # compiles, autotunes, fills caches
                            step()
                        _sync(device)
                        steps[prov.name] = (step, inputs)
                    except Exception as exc:  # noqa: BLE001
                        _warn(case, prov.name, mode, exc)
                        result[prov.name] = exc
                for inputs in {id(i): i for _, i in steps.values()}.values():
                    _clear_grads(inputs.grad_tensors)
                load = _load_average()
                result.update(time_many({name: step for name, (step, _) in steps.items()}, device, cfg))
                for prov in available:
                    res = result.get(prov.name)
                    if isinstance(res, BaseException) or res is None:
                        if prov.name in steps:
                            _warn(case, prov.name, mode, res)
                        row = _row(case, prov.name, mode, env, nbytes, copy_bw, note=_short(res))
                    else:
                        peak = None
                        if memory:
                            step, inputs = steps[prov.name]
                            # Start without gradients: otherwise the step's own `x.grad = None` frees
                            # the previous gradient inside the measured window and hides the new one.
                            _clear_grads(inputs.grad_tensors)
                            _free(device)
                            try:
                                peak = peak_memory(step, device)
                            except Exception:  # noqa: BLE001 - a time without a memory figure
                                peak = None
                        row = _row(case, prov.name, mode, env, nbytes, copy_bw, res, peak)
                        if spec.flops is not None:
                            row["TFLOP/s"] = f"{spec.flops(case, mode) / (res[0] * 1e-3) / 1e12:.1f}"
                    row["load avg"] = load
                    rows.append(row)
                steps = None  # frees the retained graphs of "bwd"
                for _, _, inputs in entries:
                    _clear_grads(inputs.grad_tensors)
                _free(device)
                if bar is not None:
                    bar.update(1)
            entries = shared = None
    if bar is not None:
        bar.close()
    return rows


def _load_average() -> str:
    """The 1-minute load average when the case started: other work on a shared machine skews times."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return ""


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no result"
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:200]


def _warn(case: Case, provider: str, what: str, exc: BaseException) -> None:
    print(f"[bench] {case.op} {case.label} {case.dtype} {provider} {what} failed: {_short(exc)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Output: CSV and table
# ----------------------------------------------------------------------------------------------
def csv_path(out_dir: Path, op: str, device: str, quick: bool, setting_value: str, date: str | None = None) -> Path:
    """``<op>-<device>[-quick]-<date>[-<setting>].csv``; the PNG drops the setting suffix."""
    date = date or _dt.date.today().isoformat()
    return Path(out_dir) / f"{plot_stem(op, device, quick, date)}{setting_slug(setting_value)}.csv"


def plot_stem(op: str, device: str, quick: bool, date: str) -> str:
    return f"{op}-{device.split(':')[0]}{'-quick' if quick else ''}-{date}"


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return path


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def speedups(rows: Sequence[dict], baseline: str = "torch") -> dict[int, float]:
    """index of row -> baseline median / row median, for rows whose baseline ran in the same setting."""
    key = lambda r: (r["op"], r["mode"], r["shape"], r["dtype"], r["device"], r.get("setting", ""))  # noqa: E731
    base = {key(r): _num(r["median"]) for r in rows if r["provider"] == baseline}
    out = {}
    for i, r in enumerate(rows):
        b, m = base.get(key(r)), _num(r["median"])
        if b and m:
            out[i] = b / m
    return out


def format_table(rows: Sequence[dict], baseline: str = "torch") -> str:
    """Plain-text table with aligned columns (no dependency)."""
    if not rows:
        return "(no results)"
    ratio = speedups(rows, baseline)
    show_setting = len({r.get("setting", "") for r in rows}) > 1
    show_flops = any(r.get("TFLOP/s") for r in rows)
    header = ["op", "shape", "dtype", "mode", "provider"] + (["setting"] if show_setting else []) + [
        "median ms", "p20 ms", "p80 ms", "GB/s", "% floor", "peak MB", f"vs {baseline}"] + (
        ["TFLOP/s"] if show_flops else [])
    lines = []
    for i, r in enumerate(rows):
        peak = _num(r.get("peak memory"))
        cells = [r["op"], r["shape"], r["dtype"], r["mode"], r["provider"]]
        if show_setting:
            cells.append(r.get("setting", ""))
        if _num(r["median"]) is None:
            cells += ["failed: " + (r.get("note") or "?")[:60], "", "", "", "", "", ""] + ([""] if show_flops else [])
        else:
            cells += [f"{float(r['median']):.3f}", f"{float(r['p20']):.3f}", f"{float(r['p80']):.3f}",
                      f"{float(r['GB/s']):.1f}", f"{float(r['% of floor']):.0f}",
                      f"{peak / 1e6:.1f}" if peak is not None else "", f"{ratio[i]:.2f}x" if i in ratio else ""]
            if show_flops:
                cells.append(r.get("TFLOP/s", ""))
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    numeric = {h for h in header if h.endswith(("ms", "GB/s", "floor", "MB", "TFLOP/s")) or h.startswith("vs ")}

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if h in numeric else str(c).ljust(w)
                         for c, w, h in zip(cells, widths, header)).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    prev = None
    for cells in lines:
        group = tuple(cells[:3])
        if prev is not None and group != prev:
            out.append("")
        prev = group
        out.append(fmt(cells))
    return "\n".join(out)


def print_table(rows: Sequence[dict], baseline: str = "torch") -> None:
    print(format_table(rows, baseline))


# ----------------------------------------------------------------------------------------------
# Entry points shared by bench/bench_<op>.py and `fusedloss bench`
# ----------------------------------------------------------------------------------------------
def parse_dtypes(text: str | None, device: str) -> list[torch.dtype]:
    if not text:
        return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    out = []
    for name in text.split(","):
        name = name.strip()
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
        out.append(DTYPES[name])
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(parser: argparse.ArgumentParser, *, default_out: Path | str, ops: bool = True) -> None:
    """The benchmark options, the same for `fusedloss bench` and `python bench/bench_<op>.py`."""
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short timing (about a minute on a 2-core CPU)")
    if ops:
        parser.add_argument("--ops", default=",".join(OPS),
                            help=f"comma-separated ops to benchmark (default: {','.join(OPS)})")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes, e.g. float32,bfloat16 (default: float32 on CPU, "
                             "float32,bfloat16 on CUDA)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes among {', '.join(MODES)} (default: all)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: every one available), "
                             "e.g. torch,torch.compile,fusedloss-cpu")
    parser.add_argument("--shapes", default=None,
                        help="override the sizes: ';'-separated shapes of 'k=v' pairs, e.g. 'N=4096,C=32000;N=1024,C=8192'")
    parser.add_argument("--out", default=str(default_out),
                        help=f"directory for the CSV and PNG files (default: {default_out})")
    parser.add_argument("--no-csv", action="store_true", help="print the table only; write no CSV or PNG")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV but no PNG")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")


def parse_shapes(text: str | None) -> list[dict] | None:
    if not text:
        return None
    shapes = []
    for part in text.split(";"):
        shape = {}
        for kv in part.split(","):
            k, _, v = kv.partition("=")
            if not v:
                raise SystemExit(f"--shapes: expected k=v, got {kv!r}")
            shape[k.strip()] = int(v)
        shapes.append(shape)
    return shapes


def run_from_args(args: argparse.Namespace, ops: Sequence[str] | None = None) -> int:
    """Run the benchmarks that ``args`` (from :func:`add_arguments`) ask for: table, CSV, PNG."""
    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    op_names = list(ops) if ops is not None else [o.strip() for o in args.ops.split(",") if o.strip()]
    dtypes = parse_dtypes(args.dtype, device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown mode(s) {bad}; choose from {MODES}", file=sys.stderr)
        return 2
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    shapes = parse_shapes(getattr(args, "shapes", None))
    print(f"[bench] device {device} ({device_name(device)}), {torch.get_num_threads()} threads, setting: {setting()}, "
          f"git {git_sha() or '?'}; {versions()}")
    load = _load_average()
    if device == "cpu" and load and float(load) > 0.5:
        print(f"[bench] note: load average {load} before starting; other processes share this CPU")
    if device == "cpu" and setting() == "default":
        print("[bench] CPU: fresh large outputs pay first-touch page faults; also run with "
              "THP_MEM_ALLOC_ENABLE=1 to see the huge-page setting")
    all_rows = []
    for name in op_names:
        spec = load_op(name)
        rows = run_op(spec, device, dtypes, modes, quick=args.quick, providers=providers, shapes=shapes,
                      memory=not args.no_memory)
        all_rows += rows
        print()
        print(f"copy bandwidth (floor): {copy_bandwidth(device) / 1e9:.1f} GB/s")
        print_table(rows, spec.baseline)
        loads = [float(r["load avg"]) for r in rows if r.get("load avg")]
        if loads:
            print(f"load average while timing: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} cores"
                  + (" (other work shared the machine: times are inflated)" if device == "cpu"
                     and max(loads) > (os.cpu_count() or 1) + 1 else ""))
        if not args.no_csv:
            path = write_csv(rows, csv_path(args.out, name, device, args.quick, setting()))
            print(f"\nwrote {path}")
            if not args.no_plot:
                from bench import plot

                for png in plot.plot_dir(Path(args.out), stems=[plot_stem(name, device, args.quick,
                                                                          _dt.date.today().isoformat())]):
                    print(f"wrote {png}")
    failed = [r for r in all_rows if _num(r["median"]) is None]
    return 1 if failed and len(failed) == len(all_rows) else 0


def script_main(op: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Benchmark fusedloss {op} against PyTorch (table, CSV, PNG).")
    add_arguments(parser, default_out=DEFAULT_OUT, ops=False)
    args = parser.parse_args(argv)
    return run_from_args(args, ops=[op])
