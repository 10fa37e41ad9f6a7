"""Backend resolution as API.md defines it: defaults, FUSEDLOSS_BACKEND, clear errors, no silent fallback."""

from __future__ import annotations

import pytest
import torch

import fusedloss
from fusedloss import _backend, backends


def test_available_on_cpu_lists_cpu_and_reference():
    names = backends.available("cpu")
    assert names[0] == "cpu" and "reference" in names
    assert backends.available(torch.device("cpu")) == names
    assert ("triton" in names) == (_backend.triton_installed() and _backend.triton_interpret())


def test_default_on_cpu_is_cpu(monkeypatch):
    monkeypatch.delenv("FUSEDLOSS_BACKEND", raising=False)
    assert backends.resolve(None, torch.device("cpu")) == "cpu"


def test_environment_overrides_the_default(monkeypatch):
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "reference")
    assert backends.resolve(None, torch.device("cpu")) == "reference"
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(fusedloss.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
    # an explicit argument wins over the environment
    assert backends.resolve("cpu", torch.device("cpu")) == "cpu"


def test_environment_naming_an_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FUSEDLOSS_BACKEND"):
        fusedloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FUSEDLOSS_BACKEND='gpu'"):
        fusedloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        backends.resolve("cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        backends.resolve("cpu", torch.device("cuda"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not _backend.triton_installed():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_RESOLVED", {})  # an earlier test's resolution must not answer for this one
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"))


def test_triton_on_cpu_needs_a_torch_that_wraps_interpreted_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: True)
    monkeypatch.setattr(_backend, "_RESOLVED", {})
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert "needs torch 2.13 or later" in _backend.why_unavailable("triton", "cpu")
    assert _backend.why_unavailable("triton", "cuda") is None
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert _backend.why_unavailable("triton", "cpu") is None


@pytest.mark.parametrize("interpret", [False, True])
def test_missing_extension_is_reported_not_hidden(monkeypatch, interpret):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_EXT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: interpret)
    monkeypatch.setattr(_backend, "_RESOLVED", {})
    # without the extension the cpu backend is gone; triton on CPU stays exactly when its interpreter is on
    # (and torch can launch the interpreter's kernels: 2.13 and later)
    triton = interpret and torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)
    assert backends.available("cpu") == (["triton", "reference"] if triton else ["reference"])
    with pytest.raises(RuntimeError, match="simulated"):
        backends.resolve(None, torch.device("cpu"))


def test_no_backend_for_other_devices():
    with pytest.raises(RuntimeError, match="backend='reference'"):
        backends.resolve(None, torch.device("meta"))
    assert backends.resolve("reference", torch.device("meta")) == "reference"


def test_info_reports_build_and_backends():
    report = fusedloss.info()
    assert report["fusedloss"] == fusedloss.__version__
    assert report["extension"] == "loaded"
    assert report["backends"]["cpu"][0] == "cpu"
    assert isinstance(report["cuda_kernels_built"], bool)
