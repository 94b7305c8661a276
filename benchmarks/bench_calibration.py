"""What per-cell intervals and nulls cost (not a test). Writes
benchmarks/results/calibration.json.

An 8-model matrix on n=1,000 examples with widths 64 to 512: linear CKA alone (one pass
of moments) against the same matrix with every cell's interval (the closed-form
delete-one jackknife of debiased CKA, from float64 Gram matrices) and null, as the
pipeline runs it: the default (exact permutation moments) and, for the record, 200
Monte-Carlo permutations (``null: permutation``). Goal: at most 3x.

    python benchmarks/bench_calibration.py
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from invsim.config import CalibrationConfig
from invsim.experiment.matrices import panel
from invsim.similarity import calibration

RESULTS = Path(__file__).parent / "results" / "calibration.json"
N, WIDTHS = 1000, (64, 96, 128, 192, 256, 320, 384, 512)


def _seconds(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(N, 32, generator=g)
    reps = {
        f"m{i}": shared @ torch.randn(32, w, generator=g) + torch.randn(N, w, generator=g)
        for i, w in enumerate(WIDTHS)
    }
    plain = panel(reps, ["linear_cka"])["linear_cka"]
    cal = panel(reps, ["linear_cka"], calibration=CalibrationConfig())["linear_cka"]

    def timed(runs: int) -> tuple[float, float, float]:
        pairs = [  # interleaved, so that a busy moment on the machine hits both alike
            (
                _seconds(lambda: panel(reps, ["linear_cka"])),
                _seconds(lambda: panel(reps, ["linear_cka"], calibration=CalibrationConfig())),
            )
            for _ in range(runs)
        ]
        plain_s, cal_s = (min(t[i] for t in pairs) for i in (0, 1))
        return plain_s, cal_s, statistics.median(c / p for p, c in pairs)

    plain_s, cal_s, paired = timed(15)
    mc = CalibrationConfig(null="permutation")
    mc_s = _seconds(lambda: panel(reps, ["linear_cka"], calibration=mc))
    assert (abs(cal.values - plain.values) < 1e-10).all()
    width = cal.stats["ci_high"] - cal.stats["ci_low"]
    results = {
        "n": N, "widths": list(WIDTHS), "n_perm": 200,
        "interval": calibration.CKA_METHOD,
        "plain_s": plain_s, "calibrated_s": cal_s, "ratio": cal_s / plain_s, "goal": 3.0,
        "median_paired_ratio": paired,
        "null": "moments", "permutation_null_s": mc_s, "permutation_ratio": mc_s / plain_s,
        "timing": "best of 15 interleaved runs after a warm-up; and the median paired ratio",
        "median_interval_width": float(torch.tensor(width).median()),
        "machine": f"{os.cpu_count()} cores",
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
