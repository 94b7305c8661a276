"""How far to trust an inverted data set: its diagnostics, and the one rule that says
whether its inversions converged (``CONVERGED_LOSS``; docs/trust.md says why).

Example:
    >>> from invsim.store.diagnostics import CONVERGED_LOSS, converged
    >>> converged({"median_loss": CONVERGED_LOSS / 2}), converged({"median_loss": 0.5})
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from invsim.representation import eval_mode, logits

__all__ = [
    "CONVERGED_LOSS",
    "converged",
    "diagnostics_line",
    "diagnostics_of",
    "inversion_diagnostics",
]


def converged(diagnostics: Mapping[str, Any]) -> bool:
    """The convergence rule: the median relative loss is at most ``CONVERGED_LOSS``."""
    return float(diagnostics["median_loss"]) <= CONVERGED_LOSS


CONVERGED_LOSS = 0.1  # the convergence criterion: median relative loss at most this


def inversion_diagnostics(model: torch.nn.Module, inverted: Any) -> dict[str, Any]:
    """How far to trust an inverted data set: loss quantiles (median, 90th percentile),
    the fraction of images with relative loss at most ``CONVERGED_LOSS``, how often the
    model classifies an inverted image as its target's label, and ``converged``: the
    median relative loss is at most ``CONVERGED_LOSS`` (docs/trust.md says why)."""
    dev = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model, warn=False):
        pred = torch.cat(
            [logits(model(x.to(dev))).argmax(1).cpu() for x in inverted.images.split(256)]
        )
    loss = inverted.loss.double()
    median = float(loss.median())
    return {
        "median_loss": median,
        "p90_loss": float(torch.quantile(loss, 0.9)),
        "median_initial_loss": float(inverted.initial_loss.median()),
        "fraction_converged": float((loss <= CONVERGED_LOSS).double().mean()),
        "target_accuracy": float((pred == inverted.target_labels).float().mean()),
        "converged": converged({"median_loss": median}),
        "n": len(inverted),
    }


def diagnostics_line(name: str, d: dict[str, Any]) -> str:
    """One line for the terminal, with the warning when the inversion did not converge."""
    line = (
        f"{name}: median loss {d['median_loss']:.4f} (90th percentile {d['p90_loss']:.4f}; "
        f"seeds {d['median_initial_loss']:.3f}), {100 * d['fraction_converged']:.0f}% of "
        f"images at most {CONVERGED_LOSS}, "
        f"classified as the target {100 * d['target_accuracy']:.0f}%"
    )
    if not d["converged"]:
        line += (
            f"\nWARNING: {name}'s inversions did not converge (median relative loss "
            f"{d['median_loss']:.3f} > {CONVERGED_LOSS}): its inverted data are still close to "
            "the seeds, so its row measures near-natural similarity. Use more iterations or "
            'schedule="converge", and check the step size.'
        )
    return line


def diagnostics_of(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results["diagnostics"]``: each model's inversion summary (older results.json files
    hold it under ``inversion``, which the report still reads)."""
    return dict(results.get("diagnostics", results.get("inversion", {})))
