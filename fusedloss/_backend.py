"""Which backend runs an op: the request, FUSEDLOSS_BACKEND, the device and what is built.

Never falls back silently: a backend that was asked for and cannot run raises a RuntimeError that
says why. Public as ``fusedloss.backends``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "FUSEDLOSS_BACKEND"

try:  # loading the shared object runs its TORCH_LIBRARY registrations
    from fusedloss import _C  # noqa: F401

    _EXT_ERROR: str | None = None
except ImportError as exc:  # a source checkout that was never built, or an ABI mismatch
    _C = None
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


# Facts that cannot change while the process runs, read once at import: the ops resolve their
# backend on every call, also inside torch.compile, whose tracer cannot step into the dispatcher
# query or importlib (fullgraph=True would fail on them).
_CUDA_BUILT = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("fusedloss::cross_entropy_fwd", "CUDA")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def cuda_built() -> bool:
    """True when fusedloss._C holds CUDA kernels (it was compiled with nvcc)."""
    return _CUDA_BUILT


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpret() -> bool:
    """Triton's CPU interpreter, which must be chosen before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def why_unavailable(backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run on ``device`` now, else the reason it cannot."""
    device = _as_device(device)
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        if _C is None:
            return f"the compiled extension fusedloss._C did not load ({_EXT_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if _C is None:
            return f"the compiled extension fusedloss._C did not load ({_EXT_ERROR})"
        if not cuda_built():
            return ("fusedloss was built without CUDA kernels (no nvcc at build time, or FUSEDLOSS_CUDA=0); "
                    "rebuild with CUDA_HOME pointing at a CUDA toolkit")
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpret():
                if torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
                    return (f"triton on CPU tensors (TRITON_INTERPRET=1) needs torch 2.13 or later: torch "
                            f"{torch.__version__}'s torch.library.wrap_triton refuses the interpreter's kernels")
                return None
            return "triton runs on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        return f"triton does not run on {device.type} tensors"
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def available(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device`` now, fastest first (Triton on CPU is its slow interpreter)."""
    device = _as_device(device)
    order = ("cpu", "triton", "reference") if device.type == "cpu" else BACKENDS
    return [b for b in order if why_unavailable(b, device) is None]


_RESOLVED: dict = {}


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend an op runs on input on ``device``, given the user's request.

    What can run where does not change while the process runs (see the module's facts above), so each
    (request, FUSEDLOSS_BACKEND, device type, extension loaded) is decided once; errors are not cached."""
    key = (backend, os.environ.get(ENV_VAR), device.type, _C is None)
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(backend, device)
        _RESOLVED[key] = name
    return name


# FUSEDLOSS_BACKEND is read on every call (a test or a user may set it while the process runs), but
# os.environ.get costs ~1.5 us (key encoding, a KeyError when unset): the mapping under os.environ
# is read directly where CPython has one, with the encoded key, which is the same lookup.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None else None
except AttributeError:  # not CPython's _Environ
    _ENV_DATA = _ENV_KEY = None


def resolve_for(backend: str | None, tensor: torch.Tensor) -> str:
    """``resolve(backend, tensor.device)``, cheaper per call: CPU and CUDA tensors are told apart by
    ``is_cpu``/``is_cuda`` (building ``tensor.device.type`` costs as much as the rest of the lookup),
    other devices take ``resolve``. Inside torch.compile, ``resolve`` (the tracer knows os.environ)."""
    if _ENV_DATA is None or torch.compiler.is_compiling():
        return resolve(backend, tensor.device)
    if tensor.is_cpu:
        kind = "cpu"
    elif tensor.is_cuda:
        kind = "cuda"
    else:
        return resolve(backend, tensor.device)
    env = _ENV_DATA.get(_ENV_KEY)
    key = (backend, env, kind, _C is None)
    name = _RESOLVED.get(key)  # a set env value is bytes here, str in resolve's keys; unset, both mean the same
    if name is None:
        name = resolve(backend, tensor.device)
        _RESOLVED[key] = name
    return name


def _resolve(backend: str | None, device: torch.device) -> str:
    requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if requested is None:
        if device.type == "cuda":
            candidates = ("cuda", "triton")
        elif device.type == "cpu":
            candidates = ("cpu",)
        else:
            raise RuntimeError(f"fusedloss has no kernels for {device.type} tensors; pass backend='reference'")
        reasons = []
        for name in candidates:
            reason = why_unavailable(name, device)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
        raise RuntimeError(f"fusedloss: no backend can run on {device} ({'; '.join(reasons)}). "
                           "Pass backend='reference' to run the pure-PyTorch losses.")
    if requested not in BACKENDS:
        origin = f"{ENV_VAR}={requested!r}" if backend is None else f"backend={requested!r}"
        raise ValueError(f"fusedloss: {origin} is not a backend; choose one of {BACKENDS}")
    reason = why_unavailable(requested, device)
    if reason is not None:
        origin = f" (from {ENV_VAR})" if backend is None else ""
        raise RuntimeError(f"fusedloss: backend {requested!r}{origin} cannot run: {reason}")
    return requested


def info() -> dict:
    """Build and backend report: versions, build flags and what can run where."""
    from fusedloss import __version__

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "fusedloss": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "extension": "loaded" if _C is not None else f"not loaded ({_EXT_ERROR})",
        "extension_path": getattr(_C, "__file__", None),
        "cuda_kernels_built": cuda_built(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": _triton_version(),
        "triton_interpret": triton_interpret(),
        "cpu_threads": torch.get_num_threads(),
        "default_backend_override": os.environ.get(ENV_VAR),
        "backends": {d: available(d) for d in devices},
    }
    report.update(_build_report())
    return report


def _build_report() -> dict:
    """What the loaded extension was compiled for (read from its binary, see _buildinfo), and the
    GPU's architecture: a GPU whose architecture has no SASS (nor older PTX) cannot run the kernels."""
    from fusedloss import _buildinfo

    built = _buildinfo.read(_C.__file__) if _C is not None and getattr(_C, "__file__", None) else {}
    archs = built.get("cuda_archs")
    out = {
        "cuda_archs": _buildinfo.format_archs(archs) if cuda_built() else None,
        "cpu_vector_isa": built.get("cpu_vector_isa"),
        "gpu_arch": None,
        "gpu_arch_supported": None,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        sm = major * 10 + minor
        out["gpu_arch"] = f"sm_{sm}"
        if cuda_built() and archs:
            # SASS runs on its own major version at an equal or higher minor; PTX is JIT-compiled for any newer GPU
            out["gpu_arch_supported"] = (any(a // 10 == major and a <= sm for a in archs["sass"])
                                         or any(a <= sm for a in archs["ptx"]))
    return out


def _triton_version() -> str | None:
    if not triton_installed():
        return None
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, do not fail, in a diagnostic
        return f"import failed: {exc}"
