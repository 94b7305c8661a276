"""The measure panel's cost (not a test). Writes benchmarks/results/measures.json.

- One pass, every moment-based measure: an 8-model matrix at n=10,000, width 512
  (float32 activations in batches of 1,000), all streaming measures (linear and debiased
  CKA, Procrustes, mean CCA, SVCCA, PWCCA, regression R² both ways) against linear CKA
  alone from the same kind of pass. Goal: at most 1.3x. Also each measure's own time
  after the pass, and the floor its float64 eigendecompositions set (``floor_ratio``).
- Mutual kNN and RBF CKA at n=10,000 (width 512), blockwise: peak memory of a fresh
  process above its baseline after imports, the two (n, 512) inputs included. Goal:
  within 1 GB (one n x n float64 matrix alone is 763 MB).

    python benchmarks/bench_measures.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "measures.json"
N, WIDTH, MODELS, BATCH = 10_000, 512, 8, 1_000

PEAK_CHILD = f"""
import sys
import torch
from invsim.similarity import measure

def hwm():  # peak resident memory (kB) since the last reset
    lines = open("/proc/self/status").read().splitlines()
    return int(next(x for x in lines if x.startswith("VmHWM")).split()[1])

def rss():
    lines = open("/proc/self/status").read().splitlines()
    return int(next(x for x in lines if x.startswith("VmRSS")).split()[1])

base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
g = torch.Generator().manual_seed(0)
x = torch.randn({N}, {WIDTH}, generator=g)
y = x @ torch.randn({WIDTH}, {WIDTH}, generator=g) / 20 + torch.randn({N}, {WIDTH}, generator=g)
name, options = sys.argv[1], eval(sys.argv[2])
value = measure(name, x, y, **options)
print(value, (hwm() - base) / 1024)
"""


def representations():
    import torch

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(N, 64, generator=g)
    return {
        f"m{i}": (shared @ torch.randn(64, WIDTH, generator=g) + torch.randn(N, WIDTH, generator=g))
        for i in range(MODELS)
    }


def one_pass(reps, measures):
    from invsim.similarity import StreamingPanel

    t0 = time.perf_counter()
    acc = StreamingPanel(list(reps))
    for start in range(0, N, BATCH):
        acc.update({k: v[start : start + BATCH] for k, v in reps.items()})
    acc.compute(measures)
    return time.perf_counter() - t0


def breakdown(reps, streaming) -> dict:
    """Seconds of each measure's own work after the shared pass, and the floor the
    decompositions set: per unordered pair of views, the singular values of the
    cross-covariance (Procrustes) and of the whitened one with its vectors (mean CCA,
    PWCCA) and without (SVCCA), plus one eigendecomposition per view."""
    import torch

    from invsim.similarity import StreamingPanel

    acc = StreamingPanel(list(reps))
    for start in range(0, N, BATCH):
        acc.update({k: v[start : start + BATCH] for k, v in reps.items()})
    own = {}
    for m in streaming:
        t0 = time.perf_counter()
        acc.compute([m])
        own[m] = time.perf_counter() - t0
    s = torch.randn(WIDTH, WIDTH, dtype=torch.float64)
    s = s @ s.T
    timing = {}
    for name, f in (("eigh", torch.linalg.eigh), ("eigvalsh", torch.linalg.eigvalsh)):
        f(s)
        t0 = time.perf_counter()
        for _ in range(5):
            f(s)
        timing[name] = (time.perf_counter() - t0) / 5
    pairs = MODELS * (MODELS - 1) // 2
    floor = pairs * (2 * timing["eigvalsh"] + timing["eigh"]) + MODELS * timing["eigh"]
    return {"measure_s": own, "eigh_512_s": timing["eigh"],
            "eigvalsh_512_s": timing["eigvalsh"], "decomposition_floor_s": floor}  # fmt: skip


def main() -> None:
    import torch

    from invsim.similarity import MEASURES

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    reps = representations()
    streaming = [n for n, m in MEASURES.items() if m.streams]
    cka, every = [], []
    for _ in range(3):  # interleaved, so machine noise hits both alike
        cka.append(one_pass(reps, ["linear_cka"]))
        every.append(one_pass(reps, streaming))
    parts = breakdown(reps, streaming)
    peaks = {}
    for name, options in (("mutual_knn", {"k": 10}), ("rbf_cka", {})):
        child = subprocess.run([sys.executable, "-c", PEAK_CHILD, name, repr(options)],
                               capture_output=True, text=True, check=True)  # fmt: skip
        peaks[name] = [float(v) for v in child.stdout.split()]
    value, peak_mb = peaks["mutual_knn"]
    results = {
        "moments": {
            "n": N, "width": WIDTH, "models": MODELS, "measures": streaming,
            "linear_cka_s": statistics.median(cka), "all_streaming_s": statistics.median(every),
            "ratio": statistics.median(every) / statistics.median(cka), "goal": 1.3,
            **parts,
            "floor_ratio": 1 + parts["decomposition_floor_s"] / statistics.median(cka),
        },
        "mutual_knn": {"n": N, "width": WIDTH, "k": 10, "value": value,
                       "peak_extra_mb": peak_mb, "goal_mb": 1024},
        "rbf_cka": {"n": N, "width": WIDTH, "value": peaks["rbf_cka"][0],
                    "peak_extra_mb": peaks["rbf_cka"][1], "goal_mb": 1024,
                    "n_by_n_float64_mb": N * N * 8 / 2**20},
        "machine": f"{os.cpu_count()} cores",
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
