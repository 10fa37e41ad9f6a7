"""Shared test parameters: backends x devices, the per-dtype tolerance table, seeds, comparison helpers.

Every kernel backend is compared with fusedloss.reference evaluated in float64 on the same (rounded)
inputs. Inputs are fresh each session: the seed is printed in the header; set FUSEDLOSS_TEST_SEED
to replay a failure.
"""

from __future__ import annotations

import os
import random
import tempfile
import zlib

# torch.compile's on-disk caches (/tmp/torchinductor_$USER) outlive a run, and their keys do not cover a
# custom op's schema: a graph compiled against an earlier version of an op was replayed with the old
# arguments (CI, 2026-12-02). Each test session compiles into its own fresh directory.
# Processes forked for the distributed tests import this file again and share the parent's directory.
if "FUSEDLOSS_TEST_INDUCTOR_DIR" not in os.environ:
    os.environ["FUSEDLOSS_TEST_INDUCTOR_DIR"] = tempfile.mkdtemp(prefix="fusedloss-inductor-")
    _OWN_INDUCTOR_DIR = True
else:
    _OWN_INDUCTOR_DIR = False
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["FUSEDLOSS_TEST_INDUCTOR_DIR"]

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402

import fusedloss
from fusedloss import _memory, _selfcheck

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
# The Makefile names the backends that must run here, so that a missing build or a missing
# TRITON_INTERPRET fails the suite instead of skipping silently.
REQUIRED = {b for b in os.environ.get("FUSEDLOSS_REQUIRE_BACKENDS", "").split(",") if b}
SEED = int(os.environ.get("FUSEDLOSS_TEST_SEED", random.randrange(2**31)))


def pytest_unconfigure(config):
    import shutil

    if _OWN_INDUCTOR_DIR:
        shutil.rmtree(os.environ["FUSEDLOSS_TEST_INDUCTOR_DIR"], ignore_errors=True)


def pytest_report_header(config):
    return [f"fusedloss seed: FUSEDLOSS_TEST_SEED={SEED}", f"fusedloss backends: {fusedloss.info()['backends']}"]


def backend_params(backends=KERNEL_BACKENDS):
    """(backend, device) pairs for every kernel backend on every device it can target."""
    params = []
    # Only the devices this machine has (or that FUSEDLOSS_REQUIRE_BACKENDS requires, so that a missing
    # GPU fails there): thousands of CUDA cases skipped one by one on a CPU machine report nothing.
    for device in ("cpu", "cuda") if torch.cuda.is_available() or "cuda" in REQUIRED else ("cpu",):
        for backend in backends:
            if backend == "cpu" and device != "cpu" or backend == "cuda" and device != "cuda":
                continue
            params.append(pytest.param(backend, device, id=f"{backend}-{device}"))
    return params


