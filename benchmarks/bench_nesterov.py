"""Nesterov momentum as a step rule, tried and not kept (not a test). Writes
benchmarks/results/nesterov.json.

The look-ahead (Nesterov) form of the normalised momentum step, ``m = mu m + (1 - mu) g /
||g||``, then ``x -= lr (mu m + (1 - mu) g / ||g||)``, registered here as two step rules
(the paper's fixed step, and the converging rule's decaying step) without touching the
loop: the rule protocol at work. On the models of ``bench_hard.py`` (trained there, 64
pairs, cap 2,000), per model: median and 90th-percentile loss and image passes, plain
against Nesterov. docs/guides/inversion.md reads the result.

    python benchmarks/bench_nesterov.py      # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from bench_hard import zoo  # same folder: the hard models, trained once

from invsim.config import InversionConfig
from invsim.data import load_dataset
from invsim.data.pairs import sample_pairs
from invsim.inversion import invert_images, register
from invsim.inversion.momentum import (
    ConvergingMomentum,
    ConvergingMomentumSettings,
    Momentum,
    MomentumSettings,
)
from invsim.inversion.rules import rows_like
from invsim.steps import _TINY, l2_norm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "nesterov.json"


def _look_ahead(m: torch.Tensor, grad: torch.Tensor, mu: float) -> torch.Tensor:
    """Update ``m`` in place and return the Nesterov direction ``mu m + (1 - mu) g/||g||``."""
    g = grad * ((1.0 - mu) / (l2_norm(grad) + _TINY))
    m.mul_(mu).add_(g)
    return mu * m + g


class NesterovSettings(MomentumSettings):
    rule: Literal["nesterov"] = "nesterov"


@register
class Nesterov(Momentum):
    Settings = NesterovSettings

    def step(self, rows, state):
        d = _look_ahead(state.m, rows.grad, self.settings.momentum)
        return rows.constrain(rows.x - self.settings.step_size * d)


class ConvergingNesterovSettings(ConvergingMomentumSettings):
    rule: Literal["converging-nesterov"] = "converging-nesterov"


@register
class ConvergingNesterov(ConvergingMomentum):
    Settings = ConvergingNesterovSettings

    def step(self, rows, state):
        d = _look_ahead(state.m, rows.grad, self.settings.momentum)
        return rows.constrain(rows.x - rows_like(state.lr, rows.x) * d)


P = InversionConfig(batch_size=64)
RUNS = {
    "paper, 1,000 iterations": P.replace(iterations=1000),
    "paper, 1,000 iterations, Nesterov": P.replace(iterations=1000, rule="nesterov"),
    "converging-momentum": P.replace(rule="converging-momentum"),
    "converging-momentum, Nesterov": P.replace(rule="converging-nesterov"),
}


def main() -> None:
    torch.manual_seed(0)
    models, _ = zoo(ROOT / "runs" / "hard-models")
    test = load_dataset("mnist5k", split="test")
    s, t = sample_pairs(test.labels.numpy(), 64, rng_seed=0)
    seeds, targets = test.images[s], test.images[t]
    out: dict = {"pairs": 64, "runs": {}}
    for run, cfg in RUNS.items():
        rows = {}
        for name, model in models.items():
            r = invert_images(model, seeds, targets, cfg, progress=False)
            rows[name] = {
                "median_loss": float(r.loss.median()),
                "p90_loss": float(torch.quantile(r.loss.double(), 0.9)),
                "passes": int(r.passes),
            }
            print(run, name, rows[name], flush=True)
        out["runs"][run] = rows
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
