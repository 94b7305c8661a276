"""Nesterov momentum in the converging schedule, tried and not kept (not a test). Writes
benchmarks/results/nesterov.json.

The inversion's step is plain momentum on the normalised gradient. This script swaps in
the look-ahead (Nesterov) form for the run, by replacing the private step function:
``m = mu m + (1 - mu) g / ||g||``, then ``x -= lr (mu m + (1 - mu) g / ||g||)``. On the
three LeNets of ``bench_hard.py`` (trained there, 64 pairs, cap 2,000), per model:
median and 90th-percentile loss and image passes, for plain and Nesterov momentum with
the default converging settings and with ``decay_tol`` 1%, beside the paper's schedule
at 1,000 iterations. docs/guides/inversion.md reads the result: the same loss-for-passes curve.

    python benchmarks/bench_nesterov.py      # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from bench_hard import zoo  # same folder: the hard LeNets, trained once

import invsim.inversion as inversion
from invsim.config import InversionConfig
from invsim.data import load_dataset
from invsim.data.pairs import sample_pairs
from invsim.steps import _TINY, l2_norm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "nesterov.json"
PLAIN_STEP = inversion._step


def nesterov_step(s, grad, cfg, ball_binds) -> None:
    mu = cfg.step_momentum
    g = grad * ((1.0 - mu) / (l2_norm(grad) + _TINY))
    s.m.mul_(mu).add_(g)
    lr = cfg.step_size if cfg.schedule == "paper" else s.lr.view((-1,) + (1,) * (s.x.ndim - 1))
    s.x = (s.x - lr * (mu * s.m + g)).clamp_(0.0, 1.0)  # eps 1000 never binds here
    s.it += 1


P = InversionConfig(batch_size=64)
RUNS = {
    "paper, 1,000 iterations": (P.replace(iterations=1000), PLAIN_STEP),
    "paper, 1,000 iterations, Nesterov": (P.replace(iterations=1000), nesterov_step),
    "converge (default)": (P.replace(schedule="converge"), PLAIN_STEP),
    "converge, Nesterov": (P.replace(schedule="converge"), nesterov_step),
    "converge, decay_tol 0.01": (P.replace(schedule="converge", decay_tol=0.01), PLAIN_STEP),
    "converge, decay_tol 0.01, Nesterov": (
        P.replace(schedule="converge", decay_tol=0.01),
        nesterov_step,
    ),
}


def main() -> None:
    torch.manual_seed(0)
    models = zoo(ROOT / "runs" / "hard-models")
    test = load_dataset("mnist5k", split="test")
    s, t = sample_pairs(test.labels.numpy(), 64, rng_seed=0)
    seeds, targets = test.images[s], test.images[t]
    out: dict = {"pairs": 64, "runs": {}}
    try:
        for run, (cfg, step) in RUNS.items():
            inversion._step = step
            rows = {}
            for name, model in models.items():
                r = inversion.invert_images(model, seeds, targets, cfg, progress=False)
                rows[name] = {
                    "median_loss": float(r.loss.median()),
                    "p90_loss": float(torch.quantile(r.loss.double(), 0.9)),
                    "passes": int(r.passes),
                }
                print(run, name, rows[name], flush=True)
            out["runs"][run] = rows
    finally:
        inversion._step = PLAIN_STEP
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