def with_reference(devices=None):
    """backend_params() plus the "reference" backend on each of ``devices`` (default: those present)."""
    return backend_params() + [pytest.param("reference", d, id=f"reference-{d}")
                               for d in (DEVICES if devices is None else devices)]


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU tensors: the interpreter runs each program in Python (~30 ms a program, whatever
    its size), so these tests use few rows; the GPU run (bench/gpu_check.sh) covers many rows."""
    return backend == "triton" and device == "cpu"


def rows(backend: str, device: str, n: int) -> int:
    return min(n, 9) if interpreted(backend, device) else n


def require_backend(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        if "cuda" in REQUIRED:
            pytest.fail("backend cuda is required here (FUSEDLOSS_REQUIRE_BACKENDS) but there is no CUDA device")
        pytest.skip("no CUDA device")
    reason = fusedloss.backends.why_unavailable(backend, device)
    if reason is None:
        return
    if backend in REQUIRED:
        pytest.fail(f"backend {backend} is required here (FUSEDLOSS_REQUIRE_BACKENDS) but unavailable: {reason}")
    pytest.skip(reason)


def torch_loss_shape(x, t, reduction: str) -> torch.Size:
    """The shape of F.cross_entropy(x, t, reduction=reduction); the test is skipped where this torch
    refuses the input form (torch 2.6 has no (C,) input with a (1,) target)."""
    try:
        return torch.nn.functional.cross_entropy(x, t, reduction=reduction).shape
    except RuntimeError as e:
        pytest.skip(f"torch {torch.__version__}'s F.cross_entropy refuses input {tuple(x.shape)} with target "
                    f"{tuple(t.shape)}: {e}")


@pytest.fixture(autouse=True)
def seeded(request):
    """A fresh but replayable seed per test: the session seed mixed with the test's id."""
    seed = (SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    return seed


# (rtol, atol) per dtype for the loss and for the gradient, against the float64 reference on the
# same inputs. The loss is accumulated and returned in float32 for every low-precision dtype; the
# gradient is rounded to the input dtype, so its rtol is that dtype's rounding (half an ulp, 2x
# margin), and atol covers float16's subnormals. atol for the gradient is relative to max|grad|.
TOL = {
    torch.float64: {"loss": (1e-12, 1e-12), "grad": (1e-10, 1e-12)},
    torch.float32: {"loss": (2e-5, 1e-5), "grad": (2e-5, 1e-6)},
    torch.bfloat16: {"loss": (2e-5, 1e-5), "grad": (2**-8, 1e-6)},
    torch.float16: {"loss": (2e-5, 1e-5), "grad": (2**-10, 1e-6)},
}
FP16_SUBNORMAL_ATOL = 2**-25  # half of float16's smallest subnormal step


def assert_close(actual, expected, dtype, kind, msg="", scale=None):
    """Elementwise |a - e| <= rtol |e| + atol (scaled by max|e| for gradients); NaNs must match.

    ``scale`` overrides max|e| for a gradient that is a difference of larger terms (it is then the
    largest term's size: the float rounding of the terms is what a correct kernel may be off by)."""
    rtol, atol = TOL[dtype][kind]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{msg} shape {tuple(a.shape)} != {tuple(e.shape)}"
    if kind == "grad" and dtype in (torch.float16, torch.bfloat16):
        # A gradient beyond the dtype's range is inf in that dtype (what a correct kernel writes), and
        # the scale of the tolerance is set by the representable ones.
        in_range = _selfcheck._in_range(e, dtype)
        if (torch.isinf(in_range) & torch.isfinite(e)).any():
            e = in_range
            if scale is None:
                finite = e[torch.isfinite(e)]
                scale = finite.abs().max().item() if finite.numel() else 1.0
    if kind == "grad" and scale is None:
        scale = e.abs().max().item() if e.numel() and torch.isfinite(e).all() else 1.0
    if kind == "grad":
        atol = atol * scale + (FP16_SUBNORMAL_ATOL if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{msg} [{dtype}] {m}")


def poison_cpu_allocator(nbytes: int = 0) -> None:
    """Until the end of the test, every new CPU tensor starts filled with NaN (integers with their
    largest value), so that an output element a kernel forgets to write shows, whatever its size.

    torch.utils.deterministic.fill_uninitialized_memory under use_deterministic_algorithms fills in
    ATen's CPU and CUDA empty kernels, which the extension's at::empty reaches through the dispatcher
    as Python's torch.empty does. ``nbytes`` is kept for the callers; the old
    approach (NaN left in freed memory) only covered buffers small enough for the allocator to reuse.
    warn_only: an op without a deterministic implementation warns instead of failing the test."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.utils.deterministic.fill_uninitialized_memory = state[2]


def assert_16bit_rows_make_no_float32_copies(loss):
    """``loss(query, key, backend)`` forward + backward on bf16 rows (N = M = 64, D = 128: no chunked
    accumulator) on the triton backend holds the bf16 gradients and O(N + M) floats beyond the inputs.
    The cpu backend's float32 copies, normalized, show in the same measure, so the check can fail."""
    require_backend("triton", "cpu")
    require_backend("cpu", "cpu")
    N = M = 64
    D = 128
    q0, k0 = torch.randn(N, D).bfloat16(), torch.randn(M, D).bfloat16()
    grad_bytes, copy_bytes = (N + M) * D * 2, (N + M) * D * 4

    def step(backend):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        return lambda: loss(q, k, backend).backward()

    ours = _memory.cpu_peak(step("triton"))
    upcast = _memory.cpu_peak(step("cpu"))
    if ours is None or upcast is None:
        pytest.skip("the profiler's memory events are unavailable")
    assert upcast >= 2 * copy_bytes, f"the measure misses the float32 copies: {upcast} bytes"
    assert ours <= grad_bytes + 64 * (N + M) * 4, f"triton bf16 fwd+bwd peak {ours} bytes"
