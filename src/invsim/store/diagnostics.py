"""How far to trust an inverted data set: its diagnostics, each example's stopping
reason, and the one rule that says whether its inversions converged
(``CONVERGED_LOSS``, defined once in :mod:`invsim.inversion`;
docs/guides/intervals-and-nulls.md says why).

An inverted data set carries its diagnostics: :func:`invsim.store.invert_dataset`
computes them when it writes the store and keeps them in ``dataset.json``;
``InvertedDataset.diagnostics`` reads them (a store written before they were kept gets
them computed on first use, without the target accuracy, which needs the model).

Examples:
    >>> import torch
    >>> from invsim.store.diagnostics import CONVERGED_LOSS, converged, stop_reasons
    >>> converged({"median_loss": CONVERGED_LOSS / 2}), converged({"median_loss": 0.5})
    (True, False)
    >>> stop_reasons(torch.tensor([0.05, 0.3, 0.3]), torch.tensor([40, 90, 100]), cap=100)
    ['reached', 'at_rest', 'cap']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from invsim.inversion import CONVERGED_LOSS
from invsim.representation import eval_mode, logits

__all__ = [
    "CONVERGED_LOSS",
    "STOP_REASONS",
    "InversionWarning",
    "converged",
    "diagnostics_line",
    "inversion_diagnostics",
    "loss_diagnostics",
    "stop_reasons",
    "unconverged_message",
    "warn_unconverged",
]

# why an example's inversion ended: it reached the loss criterion; it came to rest (or
# stalled) above it before the cap; it was still going when the cap stopped it
STOP_REASONS = ("reached", "at_rest", "cap")


class InversionWarning(UserWarning):
    """Inversions that did not converge: numbers computed on them measure the seeds."""


def converged(diagnostics: Mapping[str, Any]) -> bool:
    """The convergence rule: the median relative loss is at most ``CONVERGED_LOSS``."""
    return float(diagnostics["median_loss"]) <= CONVERGED_LOSS


def stop_reasons(loss: torch.Tensor, iterations: torch.Tensor, *, cap: int) -> list[str]:
    """Each example's :data:`STOP_REASONS` entry, from its final loss and the passes it
    took (fewer than ``cap``: a stop test ended it)."""
    return [
        "reached" if float(q) <= CONVERGED_LOSS else ("at_rest" if int(i) < cap else "cap")
        for q, i in zip(loss.tolist(), iterations.tolist(), strict=True)
    ]


def loss_diagnostics(inverted: Any) -> dict[str, Any]:
    """What the stored losses say (no model needed): loss quantiles (median, 90th
    percentile), the seeds' median loss, the fraction of images at most
    ``CONVERGED_LOSS``, how many examples stopped for each reason, and ``converged``."""
    loss = inverted.loss.double()
    median = float(loss.median())
    settings = inverted.config.get("inversion") or {}
    cap = int(settings.get("iterations", 0))
    reasons = stop_reasons(inverted.loss, inverted.iterations, cap=cap)
    return {
        "median_loss": median,
        "p90_loss": float(torch.quantile(loss, 0.9)),
        "median_initial_loss": float(inverted.initial_loss.median()),
        "fraction_converged": float((loss <= CONVERGED_LOSS).double().mean()),
        "stop_reasons": {r: reasons.count(r) for r in STOP_REASONS},
        "criterion": CONVERGED_LOSS,
        "converged": converged({"median_loss": median}),
        "n": len(inverted),
    }


def inversion_diagnostics(model: torch.nn.Module, inverted: Any) -> dict[str, Any]:
    """:func:`loss_diagnostics` and how often ``model`` classifies an inverted image as
    its target's label (``target_accuracy``)."""
    dev = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model, warn=False):
        pred = torch.cat(
            [logits(model(x.to(dev))).argmax(1).cpu() for x in inverted.images.split(256)]
        )
    accuracy = float((pred == inverted.target_labels).float().mean())
    return {**loss_diagnostics(inverted), "target_accuracy": accuracy}


def diagnostics_line(name: str, d: dict[str, Any]) -> str:
    """One line for the terminal, with the warning when the inversion did not converge."""
    line = (
        f"{name}: median loss {d['median_loss']:.4f} (90th percentile {d['p90_loss']:.4f}; "
        f"seeds {d['median_initial_loss']:.3f}), {100 * d['fraction_converged']:.0f}% of "
        f"images at most {CONVERGED_LOSS}"
    )
    if "target_accuracy" in d:
        line += f", classified as the target {100 * d['target_accuracy']:.0f}%"
    if d.get("stop_reasons"):
        line += "; stopped: " + ", ".join(f"{k} {v}" for k, v in d["stop_reasons"].items())
    if not converged(d):
        line += "\n" + unconverged_message(name, d)
    return line


def unconverged_message(name: str, d: Mapping[str, Any]) -> str:
    return (
        f"WARNING: {name}'s inversions did not converge (median relative loss "
        f"{d['median_loss']:.3f} > criterion {CONVERGED_LOSS}): its inverted data are still "
        "close to the seeds, so its row measures near-natural similarity. Use more "
        'iterations or schedule="converge", and check the step size.'
    )


def warn_unconverged(inverted: Mapping[str, Any], rows: Sequence[str]) -> list[str]:
    """Warn (:class:`InversionWarning`) about each row whose inverted set did not
    converge, naming the model, its median loss and the criterion; return those rows.
    A set without diagnostics (half-budget images) is not judged."""
    bad = []
    for r in rows:
        d = getattr(inverted[r], "diagnostics", None)
        if d and not converged(d):
            warnings.warn(unconverged_message(r, d), InversionWarning, stacklevel=3)
            bad.append(r)
    return bad
