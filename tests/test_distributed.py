"""fusedloss.distributed on real process groups (gloo, CPU) against the single-process losses in float64.

Every rank builds the same full tensors from one seed, runs the distributed loss on its part and checks
its own result and gradients against fusedloss.reference on the whole batch, computed in float64 by itself.
Starting a process that imports torch takes seconds here, so all cases of one world size run in one
launch (2 and 3 ranks), from a forkserver that imported torch and fusedloss once; a case that fails
raises in its rank, which ends the launch (torch kills the other ranks) and fails the test with the
rank's traceback. A deadline kills the ranks of a launch that hangs.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SEED, assert_close

import fusedloss
from fusedloss import distributed as fld
from fusedloss import reference

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 150
gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")

# (dtype, backend) of the distributed run; the expected values are always float64 reference ones.
CONFIGS = [(torch.float64, "cpu"), (torch.float64, "reference"), (torch.float32, "cpu")]
REDUCTIONS = ["none", "mean", "sum"]
CE_OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-2), dict(weight=True),
              dict(label_smoothing=0.2, z_loss=1e-2, weight=True)]
# Class slices per world size: uneven, and an empty one with 3 ranks.
SLICES = {2: [5, 12], 3: [7, 0, 10]}


def _bounds(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _upstream(loss: torch.Tensor, reduction: str, gen: torch.Generator) -> torch.Tensor:
    """A scalar to backpropagate: a random weighting of the per-row losses for reduction="none"."""
    if reduction == "none":
        return (loss * torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)).sum()
    return loss


def _check(actual, expected, dtype, kind, msg):
    assert_close(actual, expected, dtype, kind, msg)


# --- cases (each runs on every rank) -------------------------------------------------------------------------

def case_vocab_parallel_ce(rank, world, seed):
    sizes = SLICES[world]
    lo, hi = _bounds(sizes)[rank]
    V, N = sum(sizes), 13
    for i, (dtype, backend) in enumerate(CONFIGS):
        for j, opts in enumerate(CE_OPTIONS):
            for reduction in REDUCTIONS:
                gen = torch.Generator().manual_seed(seed + 1000 * i + 10 * j)
                full = (3 * torch.randn(N, V, generator=gen, dtype=torch.float64)).to(dtype)
                target = torch.randint(V, (N,), generator=gen)
                target[::4] = -100
                weight = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5 if opts.get("weight") else None
                kw = dict(label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
                          reduction=reduction)
                msg = f"vocab_parallel_cross_entropy {dtype} {backend} {opts} {reduction} rank {rank}/{world}"

                shard = full[:, lo:hi].detach().requires_grad_()  # unit class stride, row stride V
                w_shard = weight[lo:hi].to(dtype) if weight is not None else None
                loss = fld.vocab_parallel_cross_entropy(shard, target, weight=w_shard, backend=backend, **kw)
                _upstream(loss, reduction, torch.Generator().manual_seed(seed)).backward()

                ref_in = full.double().requires_grad_()
                expected = reference.cross_entropy(ref_in, target, weight, **kw)
                _upstream(expected, reduction, torch.Generator().manual_seed(seed)).backward()
                _check(loss, expected, dtype, "loss", msg)
                _check(shard.grad, ref_in.grad[:, lo:hi], dtype, "grad", msg)


def case_vocab_parallel_ce_variants(rank, world, seed):
    sizes = SLICES[world]
    bounds = _bounds(sizes)
    lo, hi = bounds[rank]
    V, N = sum(sizes), 9
    gen = torch.Generator().manual_seed(seed + 7)
    dtype = torch.float64

    # One row (V_r,) with a 0-dim target, an explicit vocab_start, ignore_index set to a class index,
    # and a transposed (non unit class stride) shard.
    row = torch.randn(V, generator=gen, dtype=dtype)
    for t in (0, V - 1, 3):
        shard = row[lo:hi].detach().requires_grad_()
        loss = fld.vocab_parallel_cross_entropy(shard, torch.tensor(t), vocab_start=lo, ignore_index=3,
                                                label_smoothing=0.1)
        loss.backward()
        ref_in = row.clone().requires_grad_()
        expected = reference.cross_entropy(ref_in, torch.tensor(t), ignore_index=3, label_smoothing=0.1)
        expected.backward()
        _check(loss, expected, dtype, "loss", f"1-D target {t}")
        _check(shard.grad, ref_in.grad[lo:hi], dtype, "grad", f"1-D target {t}")

    full = torch.randn(V, N, generator=gen, dtype=dtype).T  # class stride N
    target = torch.randint(V, (N,), generator=gen)
    shard = full[:, lo:hi].detach().requires_grad_()
    loss = fld.vocab_parallel_cross_entropy(shard, target, vocab_start=torch.tensor(lo), z_loss=1e-3)
    loss.backward()
    ref_in = full.clone().requires_grad_()
    expected = reference.cross_entropy(ref_in, target, z_loss=1e-3)
    expected.backward()
    _check(loss, expected, dtype, "loss", "transposed")
    _check(shard.grad, ref_in.grad[:, lo:hi], dtype, "grad", "transposed")

    # Logits far from 0: the merge works relative to the global max, never the raw logits.
    full32 = (torch.randn(N, V, generator=gen) + 1e4).float()
    shard = full32[:, lo:hi].detach().requires_grad_()
    loss = fld.vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1, z_loss=1e-4, reduction="sum")
    loss.backward()
    ref_in = full32.double().requires_grad_()
    expected = reference.cross_entropy(ref_in, target, label_smoothing=0.1, z_loss=1e-4, reduction="sum")
    expected.backward()
    _check(loss, expected, torch.float32, "loss", "offset 1e4")
    _check(shard.grad, ref_in.grad[:, lo:hi], torch.float32, "grad", "offset 1e4")

    # bf16 shards: fp32 loss, bf16 gradient rounded once.
    full16 = (3 * torch.randn(N, V, generator=gen)).bfloat16()
    shard = full16[:, lo:hi].detach().requires_grad_()
    loss = fld.vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
    loss.backward()
    ref_in = full16.double().requires_grad_()
    expected = reference.cross_entropy(ref_in, target, label_smoothing=0.1)
    expected.backward()
    assert loss.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16
    _check(loss, expected, torch.bfloat16, "loss", "bf16")
    _check(shard.grad, ref_in.grad[:, lo:hi], torch.bfloat16, "grad", "bf16")

    # Every row ignored: mean is 0/0 = NaN (as torch), gradient 0.
    shard = full[:, lo:hi].detach().requires_grad_()
    loss = fld.vocab_parallel_cross_entropy(shard, torch.full((N,), -100))
    loss.backward()
    assert torch.isnan(loss) and (shard.grad == 0).all()

    # A target out of [0, V) raises on every rank (CPU), after the same collectives everywhere.
    bad = target.clone()
    bad[2] = V
    with pytest.raises(IndexError, match="out of"):
        fld.vocab_parallel_cross_entropy(full[:, lo:hi], bad)
    # Overlapping slices (every rank claims to start at 0) are caught the same way, for world > 1.
    with pytest.raises(IndexError, match="overlap"):
        fld.vocab_parallel_cross_entropy(full[:, lo:hi], torch.zeros(N, dtype=torch.int64), vocab_start=0)


def case_vocab_parallel_linear_ce(rank, world, seed):
    sizes = SLICES[world]
    lo, hi = _bounds(sizes)[rank]
    V, N, D = sum(sizes), 11, 6
    cases = [
        (torch.float64, "cpu", dict(), "mean", 4, True),
        (torch.float64, "cpu", dict(label_smoothing=0.2, z_loss=1e-2, weight=True), "none", 3, True),
        (torch.float64, "reference", dict(label_smoothing=0.1), "sum", None, True),
        (torch.float64, "cpu", dict(z_loss=1e-2), "mean", 5, False),
        (torch.float32, "cpu", dict(label_smoothing=0.1, weight=True), "mean", None, True),
        (torch.bfloat16, "cpu", dict(label_smoothing=0.1, z_loss=1e-3), "mean", 4, True),
    ]
    for i, (dtype, backend, opts, reduction, chunk, reduce_grad) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + 100 + i)
        x = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
        head = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
        bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype)
        target = torch.randint(V, (N,), generator=gen)
        target[1::5] = -100
        weight = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5 if opts.get("weight") else None
        kw = dict(label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
                  reduction=reduction)
        msg = f"vocab_parallel_linear_cross_entropy case {i} rank {rank}/{world}"

        xi = x.detach().requires_grad_()
        w_shard = head[lo:hi].detach().requires_grad_()
        b_shard = bias[lo:hi].detach().requires_grad_()
        loss = fld.vocab_parallel_linear_cross_entropy(
            xi, w_shard, target, linear_bias=b_shard, weight=weight[lo:hi].to(dtype) if weight is not None else None,
            chunk_size=chunk, reduce_input_grad=reduce_grad, backend=backend, **kw)
        _upstream(loss, reduction, torch.Generator().manual_seed(seed)).backward()

        rx, rw, rb = (t.double().requires_grad_() for t in (x, head, bias))
        expected = reference.cross_entropy(rx @ rw.T + rb, target, weight, **kw)
        _upstream(expected, reduction, torch.Generator().manual_seed(seed)).backward()
        _check(loss, expected, dtype, "loss", msg)
        _check(w_shard.grad, rw.grad[lo:hi], dtype, "grad", msg + " weight_shard")
        _check(b_shard.grad, rb.grad[lo:hi], dtype, "grad", msg + " bias")
        gx = xi.grad
        if not reduce_grad:  # each rank holds its shard's part; their sum is the input's gradient
            gx = gx.clone()
            dist.all_reduce(gx)
        _check(gx, rx.grad, dtype, "grad", msg + " input")


def case_token_weight(rank, world, seed):
    """token_weight of both vocab-parallel losses, against the float64 reference on the full logits."""
    sizes = SLICES[world]
    lo, hi = _bounds(sizes)[rank]
    V, N, D = sum(sizes), 10, 5
    gen = torch.Generator().manual_seed(seed + 300)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    head = torch.randn(V, D, generator=gen, dtype=torch.float64)
    target = torch.randint(V, (N,), generator=gen)
    target[::3] = -100
    u = torch.rand(N, generator=gen, dtype=torch.float64) * 2
    weight = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5
    for reduction in REDUCTIONS:
        kw = dict(label_smoothing=0.1, reduction=reduction, token_weight=u)
        msg = f"token_weight {reduction} rank {rank}/{world}"
        rx, rw = x.clone().requires_grad_(), head.clone().requires_grad_()
        expected = reference.cross_entropy(rx @ rw.T, target, weight, **kw)
        _upstream(expected, reduction, torch.Generator().manual_seed(seed)).backward()

        shard = (x @ head.T)[:, lo:hi].detach().requires_grad_()
        loss = fld.vocab_parallel_cross_entropy(shard, target, weight=weight[lo:hi], backend="cpu", **kw)
        _upstream(loss, reduction, torch.Generator().manual_seed(seed)).backward()
        _check(loss, expected, torch.float64, "loss", msg)

        xi, w_shard = x.clone().requires_grad_(), head[lo:hi].clone().requires_grad_()
        loss = fld.vocab_parallel_linear_cross_entropy(xi, w_shard, target, weight=weight[lo:hi], chunk_size=4,
                                                       backend="cpu", **kw)
        _upstream(loss, reduction, torch.Generator().manual_seed(seed)).backward()
        _check(loss, expected, torch.float64, "loss", msg + " linear")
        _check(w_shard.grad, rw.grad[lo:hi], torch.float64, "grad", msg + " weight_shard")
        _check(xi.grad, rx.grad, torch.float64, "grad", msg + " input")


def case_info_nce(rank, world, seed):
    D = 8
    runs = []
    for symmetric in (False, True):
        for learnable in (False, True):
            for dtype, backend in ((torch.float64, "cpu"), (torch.float32, "cpu")):
                runs.append((symmetric, learnable, dtype, backend, [5] * world, None))
    runs.append((False, True, torch.float64, "reference", [5] * world, None))
    runs.append((True, True, torch.bfloat16, "cpu", [5] * world, None))
    uneven = [4, 7, 5][:world]
    runs.append((True, True, torch.float64, "cpu", uneven, None))
    runs.append((False, False, torch.float64, "cpu", uneven, [k + 3 for k in uneven]))  # extra keys, labels
    for i, (symmetric, learnable, dtype, backend, n_sizes, m_sizes) in enumerate(runs):
        m_sizes = m_sizes or n_sizes
        gen = torch.Generator().manual_seed(seed + 200 + i)
        qs = [torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype) for n in n_sizes]
        ks = [torch.randn(m, D, generator=gen, dtype=torch.float64).to(dtype) for m in m_sizes]
        custom = m_sizes != n_sizes
        labels = [torch.randint(m, (n,), generator=gen) for n, m in zip(n_sizes, m_sizes)] if custom else None
        msg = f"info_nce run {i} symmetric={symmetric} learnable={learnable} {dtype} rank {rank}/{world}"
        reduction = "mean" if len(set(n_sizes)) == 1 else "sum"

        q = qs[rank].detach().requires_grad_()
        k = ks[rank].detach().requires_grad_()
        temp = torch.tensor(0.1, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            requires_grad=True) if learnable else 0.1
        sizes = list(zip(n_sizes, m_sizes)) if i % 2 else None  # both with and without batch_sizes
        loss = fld.info_nce(q, k, labels[rank] if custom else None, temperature=temp, symmetric=symmetric,
                            reduction=reduction, batch_sizes=sizes, backend=backend)
        total_n = sum(n_sizes)
        # The terms whose sum over ranks is the single-process mean.
        part = loss / world if reduction == "mean" else loss / total_n
        part.backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), msg
        assert q.grad.dtype == k.grad.dtype == dtype, msg
        summed = part.detach().clone()
        dist.all_reduce(summed)

        rq = torch.cat(qs).double().requires_grad_()
        rk = torch.cat(ks).double().requires_grad_()
        rt = torch.tensor(0.1, dtype=torch.float64, requires_grad=True) if learnable else 0.1
        offsets = [sum(m_sizes[:r]) for r in range(world)]
        all_labels = torch.cat([lab + off for lab, off in zip(labels, offsets)]) if custom else None
        expected = reference.info_nce(rq, rk, all_labels, temperature=rt, symmetric=symmetric)
        expected.backward()
        q_lo, k_lo = sum(n_sizes[:rank]), offsets[rank]
        _check(summed, expected, dtype, "loss", msg)
        _check(q.grad, rq.grad[q_lo:q_lo + n_sizes[rank]], dtype, "grad", msg + " query")
        _check(k.grad, rk.grad[k_lo:k_lo + m_sizes[rank]], dtype, "grad", msg + " key")
        if learnable:
            gt = temp.grad.clone()
            dist.all_reduce(gt)  # each rank holds its loss's part
            _check(gt, rt.grad, dtype, "loss", msg + " temperature")

    # Several positives per query: the key groups travel with the keys; "sum" on every rank over the global
    # count of queries with a positive is the single-process mean.
    for i, (dtype, n_sizes, m_sizes) in enumerate(((torch.float64, [5] * world, [6] * world),
                                                    (torch.float32, [4, 7, 5][:world], [3, 6, 8][:world]))):
        gen = torch.Generator().manual_seed(seed + 400 + i)
        qs = [torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype) for n in n_sizes]
        ks = [torch.randn(m, D, generator=gen, dtype=torch.float64).to(dtype) for m in m_sizes]
        qgs = [torch.randint(0, 4, (n,), generator=gen) for n in n_sizes]
        kgs = [torch.randint(0, 4, (m,), generator=gen) for m in m_sizes]
        qgs[0][0] = 9  # a query without positives anywhere
        msg = f"info_nce groups run {i} {dtype} rank {rank}/{world}"
        q, k = qs[rank].detach().requires_grad_(), ks[rank].detach().requires_grad_()
        temp = torch.tensor(0.1, dtype=q.dtype if dtype == torch.float64 else torch.float32, requires_grad=True)
        loss = fld.info_nce(q, k, query_groups=qgs[rank], key_groups=kgs[rank], temperature=temp, reduction="sum",
                            batch_sizes=list(zip(n_sizes, m_sizes)) if i else None)
        kept = sum(int((g[:, None] == torch.cat(kgs)[None, :]).any(1).sum()) for g in qgs)
        part = loss / kept
        part.backward()
        summed = part.detach().clone()
        dist.all_reduce(summed)
        rq, rk = torch.cat(qs).double().requires_grad_(), torch.cat(ks).double().requires_grad_()
        rt = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        expected = reference.info_nce(rq, rk, query_groups=torch.cat(qgs), key_groups=torch.cat(kgs), temperature=rt)
        expected.backward()
        q_lo, k_lo = sum(n_sizes[:rank]), sum(m_sizes[:rank])
        _check(summed, expected, dtype, "loss", msg)
        _check(q.grad, rq.grad[q_lo:q_lo + n_sizes[rank]], dtype, "grad", msg + " query")
        _check(k.grad, rk.grad[k_lo:k_lo + m_sizes[rank]], dtype, "grad", msg + " key")
        gt = temp.grad.clone()
        dist.all_reduce(gt)
        _check(gt, rt.grad, dtype, "loss", msg + " temperature")

    # Under DDP each rank backpropagates its loss itself: its gradients are world_size times its rows of
    # the single-process ones (DDP's average over ranks then gives those exactly), for query and key alike.
    gen = torch.Generator().manual_seed(seed + 300)
    qs = [torch.randn(6, D, generator=gen, dtype=torch.float64) for _ in range(world)]
    ks = [torch.randn(6, D, generator=gen, dtype=torch.float64) for _ in range(world)]
    q, k = qs[rank].clone().requires_grad_(), ks[rank].clone().requires_grad_()
    fld.info_nce(q, k, symmetric=True).backward()
    rq, rk = torch.cat(qs).requires_grad_(), torch.cat(ks).requires_grad_()
    reference.info_nce(rq, rk, symmetric=True).backward()
    _check(q.grad, world * rq.grad[6 * rank:6 * rank + 6], torch.float64, "grad", "DDP query")
    _check(k.grad, world * rk.grad[6 * rank:6 * rank + 6], torch.float64, "grad", "DDP key")


def case_siglip(rank, world, seed):
    """fusedloss.distributed.siglip_loss: the keys gathered with gradient, positives offset by rank."""
    D = 8
    uneven = [4, 7, 5][:world]
    runs = [(torch.float64, "cpu", [5] * world, None, True), (torch.float32, "cpu", [5] * world, None, False),
            (torch.float64, "reference", [5] * world, None, True),
            (torch.float64, "cpu", uneven, [m + 3 for m in uneven], True)]  # extra keys, labels, "sum"
    for i, (dtype, backend, n_sizes, m_sizes, learnable) in enumerate(runs):
        m_sizes = m_sizes or n_sizes
        gen = torch.Generator().manual_seed(seed + 500 + i)
        qs = [torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype) for n in n_sizes]
        ks = [torch.randn(m, D, generator=gen, dtype=torch.float64).to(dtype) for m in m_sizes]
        custom = m_sizes != n_sizes
        labels = [torch.randint(m, (n,), generator=gen) for n, m in zip(n_sizes, m_sizes)] if custom else None
        msg = f"siglip run {i} {dtype} {backend} rank {rank}/{world}"
        reduction = "mean" if len(set(n_sizes)) == 1 else "sum"
        q, k = qs[rank].detach().requires_grad_(), ks[rank].detach().requires_grad_()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        t = torch.tensor(10.0, dtype=acc, requires_grad=True) if learnable else 10.0
        b = torch.tensor(-10.0, dtype=acc, requires_grad=True) if learnable else -10.0
        loss = fld.siglip_loss(q, k, temperature=t, bias=b, labels=labels[rank] if custom else None,
                               reduction=reduction, batch_sizes=list(zip(n_sizes, m_sizes)) if i % 2 else None,
                               backend=backend)
        part = loss / world if reduction == "mean" else loss / sum(n_sizes)
        part.backward()
        summed = part.detach().clone()
        dist.all_reduce(summed)
        rq, rk = torch.cat(qs).double().requires_grad_(), torch.cat(ks).double().requires_grad_()
        rt = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        rb = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
        offsets = [sum(m_sizes[:r]) for r in range(world)]
        all_labels = torch.cat([lab + off for lab, off in zip(labels, offsets)]) if custom else None
        expected = reference.siglip_loss(rq, rk, temperature=rt, bias=rb, labels=all_labels)
        expected.backward()
        q_lo, k_lo = sum(n_sizes[:rank]), offsets[rank]
        _check(summed, expected, dtype, "loss", msg)
        _check(q.grad, rq.grad[q_lo:q_lo + n_sizes[rank]], dtype, "grad", msg + " query")
        _check(k.grad, rk.grad[k_lo:k_lo + m_sizes[rank]], dtype, "grad", msg + " key")
        if learnable:
            for leaf, ref, what in ((t, rt, "temperature"), (b, rb, "bias")):
                g = leaf.grad.clone()
                dist.all_reduce(g)  # each rank holds its loss's part
                _check(g, ref.grad, dtype, "loss", msg + " " + what)


def case_example_script(rank, world, seed):
    """The README's example, run in this process group (test_example_with_torchrun runs it with torchrun)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import distributed_example

    distributed_example.run(torch.device("cpu"))


