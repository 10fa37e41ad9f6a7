"""InfoNCE on bf16/fp16 rows: what the triton backend's in-kernel normalization costs in memory and
accuracy, against the float32 copies of the cpu backend and against plain PyTorch in the same dtype.

    python bench/info_nce_16bit.py [--device cpu|cuda] [--dtypes bfloat16,float16] [--shapes 64x128,256x128]

On CPU the triton backend runs in Triton's interpreter (set here, before triton is imported): slow, but
its allocations are PyTorch's, so the CPU allocator's peak shows what the path holds. Each shape NxD is
N queries against N keys, normalized, symmetric, temperature 0.07, forward + backward:
- peak: bytes held above the inputs during the step (fusedloss._memory.peak_memory), next to the
  size of the 16-bit gradients and of one float32 copy of both inputs;
- error: max |x - float64| / max |float64| of the loss and of each gradient, the float64 reference on
  the same 16-bit inputs. CCE's rule for 16-bit paths: a small multiple of plain PyTorch's error in the
  same dtype at most.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "--device" not in sys.argv or sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fusedloss  # noqa: E402
from bench.info_nce_temperature_grad import plain  # noqa: E402
from fusedloss import _memory, reference  # noqa: E402

TEMPERATURE = 0.07


def loss_fn(provider):
    if provider == "torch":  # what a user writes (bench/info_nce_temperature_grad.py)
        return lambda q, k, t: plain(q, k, t, symmetric=True)
    return lambda q, k, t: fusedloss.info_nce(q, k, temperature=t, symmetric=True, backend=provider[10:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--shapes", default="64x128,256x128")
    args = ap.parse_args()
    backends = ["triton", "cpu" if args.device == "cpu" else "cuda"]
    providers = [f"fusedloss-{b}" for b in backends if fusedloss.backends.why_unavailable(b, args.device) is None]
    providers.append("torch")
    print(f"torch {torch.__version__}, device {args.device}, symmetric InfoNCE, temperature {TEMPERATURE}, fwd+bwd")
    print(f"{'dtype':9} {'N':>5} {'D':>4}  {'provider':17} {'peak B':>9} {'grads B':>8} {'fp32 copy B':>11}  "
          f"{'err loss':>8} {'err dq':>8} {'err dk':>8}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes.split(","):
            n, d = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            q0 = torch.randn(n, d, device=args.device).to(dtype)
            k0 = (q0.float() + 1.5 * torch.randn(n, d, device=args.device)).to(dtype)  # similar positives
            q64, k64 = q0.double().requires_grad_(), k0.double().requires_grad_()
            ref = reference.info_nce(q64, k64, temperature=TEMPERATURE, symmetric=True)
            ref_grads = torch.autograd.grad(ref, (q64, k64))
            for provider in providers:
                fn = loss_fn(provider)
                q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
                out = {}

                def step():
                    loss = fn(q, k, TEMPERATURE)
                    out["loss"] = loss.detach()
                    out["grads"] = torch.autograd.grad(loss, (q, k))

                step()  # warm: compiled kernels and the allocator's first blocks
                peak = _memory.peak_memory(step, args.device)
                errs = [abs(out["loss"].double().item() - ref.item()) / abs(ref.item())]
                errs += [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(out["grads"], ref_grads)]
                print(f"{dtype_name:9} {n:5d} {d:4d}  {provider:17} {peak if peak is not None else -1:9d} "
                      f"{2 * n * d * dtype.itemsize:8d} {2 * n * d * 4:11d}  " + " ".join(f"{e:8.1e}" for e in errs))


if __name__ == "__main__":
    main()
