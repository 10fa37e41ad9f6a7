"""Every Triton kernel compiles for an H100/H200 (sm_90): the interpreter that runs them here compiles
nothing (tests/triton_aot.py says what it checks and how). A child process, since the suite runs under
TRITON_INTERPRET=1 and the compiler must not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent



def _nvidia_tools() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


pytestmark = pytest.mark.skipif(not _nvidia_tools(), reason="needs triton's NVIDIA backend (ptxas, cuobjdump)")


def _compile(tmp_path, *args) -> list[dict]:
    report = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(TESTS / "triton_aot.py"), "--arch", "90", *args, "--json", str(report)],
                          env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())["rows"]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    rows = _compile(tmp_path, "--quick")
    kernels = {r["kernel"] for r in rows}
    # every kernel module's launches were reached (a case that stops early would skip its kernels)
    for name in ("_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel", "_focal_loss_fwd_kernel",
                 "_soft_cross_entropy_fwd_kernel", "_soft_cross_entropy_bwd_kernel", "_gap_loss_fwd_kernel",
                 "_gap_loss_bwd_kernel", "_info_nce_lse_kernel", "_info_nce_grad_kernel", "_siglip_fwd_kernel",
                 "_siglip_grad_kernel", "_kl_div_fwd_kernel", "_kl_div_bwd_kernel", "_lce_fwd_kernel",
                 "_lce_fwd_merge_kernel", "_lce_bwd_dx_kernel", "_lce_bwd_dw_kernel", "_reduce_rows_kernel",
                 "_row_norm_kernel"):
        assert name in kernels, f"{name} was never compiled"
    # the GPU's operand paths, not the interpreter's widened ones
    lce = [r for r in rows if r["kernel"] == "_lce_fwd_kernel"]
    assert {r["constexprs"]["DOT_DTYPE"] for r in lce} == {"fp32", "bf16", "fp16"}
    assert {r["constexprs"]["INPUT_PRECISION"] for r in lce} == {"ieee", "tf32"}
    assert all(r["constexprs"]["INTERPRETED"] == "False" for r in rows if "INTERPRETED" in r["constexprs"])
    # info_nce's and siglip_loss's 16-bit rows reach their kernels as they are (tensor-core products),
    # normalized inside
    for kernel in ("_info_nce_lse_kernel", "_info_nce_grad_kernel", "_siglip_fwd_kernel", "_siglip_grad_kernel"):
        assert any(r["kernel"] == kernel and r["constexprs"].get("NORMED") == "True" for r in rows), kernel
        # their float32 products follow torch's TF32 switch (the float32-tf32 pass), as torch's matmul does
        fp32 = {r["constexprs"]["FP32_PRECISION"] for r in rows if r["kernel"] == kernel and r["input"] == "fp32"}
        assert fp32 == {"ieee", "tf32"}, (kernel, fp32)


@pytest.mark.slow
def test_every_linear_cross_entropy_config_compiles_for_sm90(tmp_path):
    """Every autotune config of the fused linear cross-entropy, for each kind of operand: a config that
    does not fit fails to launch on the GPU, where the autotuner would skip it unnoticed."""
    from fusedloss.triton import linear_cross_entropy as lce

    rows = _compile(tmp_path, "--plain", "--all-configs", "--ops", "linear_cross_entropy")
    for kernel, sets in (("_lce_fwd_kernel", lce._FWD_CONFIGS), ("_lce_bwd_dx_kernel", lce._BWD_CONFIGS),
                         ("_lce_bwd_dw_kernel", lce._BWD_CONFIGS)):
        compiled = [r for r in rows if r["kernel"] == kernel]
        # fp32 and fp32-tf32 run the ieee and tf32 sets, bf16 and fp16 the 16-bit set each
        expected = len(sets["ieee"]) + len(sets["tf32"]) + 2 * len(sets["16bit"])
        assert len(compiled) == expected, (kernel, len(compiled), expected)
