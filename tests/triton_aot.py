"""Compile every Triton kernel the ops launch on a GPU, for a GPU that is not here.

    python tests/triton_aot.py [--arch 90] [--all-configs] [--quick | --plain] [--ops OP ...] [--json FILE]

The interpreter (how the suite runs the Triton kernels on CPU) never compiles a kernel: it does not
check types the way the compiler does, ignores shared memory and registers, and the launchers take
other paths under it (fp32 dot operands, explicit blocks, one warp). This script runs the ops'
``triton`` backend on CPU tensors **without** the interpreter, with a stand-in Triton driver that
claims a CUDA GPU of compute capability ``--arch``: each launch compiles its kernel down to a cubin
with Triton's own ptxas (``warmup``: nothing runs); the autotuned kernels compile the first config of
their set, or every config with ``--all-configs``.
The inputs are ``fusedloss check``'s cases (every op x dtype x option on its GPU shapes), plus the
large-vocabulary shapes whose block sizes the check's shapes do not reach. The outputs of the ops are
the uninitialized tensors the kernels would have written: only the compilation is checked.

Per compiled kernel it reports registers and stack bytes a thread (where ptxas puts spills) and dynamic
shared memory, read from the cubin with the cuobjdump that ships with Triton, and fails on a compile
error or on shared memory above the architecture's per-block limit. Spills are reported, not failed:
ptxas may spill a little where a config is at the edge, and the autotuner's timing decides whether
that config is used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Opt-in dynamic shared memory per block (CUDA C Programming Guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# Shapes of the large vocabularies (rows do not change a kernel's specialization; the class count
# sets the row kernels' blocks), per op of _selfcheck.OPS.
LARGE_SHAPES = {
    "cross_entropy": [(16, 32000), (16, 131072), (16, 262144)],
    "cross_entropy_probs": [(16, 131072)],
    "focal_loss": [(16, 131072)],
    "gap_loss": [(16, 131072)],
    "kl_div_logits": [(16, 131072)],
    "jsd_logits": [(16, 131072)],
    "info_nce": [(64, 64, 256), (64, 64, 1024)],
    "siglip_loss": [(64, 64, 256), (64, 64, 1024)],
}


class StandInDriver:
    """What JITFunction.run asks of the active driver before it compiles: a device, a stream and the
    target to compile for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    def __init__(self, arch: int, cuobjdump: str):
        self.arch = arch
        self.cuobjdump = cuobjdump
        self.rows: list[dict] = []
        self.context = ""

    def resources(self, cubin: bytes) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([self.cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
        return {k.lower(): int(v) for k, v in found.items()}

    def record(self, fn, signature, constexprs, options, kernel=None, error=None) -> None:
        consts = {str(k if not isinstance(k, tuple) or len(k) != 1 else k[0]): v for k, v in constexprs.items()}
        names = [p.name for p in fn.params]
        shown = {names[int(k)] if k.isdigit() else k: _short(v) for k, v in consts.items()}
        pointers = [t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")]
        row = {"kernel": fn.__name__, "input": pointers[0] if pointers else "-", "constexprs": shown,
               "num_warps": options.num_warps, "num_stages": options.num_stages, "case": self.context}
        if kernel is not None:
            row.update(self.resources(kernel.asm["cubin"]))
            row["dynamic_shared"] = kernel.metadata.shared
            row["ok"] = kernel.metadata.shared <= SHARED_LIMIT.get(self.arch, 99 * 1024)
            if not row["ok"]:
                row["error"] = f"shared memory {kernel.metadata.shared} B > {SHARED_LIMIT.get(self.arch)} B"
        else:
            row["ok"] = False
            row["error"] = error
        self.rows.append(row)


def _short(v) -> str:
    text = str(v)
    return text.replace("triton.language.", "tl.").replace("torch.", "")


def install(arch: int, recorder: Recorder, all_configs: bool) -> None:
    """Route every launch to a compile for ``arch``."""
    triton.runtime.driver.set_active(StandInDriver(arch))
    do_compile = JITFunction._do_compile

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        try:
            kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the report
            why = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
            recorder.record(self, signature, constexprs, options, error=why)
            raise
        recorder.record(self, signature, constexprs, options, kernel=kernel)
        return kernel

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - compile, never launch
        return original_run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction._do_compile = _do_compile
    JITFunction.run = run

    def autotuned_run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        for config in configs if all_configs else configs[:1]:
            self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        self.nargs = None

    Autotuner.run = autotuned_run


DTYPES = {"float32": (torch.float32, False), "float32-tf32": (torch.float32, True),
          "bfloat16": (torch.bfloat16, False), "float16": (torch.float16, False)}


def cases(ops: list[str] | None, dtypes: list[str], quick: bool = False, plain: bool = False):
    """(op name, dtype, shape, options label, options, reduction): the check's plan on its GPU shapes
    (``quick``: its first option and the one with the most options on; ``plain``: the first option
    only), then LARGE_SHAPES with each op's first option (not with ``plain``)."""
    from fusedloss import _selfcheck

    names = ops or list(_selfcheck.OPS)
    for name in names:
        op = _selfcheck.OPS[name]
        for dtype in dtypes:
            richest = max(range(len(op.options)), key=lambda i: len(op.options[i][1]))
            chosen = [0] if plain else sorted({0, richest}) if quick else range(len(op.options))
            for i in chosen:
                label, opts, reduction = op.options[i]
                yield name, dtype, op.shapes[i % len(op.shapes)], label, opts, reduction
            for shape in [] if plain else LARGE_SHAPES.get(name, []):
                label, opts, reduction = op.options[0]
                yield name, dtype, shape, label, opts, reduction


def run_case(name, dtype, shape, opts, reduction, gen) -> None:
    from fusedloss import _selfcheck

    op = _selfcheck.OPS[name]
    prob = op.make(shape, opts, reduction, dtype, "cpu", gen)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in prob.leaves.items()}
    fused = op.fused()
    outs = prob.run(lambda *a, **k: fused(*a, backend="triton", **k), leaves, False)
    total = sum(o.float().sum() for o in outs)
    torch.autograd.grad(total, list(leaves.values()), allow_unused=True)


OPERAND_KEYS = ("DOT_DTYPE", "GRAD_DOT_DTYPE", "INPUT_PRECISION", "FP32_PRECISION")


def summarize(rows: list[dict]) -> dict:
    """Rows grouped by kernel, operand types (the first pointer argument's, then the kernel's product
    dtypes and precisions), block sizes, warps and stages."""
    groups: dict = {}
    for r in rows:
        c = r["constexprs"]
        operands = "/".join([r["input"]] + [c[k] for k in OPERAND_KEYS if k in c])
        blocks = " ".join(f"{k[6:]}={v}" for k, v in c.items() if k.startswith("BLOCK")) or "-"
        groups.setdefault((r["kernel"], operands, blocks, r["num_warps"], r["num_stages"]), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config (else the first)")
    parser.add_argument("--quick", action="store_true",
                        help="each op's first option and the one with the most options on")
    parser.add_argument("--plain", action="store_true", help="each op's first option only, on one shape")
    parser.add_argument("--ops", nargs="*", help="ops of fusedloss check (default: all)")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES),
                        help="float32-tf32: float32 with torch.backends.cuda.matmul.allow_tf32 = True")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from fusedloss import _backend

    # The triton backend on CPU tensors is refused without the interpreter; here nothing runs.
    why = _backend.why_unavailable
    _backend.why_unavailable = lambda b, d: None if b == "triton" else why(b, d)
    _backend._RESOLVED.clear()

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    recorder = Recorder(args.arch, cuobjdump)
    install(args.arch, recorder, args.all_configs)
    gen = torch.Generator().manual_seed(0)
    failed_cases = []
    start = time.perf_counter()
    for name, dtype_name, shape, label, opts, reduction in cases(args.ops, args.dtypes, args.quick, args.plain):
        recorder.context = f"{name} {dtype_name} {'x'.join(map(str, shape))} {label} {reduction}"
        dtype, tf32 = DTYPES[dtype_name]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            run_case(name, dtype, shape, opts, reduction, gen)
        except Exception as exc:  # noqa: BLE001
            failed_cases.append((recorder.context, f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                                 traceback.format_exc(limit=-3)))
    elapsed = time.perf_counter() - start

    rows = recorder.rows
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}: {len(rows)} kernels compiled "
          f"in {elapsed:.0f} s ({'every autotune config' if args.all_configs else 'first autotune config'}); "
          "per kernel and launch config, over its specializations: the most registers a thread, stack bytes "
          "a thread (spills), dynamic shared memory")
    print(f"{'kernel':30} {'operands':20} {'blocks':30} {'warps':>5} {'stages':>6} {'n':>3} {'regs':>5} "
          f"{'stack B':>7} {'shared B':>8}")
    for key, group in summarize(rows).items():
        kernel, operands, blocks, warps, stages = key
        print(f"{kernel:30} {operands:20} {blocks:30} {warps:>5} {stages:>6} {len(group):>3} "
              f"{max(r.get('reg', 0) for r in group):>5} {max(r.get('stack', 0) for r in group):>7} "
              f"{max(r.get('dynamic_shared', 0) for r in group):>8}")
    spills = [r for r in rows if r.get("stack", 0) > 0]
    bad = [r for r in rows if not r["ok"]]
    print(f"spilling (stack > 0): {len(spills)} of {len(rows)}")
    for r in bad:
        print(f"FAIL {r['kernel']} ({r['case']}): {r['error']}")
    for context, why, tb in failed_cases:
        print(f"FAIL case {context}: {why}\n{tb}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "rows": rows,
                                               "failed_cases": [c[:2] for c in failed_cases]}, indent=1, default=str))
    ok = not bad and not failed_cases and rows
    print("triton_aot: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
