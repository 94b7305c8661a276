"""benchmarks/gpu_check.py runs end to end in its CPU smoke mode, so that a rare GPU loan
is not spent on a broken script; the figures themselves need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
           "--smoke", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert abs(result["correctness"]["linear_cka_cuda_minus_cpu"]) < 1e-9
    on_device, on_cpu = result["correctness"]["lbfgs_loss_gpu_vs_cpu"]  # here: both the CPU
    assert on_device == pytest.approx(on_cpu, rel=1e-5)
    kinds = {(r["amp_bf16"], r["channels_last"]) for r in result["speed"]}
    assert kinds == {(False, False), (True, False), (False, True)}
    assert all(r["iterations_per_s"] > 0 for r in result["speed"])
    sched = result["schedules"]
    for schedule in ("paper", "converge"):
        assert sched[schedule]["passes"] > 0 and sched[schedule]["seconds"] > 0
    # the paper's schedule spends exactly cap + 1 evaluations per pair
    assert sched["paper"]["passes"] == sched["pairs"] * (sched["cap"] + 1)
    assert 0 < sched["passes_ratio"] <= 1.0
