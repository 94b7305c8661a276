"""Coverage of the layer-by-layer intervals (grouped jackknife of debiased CKA), by
simulation where invsim runs: n from 20 to 1,000, widths up to 25x n, population CKA from
about 0.1 to 0.9, and one near-zero signal (invsim.similarity.populations: exact values).

Each draw goes through GramTiles as layer_similarity feeds it (a held block and batches);
the interval is the one layer_similarity reports (20 groups, t quantile, 95%).

    python benchmarks/bench_layer_coverage.py            # 200 draws per cell
    python benchmarks/bench_layer_coverage.py --draws 50 # quicker

Results: benchmarks/results/layer-coverage.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import t as student_t

from invsim.experiment.layers import JACKKNIFE_GROUPS
from invsim.similarity.layerwise import GramTiles
from invsim.similarity.populations import Population

OUT = Path(__file__).parent / "results" / "layer-coverage.json"
SIGNALS = {
    "none": {"shared": 0.2, "noise": 2.0},  # population CKA ~0.01: below the grid's range
    "weak": {"shared": 0.25, "noise": 0.5},
    "medium": {"shared": 0.5, "noise": 0.5},
    "high": {"shared": 0.9, "noise": 0.1},
    "strong": {"kind": "readout", "noise": 0.3},
}
GRID_N = (20, 32, 64, 256, 1000)
GRID_WIDTHS = ((84, 512), (512, 512))


def interval(x: torch.Tensor, y: torch.Tensor, groups: int, q: float) -> tuple[float, float]:
    n = len(x)
    batch = max(4, n // 4)
    acc = GramTiles(n, shifts=[x[:batch].mean(0), y[:batch].mean(0)], groups=groups)
    for i0 in range(0, n, 2 * batch):  # two batches held per pass, then the rest streamed
        held = [x[i0 : i0 + 2 * batch], y[i0 : i0 + 2 * batch]]
        for j0 in range(i0, n, batch):
            acc.update(held, i0, [x[j0 : j0 + batch], y[j0 : j0 + batch]], j0)
    est, se = acc.jackknife(debiased=True)
    return float(est[0, 1] - q * se[0, 1]), float(est[0, 1] + q * se[0, 1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--draws", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(2)
    q = float(student_t.ppf(0.975, JACKKNIFE_GROUPS - 1))
    cells, started = [], time.perf_counter()
    for widths in GRID_WIDTHS:
        for signal, kw in SIGNALS.items():
            pop = Population(widths=widths, rng_seed=0, **kw)
            for n in GRID_N:
                gen = torch.Generator().manual_seed(n)
                hits, width = 0, 0.0
                for _ in range(args.draws):
                    x, y = (v.double() for v in pop.draw(n, gen))
                    lo, hi = interval(x, y, JACKKNIFE_GROUPS, q)
                    hits += lo <= pop.cka <= hi
                    width += hi - lo
                cell = {"n": n, "widths": list(widths), "signal": signal, "population_cka":
                        pop.cka, "coverage": hits / args.draws, "mean_width": width / args.draws,
                        "draws": args.draws}  # fmt: skip
                cells.append(cell)
                print(f"n={n:5d} widths={widths} {signal:6s} cka={pop.cka:.3f} "
                      f"coverage={cell['coverage']:.3f} width={cell['mean_width']:.3f}",
                      flush=True)  # fmt: skip
    graded = [c for c in cells if c["signal"] != "none"]  # population CKA 0.1 to 0.9
    inside = [c for c in graded if 0.90 <= c["coverage"] <= 0.99]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({
        "method": f"grouped ({JACKKNIFE_GROUPS}-group) jackknife of debiased CKA, t interval",
        "level": 0.95, "cells": cells, "graded_cells": len(graded),
        "graded_cells_in_0.90_0.99": len(inside),
        "seconds": time.perf_counter() - started,
    }, indent=2) + "\n")  # fmt: skip
    print(f"{len(inside)} of {len(graded)} graded cells cover 0.90-0.99; wrote {OUT}")


if __name__ == "__main__":
    main()
