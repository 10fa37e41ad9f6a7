"""Accuracy of InfoNCE's temperature gradient: fusedloss vs plain PyTorch float32, both against float64.

    python bench/info_nce_temperature_grad.py [--backend cpu] [--sizes 256,1024] [--dim 768] [--seeds 3]

Float32 queries and keys with similar positives (k_i = q_i + 1.5 noise, as after some training), the
temperature a float32 tensor that requires grad; the float64 reference takes the same float32 inputs
and the float32 temperature's exact value, so each error is the computation's. Plain PyTorch is what a
user writes: ``F.cross_entropy(F.normalize(q) @ F.normalize(k).T / t, arange(N))`` (and its transpose
for the symmetric loss). One line per (symmetric, N, temperature) with each seed's errors and ratio;
the last line the worst per-seed ratio (a ratio of two rounding errors: read it with the magnitudes).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import fusedloss


def plain(q, k, t, symmetric):
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    return 0.5 * (loss + F.cross_entropy(logits.T, labels)) if symmetric else loss


def grad_of(fn, q, k, t, dtype):
    temp = torch.tensor(t, dtype=torch.float32).to(dtype=dtype, device=q.device).requires_grad_()
    (grad,) = torch.autograd.grad(fn(q.to(dtype), k.to(dtype), temp), temp)
    return grad.double().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--temperatures", default="0.02,0.05,0.07")
    args = ap.parse_args()
    worst = 0.0
    for symmetric, n, t in itertools.product((False, True), [int(x) for x in args.sizes.split(",")],
                                             [float(x) for x in args.temperatures.split(",")]):
        cells = []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(n, args.dim, generator=g)
            k = q + 1.5 * torch.randn(n, args.dim, generator=g)
            q, k = q.to(args.device), k.to(args.device)
            exact = grad_of(lambda a, b, tt: plain(a, b, tt, symmetric), q, k, t, torch.float64)
            err_plain = abs(grad_of(lambda a, b, tt: plain(a, b, tt, symmetric), q, k, t, torch.float32) - exact)
            ours = grad_of(lambda a, b, tt: fusedloss.info_nce(a, b, temperature=tt, symmetric=symmetric,
                                                               backend=args.backend), q, k, t, torch.float32)
            err_ours = abs(ours - exact)
            ratio = err_ours / max(err_plain, 1e-300)
            worst = max(worst, ratio)
            cells.append(f"ours {err_ours:.2e} plain {err_plain:.2e} ({ratio:.2f}x)")
        print(f"symmetric={symmetric} N={n} t={t} |grad|={abs(exact):.2e}: " + "  ".join(cells), flush=True)
    print(f"worst per-seed ratio ours/plain: {worst:.3g}")


if __name__ == "__main__":
    main()
