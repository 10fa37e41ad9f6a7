"""The command line runs as documented (in a child process, as a user would run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FUSEDLOSS_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "fusedloss", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info_json():
    out = run_cli("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["extension"] == "loaded" and "cpu" in report["backends"]["cpu"]


def test_check_passes_on_the_cpu_backend():
    out = run_cli("check", "--device", "cpu", "--backend", "cpu", "--quiet")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "check: PASS" in out.stdout


def test_check_rejects_an_unknown_backend():
    out = run_cli("check", "--device", "cpu", "--backend", "nope")
    assert out.returncode != 0


@pytest.mark.slow
def test_bench_quick_writes_a_csv(tmp_path):
    out = run_cli("bench", "--quick", "--ops", "gap_loss", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    csvs = list(tmp_path.glob("gap_loss-cpu-*.csv"))
    assert csvs and "fusedloss-cpu" in csvs[0].read_text()
