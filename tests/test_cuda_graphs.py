"""Every op's forward and backward can be captured in a CUDA graph on the GPU backends (no host syncs, no
allocations the graph cannot own), and a replay on new input data gives the float64 reference's loss and gradients.
Runs only on a machine with a CUDA device (bench/gpu_check.sh runs it through `-k cuda`)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, require_backend

import fusedloss

N, C, D = 64, 1000, 32


def _inputs(op):
    g = torch.Generator(device="cuda").manual_seed(0)
    if op in ("cross_entropy", "gap_loss", "focal_loss"):
        logits = torch.randn(N, C, device="cuda", generator=g) * 3
        return [logits], torch.randint(0, C, (N,), device="cuda", generator=g)
    if op == "linear_cross_entropy":
        return ([torch.randn(N, D, device="cuda", generator=g), torch.randn(C, D, device="cuda", generator=g) * 0.2],
                torch.randint(0, C, (N,), device="cuda", generator=g))
    return [torch.randn(N, D, device="cuda", generator=g), torch.randn(N, D, device="cuda", generator=g)], None


def _call(op, backend, tensors, target):
    f = getattr(fusedloss, op)
    if op == "linear_cross_entropy":
        return f(tensors[0], tensors[1], target, backend=backend)
    if op == "info_nce":
        return f(tensors[0], tensors[1], backend=backend)
    return f(tensors[0], target, backend=backend)


def _step(op, backend, tensors, target):
    loss = _call(op, backend, tensors, target)
    return (loss, *torch.autograd.grad(loss, tensors))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", ["cross_entropy", "gap_loss", "focal_loss", "info_nce", "linear_cross_entropy"])
def test_cuda_graph_capture(op, backend):
    require_backend(backend, "cuda")
    tensors, target = _inputs(op)
    static = [t.clone().requires_grad_() for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles and caches every kernel
        for _ in range(3):
            _step(op, backend, static, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _step(op, backend, static, target)

    fresh = [torch.randn_like(t) * t.std() for t in tensors]
    with torch.no_grad():
        for s, f in zip(static, fresh):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    want = _step(op, "reference", [f.double().requires_grad_() for f in fresh], target)
    for i, (got, exp) in enumerate(zip(outputs, want)):
        assert_close(got, exp, torch.float32, "loss" if i == 0 else "grad", f"{op} {backend} output {i}")
