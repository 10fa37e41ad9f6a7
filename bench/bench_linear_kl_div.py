"""Benchmark fusedloss.linear_kl_div against the naive two-head computation.

    python bench/bench_linear_kl_div.py [--quick] [--device cpu|cuda] [--dtype float32] [--out DIR]
    python bench/bench_linear_kl_div.py --once      (N=4096, D=1024, V=32000 on cpu: 2 steps each, side by side)
    fusedloss bench --ops linear_kl_div ...        (the same runner)

Distillation from a frozen teacher head: student hidden states h_s (N, D) and head W_s (V, D) require
grad, the teacher's h_t (N, D) and W_t (V, D) do not; KL(p_teacher || p_student) at T = 1, batchmean.
Providers:
- ``naive`` (the baseline): ``F.kl_div(F.log_softmax(h_s @ W_s.T, -1), F.log_softmax(h_t @ W_t.T, -1),
  log_target=True, reduction="batchmean")``: both (N, V) logits, their log-softmaxes and the gradient
  in full.
- ``fusedloss-<backend>``: every available kernel backend (not triton on CPU: the interpreter).
- ``liger`` (CUDA only, when ``liger_kernel`` is installed): Liger-Kernel's
  ``LigerFusedLinearJSD(jsd_beta=0.0)``, its forward KL(P || Q) with P the teacher, from both heads in
  chunks: the same loss.

Peak memory is the point of this op. TFLOP/s counts the ideal 2 N D V flops per GEMM: two forward GEMMs
(both heads), two backward (the student's input and weight): 8 N D V for fwd+bwd.
Bytes of an ideal kernel: both inputs and weights read, the student's gradients written.
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
from bench.common import Case, Inputs, OpSpec, Provider

OP = "linear_kl_div"


def make_inputs(case: Case) -> Inputs:
    n, d, v = case.shape["N"], case.shape["D"], case.shape["V"]
    hs = torch.randn(n, d, dtype=case.dtype, device=case.device).requires_grad_()
    ws = (torch.randn(v, d, device=case.device) / d**0.5).to(case.dtype).requires_grad_()
    ht = torch.randn(n, d, dtype=case.dtype, device=case.device)
    wt = (torch.randn(v, d, device=case.device) / d**0.5).to(case.dtype)
    return Inputs(args=(hs, ws, ht, wt), grad_tensors=[hs, ws])


def bytes_moved(case: Case, mode: str) -> int:
    n, d, v, e = case.shape["N"], case.shape["D"], case.shape["V"], case.elem_size
    fwd = 2 * (n * d + v * d) * e + 4
    bwd = 2 * (n * d + v * d) * e + (n * d + v * d) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flops(case: Case, mode: str) -> int:
    n, d, v = case.shape["N"], case.shape["D"], case.shape["V"]
    return {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * n * d * v


def shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"N": 512, "D": 256, "V": 8192}]
    if device.startswith("cuda"):
        return [{"N": 8192, "D": 4096, "V": v} for v in (32000, 131072)]
    return [{"N": 4096, "D": 1024, "V": 32000}]


def _naive(hs, ws, ht, wt):
    return F.kl_div(F.log_softmax(hs @ ws.T, -1), F.log_softmax(ht @ wt.T, -1), log_target=True,
                    reduction="batchmean")


def _make_liger(case: Case):
    from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: PLC0415 - optional peer, imported lazily

    jsd = LigerFusedLinearJSD(jsd_beta=0.0)

    def liger(hs, ws, ht, wt):
        return jsd(hs, ws, ht, wt, None)

    return liger


def providers(device: str) -> list[Provider]:
    out = [Provider("naive", lambda case: _naive, warmup=1)]
    out += common.fusedloss_providers(device, lambda fl, b: functools.partial(fl.linear_kl_div, backend=b))
    if device.startswith("cuda") and common.importable("liger_kernel"):
        out.append(Provider("liger", _make_liger, warmup=2))
    return out


SPEC = OpSpec(name=OP, make_inputs=make_inputs, providers=providers, bytes_moved=bytes_moved, shapes=shapes,
              baseline="naive", flops=flops)


def once(shape: dict, reps: int = 2) -> None:
    """``--once``: the naive head and fusedloss-cpu side by side at one shape, ``reps`` fwd+bwd steps each,
    alternating (for shapes whose steps take too long for the shared runner's repeated timing on a small
    machine), then each one's peak memory (fusedloss._memory.cpu_peak, as the runner measures it)."""
    import time

    import fusedloss
    from fusedloss._memory import cpu_peak

    case = Case(OP, shape, torch.float32, "cpu")
    inputs = make_inputs(case)
    fns = {"naive": _naive, "fusedloss-cpu": functools.partial(fusedloss.linear_kl_div, backend="cpu")}
    steps = {name: common.make_step(fn, inputs, "fwd+bwd") for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    peaks = {name: cpu_peak(step) for name, step in steps.items()}
    print(f"[bench] {OP} {case.label} float32 cpu, fwd+bwd, {reps} steps each (alternating); "
          f"load average {common._load_average()}")
    base_t, base_m = min(times["naive"]), peaks["naive"]
    for name in fns:
        t, m = min(times[name]), peaks[name]
        print(f"{name:14s} best {t * 1e3:9.1f} ms ({base_t / t:.2f}x)  steps {[round(x * 1e3) for x in times[name]]} ms"
              f"  peak {m / 2**20:8.1f} MB ({m / base_m:.3f} of naive)")


if __name__ == "__main__":
    if "--once" in sys.argv:
        sys.exit(once({"N": 4096, "D": 1024, "V": 32000}))
    sys.exit(common.script_main(OP))
