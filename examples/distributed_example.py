"""fusedloss.distributed on several processes, checked against the same losses computed in one process.

    torchrun --standalone --nproc_per_node=2 examples/distributed_example.py

Runs on CPUs (gloo) or, when every process can have its own GPU, on GPUs (nccl). Every rank builds the
same full tensors from one seed, keeps its part, and compares its results with the single-process loss.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import fusedloss
from fusedloss import distributed as fld


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def run(device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator(device=device).manual_seed(0)  # the same full tensors on every rank
    N, D, V = 64, 32, 1000
    hidden = torch.randn(N, D, device=device, generator=gen)
    head = torch.randn(V, D, device=device, generator=gen) / D**0.5
    target = torch.randint(V, (N,), device=device, generator=gen)
    target[::7] = -100  # padding tokens

    # An uneven split of the vocabulary: rank r holds classes [lo, hi).
    cuts = [0] + [V * r // world + 3 * r for r in range(1, world)] + [V]
    lo, hi = cuts[rank], cuts[rank + 1]

    # 1. Vocab-parallel cross-entropy on this rank's columns of the logits.
    logits_shard = (hidden @ head[lo:hi].T).requires_grad_()
    loss = fld.vocab_parallel_cross_entropy(logits_shard, target, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()
    full = (hidden @ head.T).requires_grad_()
    expected = fusedloss.cross_entropy(full, target, label_smoothing=0.1, z_loss=1e-4)
    expected.backward()
    _close(loss, expected, "vocab-parallel cross-entropy")
    _close(logits_shard.grad, full.grad[:, lo:hi], "its gradient (this rank's columns)")

    # 2. The same through a vocab-sharded LM head, without the logits.
    x = hidden.clone().requires_grad_()
    head_shard = head[lo:hi].clone().requires_grad_()
    lm_loss = fld.vocab_parallel_linear_cross_entropy(x, head_shard, target, chunk_size=16)
    lm_loss.backward()
    x1, head1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    lm_expected = fusedloss.linear_cross_entropy(x1, head1, target)
    lm_expected.backward()
    _close(lm_loss, lm_expected, "vocab-parallel linear cross-entropy")
    _close(head_shard.grad, head1.grad[lo:hi], "its head gradient (this rank's rows)")
    _close(x.grad, x1.grad, "its input gradient (all-reduced)")

    # 3. InfoNCE with every rank's keys as negatives, learnable temperature.
    B = 16
    queries = torch.randn(world * B, D, device=device, generator=gen)
    keys = queries + torch.randn(world * B, D, device=device, generator=gen)
    q = queries[rank * B:(rank + 1) * B].clone().requires_grad_()
    k = keys[rank * B:(rank + 1) * B].clone().requires_grad_()
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    nce = fld.info_nce(q, k, temperature=temperature, symmetric=True)
    (nce / world).backward()  # sum over ranks of nce / world = the loss of the whole batch
    total = nce.detach() / world
    dist.all_reduce(total)
    q1, k1 = queries.clone().requires_grad_(), keys.clone().requires_grad_()
    nce_expected = fusedloss.info_nce(q1, k1, temperature=0.07, symmetric=True)
    nce_expected.backward()
    _close(total, nce_expected, "gathered InfoNCE (sum over ranks)")
    _close(q.grad, q1.grad[rank * B:(rank + 1) * B], "its query gradient")
    _close(k.grad, k1.grad[rank * B:(rank + 1) * B], "its key gradient")

    if rank == 0:
        print(f"{world} ranks on {device.type}: vocab-parallel CE {loss.item():.4f} (one process "
              f"{expected.item():.4f}), LM head {lm_loss.item():.4f} ({lm_expected.item():.4f}), "
              f"InfoNCE {total.item():.4f} ({nce_expected.item():.4f}); all checks passed")


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if on_gpus:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if on_gpus else "gloo")
    try:
        run(device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
