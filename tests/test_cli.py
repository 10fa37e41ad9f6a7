"""The command line runs as documented (in a child process, as a user would run it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedloss import _demo

ROOT = Path(__file__).resolve().parent.parent

# demo sizes that take seconds: the same code path as the defaults, smaller numbers
TINY_DEMO = ["--vocab-size", "512", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
             "--batch-size", "4", "--no-progress"]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("FUSEDLOSS_BACKEND", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fusedloss", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _log(out: subprocess.CompletedProcess) -> str:
    return out.stdout[-3000:] + out.stderr[-3000:]


def test_info_json():
    out = run_cli("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["extension"] == "loaded" and "cpu" in report["backends"]["cpu"]
    assert report["cpu_vector_isa"] in ("AVX2", "AVX512", "DEFAULT", None)
    if report["cuda_kernels_built"]:
        assert report["cuda_archs"] and report["cuda_archs"] != "unknown"


def test_info_prints_versions_build_and_backends():
    out = run_cli("info")
    assert out.returncode == 0, _log(out)
    text = out.stdout
    for field in ("python", "torch", "triton", "CUDA runtime", "CUDA kernels", "CPU kernels", "CUDA device",
                  "backends (fastest first):", "cpu: cpu"):
        assert field in text, f"{field!r} missing from `fusedloss info`:\n{text}"
    assert torch.__version__ in text


def test_check_passes_on_the_cpu_backend():
    out = run_cli("check", "--device", "cpu", "--backend", "cpu", "--quiet", "--no-progress")
    assert out.returncode == 0, _log(out)
    assert "check: PASS" in out.stdout
    for op in ("cross_entropy", "gap_loss", "info_nce", "linear_cross_entropy"):
        assert f"{op} cpu@cpu" in out.stdout, f"{op} not checked:\n{out.stdout[-2000:]}"


def test_check_one_op():
    out = run_cli("check", "--device", "cpu", "--backend", "cpu", "--ops", "gap_loss", "--dtype", "float32",
                  "--no-progress", "--seed", "5")
    assert out.returncode == 0, _log(out)
    assert "ops gap_loss;" in out.stdout and "seed 5" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("cpu ")]
    assert rows and all(" gap_loss " in r and r.rstrip().endswith("PASS") for r in rows)


def test_check_exits_1_on_a_mismatch():
    # --inject-error perturbs the op's outputs by 1% before the comparison (a hidden testing option)
    out = run_cli("check", "--device", "cpu", "--backend", "cpu", "--ops", "gap_loss", "--dtype", "float32",
                  "--inject-error", "gap_loss", "--quiet", "--no-progress")
    assert out.returncode == 1, _log(out)
    assert "check: FAIL" in out.stdout and "output out of tolerance" in out.stdout


def test_check_compares_an_overflowing_16bit_gradient_with_inf():
    """A float64 reference beyond float16's range is compared as its rounding, inf (what a correct kernel
    writes); a finite value there still fails, and the scale comes from the representable elements."""
    from fusedloss import _selfcheck

    ref = torch.tensor([-66214.0, 3.0, -1.5], dtype=torch.float64)
    expected = _selfcheck._in_range(ref, torch.float16)
    assert expected[0] == float("-inf") and torch.equal(expected[1:], ref[1:])
    kernel = ref.to(torch.float16)
    assert _selfcheck._max_err(kernel, expected, 2**-10, 1e-6)[1]
    assert not _selfcheck._max_err(torch.tensor([-65504.0, 3.0, -1.5]), expected, 2**-10, 1e-6)[1]
    assert torch.equal(_selfcheck._in_range(ref, torch.float32), ref)


@pytest.mark.parametrize("args", [["--backend", "nope"], ["--ops", "nope"], ["--dtype", "float8"]])
def test_check_rejects_unknown_names(args):
    out = run_cli("check", "--device", "cpu", *args)
    assert out.returncode == 2 and "error:" in out.stderr


@pytest.mark.slow
def test_bench_quick_writes_a_csv_and_a_png(tmp_path):
    out = run_cli("bench", "--quick", "--ops", "gap_loss", "--device", "cpu", "--modes", "fwd+bwd", "--out",
                  str(tmp_path))
    assert out.returncode == 0, _log(out)
    csvs = list(tmp_path.glob("gap_loss-cpu-*.csv"))
    assert csvs and "fusedloss-cpu" in csvs[0].read_text()
    pngs = list(tmp_path.glob("gap_loss-cpu-*.png"))
    assert pngs and pngs[0].stat().st_size > 1000


def test_demo_runs_and_both_curves_agree(tmp_path):
    cache = tmp_path / "cache"
    out = run_cli("demo", "--steps", "5", *TINY_DEMO, "--out", str(tmp_path / "out"), timeout=240,
                  env={"XDG_CACHE_HOME": str(cache)})
    assert out.returncode == 0, _log(out)
    assert "demo: PASS" in out.stdout and "within tolerance" in out.stdout
    for header in ("steps/s", "tokens/s", "peak step memory", "final loss", "fusedloss.linear_cross_entropy"):
        assert header in out.stdout
    with open(tmp_path / "out" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(5))
    for r in rows:
        a, b = float(r["loss_torch"]), float(r["loss_fusedloss"])
        assert abs(a - b) <= 1e-4 * abs(a), r  # same weights and batches: fp32 rounding only
    assert float(rows[-1]["loss_torch"]) < float(rows[0]["loss_torch"])  # it trains
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000
    assert list((cache / "fusedloss").glob("stdlib-py*-v512-*.pt")), "the token cache was not written"


def test_demo_rejects_bad_sizes(tmp_path):
    out = run_cli("demo", "--d-model", "30", "--heads", "4", "--out", str(tmp_path))
    assert out.returncode == 2 and "--heads" in out.stderr


def test_corpus_cache_survives_an_unwritable_or_corrupt_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "sub"))  # mkdir fails: no cache, no error
    notes = []
    ids, vocab, meta = _demo.load_corpus(300, log=notes.append)
    assert len(vocab) == 300 and vocab[0] == _demo.UNK and ids.numel() > 100_000
    assert meta["cache"] is None and any("cannot write" in n for n in notes)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ids2, vocab2, meta2 = _demo.load_corpus(300, log=notes.append)
    assert not meta2["cached"] and torch.equal(ids, ids2) and vocab == vocab2  # deterministic
    Path(meta2["cache"]).write_bytes(b"garbage")
    notes.clear()
    ids3, _, meta3 = _demo.load_corpus(300, log=notes.append)
    assert not meta3["cached"] and torch.equal(ids, ids3) and any("rebuilding" in n for n in notes)
    _, _, meta4 = _demo.load_corpus(300, log=notes.append)
    assert meta4["cached"]