CASES = [case_vocab_parallel_ce, case_vocab_parallel_ce_variants, case_vocab_parallel_linear_ce, case_token_weight,
         case_info_nce, case_siglip, case_example_script]


def _worker(rank: int, world: int, init_file: str, seed: int) -> None:
    torch.set_num_threads(1)  # ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in CASES:
            case(rank, world, seed)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world: int, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("forkserver")
    # The server imports torch and fusedloss once; every rank of every launch is a fork of it.
    ctx.set_forkserver_preload(["torch", "fusedloss", "conftest", __name__])
    procs = mp.start_processes(_worker, args=(world, str(tmp_path / f"rendezvous-{world}"), SEED), nprocs=world,
                               join=False, start_method="forkserver")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank launch did not finish within {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in procs.processes:  # the ranks this test started, and only those
            if p.is_alive():
                p.kill()
                p.join(5)


@gloo
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_losses(world, tmp_path):
    _launch(world, tmp_path)


def test_no_process_group_raises():
    assert not dist.is_initialized()
    x = torch.randn(3, 4)
    t = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fld.vocab_parallel_cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fld.vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4), t)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fld.info_nce(x, x)
    assert fusedloss.distributed is fld


@gloo
@pytest.mark.slow  # torchrun and two fresh Pythons: about 30 s here; the example's code also runs in the launches
def test_example_with_torchrun():
    """The README's command, as a user runs it."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "examples" / "distributed_example.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun passes it on to its workers (each in its own session), SIGKILL would not.
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{out}")
    assert proc.returncode == 0, out
    assert "all checks passed" in out
