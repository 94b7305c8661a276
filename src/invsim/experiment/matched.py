"""The paper's robustness claims at matched convergence.

A robust model's representation is the hardest to invert, and a half-inverted image is
still much like its seed, where every model looks alike: rows compared at a fixed budget
partly compare how far each inversion got. With the inversion's ``snapshot_losses``, each
inverted set keeps its examples' first iterates at or below each loss level (the
inversion path), and this stage recomputes the inverted matrix (primary measure) at each
level that every row reached with at least
:data:`~invsim.experiment.matrices.MIN_AT_LOSS` examples, on the same number of examples
in every row, then the robustness statistics on it, beside the end point's. Where a
claim's sign or its significance (p < 0.05) differs between the end point and a level, it
warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from invsim.experiment.matrices import MIN_AT_LOSS, inverted_similarity
from invsim.experiment.summary import claim_statistics, cross_architecture_similarity
from invsim.results import SimilarityMatrix
from invsim.store.diagnostics import InversionWarning

__all__ = ["CLAIMS", "SIGNIFICANCE", "claims_at_matched_loss", "disagreements"]

# the robustness statistics compared (claim_statistics' keys), and the level that counts
CLAIMS = ("robustness_within", "robustness_spearman")
SIGNIFICANCE = 0.05


def claims_at_matched_loss(
    models: Mapping[str, Any],
    inverted: Mapping[str, Any],
    end_point: SimilarityMatrix,
    eps: Mapping[str, float],
    arch: Mapping[str, str],
    *,
    measure: str,
    rng_seed: int = 0,
    **kw: Any,
) -> dict[str, Any] | None:
    """Per loss level of the inverted sets' paths: each row's similarity to the other
    architectures (or to the other models, without architectures), the examples used and
    left out, and the robustness statistics; the end point's beside them; the levels not
    every row reached; and :func:`disagreements`. None when a set kept no path. ``kw``
    goes to :func:`~invsim.experiment.inverted_similarity` (layer, cache, device)."""
    paths = {r: getattr(inv, "path", None) for r, inv in inverted.items()}
    if not paths or any(p is None for p in paths.values()):
        return None
    levels = sorted(set.intersection(*(set(p.levels) for p in paths.values())), reverse=True)
    end = _claims(end_point, eps, arch, rng_seed)
    out: dict[str, Any] = {
        "measure": measure,
        "end_point": {"similarity": _similarity(end_point, arch), "statistics": end},
        "levels": {},
        "not_reached": {},
    }
    for level in levels:
        reached = {r: int(p.reached(level).sum()) for r, p in paths.items()}
        n = min(reached.values())
        if n < MIN_AT_LOSS:
            out["not_reached"][str(level)] = {r: k for r, k in reached.items() if k < MIN_AT_LOSS}
            continue
        (mat,) = inverted_similarity(
            models, inverted, n=n, measures=measure, at_loss=level, rng_seed=rng_seed, **kw
        ).values()
        out["levels"][str(level)] = {
            "n": n,
            "examples_reached": reached,
            "similarity": _similarity(mat, arch),
            "statistics": _claims(mat, eps, arch, rng_seed),
        }
    out["disagreements"] = disagreements(out)
    for d in out["disagreements"]:
        warnings.warn(d["message"], InversionWarning, stacklevel=2)
    return out


def _claims(m: SimilarityMatrix, eps, arch, rng_seed: int) -> dict[str, Any]:
    found = claim_statistics(None, m, eps, arch=arch, rng_seed=rng_seed)
    return {k: found[k] for k in CLAIMS if k in found}


def _similarity(m: SimilarityMatrix, arch: Mapping[str, str]) -> dict[str, float]:
    """Each row's mean similarity to the other architectures' columns (to every other
    column when no row has another architecture)."""
    found = cross_architecture_similarity(m, arch)
    if found:
        return found
    return {r: float(np.mean([m[r, c] for c in m.cols if c != r])) for r in m.rows}


def disagreements(matched: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The claims whose sign or significance at a loss level differs from the end point's,
    each with a message."""
    out = []
    end = matched["end_point"]["statistics"]
    for level, row in matched["levels"].items():
        for claim, s in row["statistics"].items():
            e = end.get(claim)
            if e is None:
                continue
            sign = np.sign(s["value"]) != np.sign(e["value"])
            significant = (s["p_value"] < SIGNIFICANCE) != (e["p_value"] < SIGNIFICANCE)
            if not (sign or significant):
                continue
            what = "its sign" if sign else "its significance"
            out.append(
                {
                    "claim": claim,
                    "level": float(level),
                    "end_point": {"value": e["value"], "p_value": e["p_value"]},
                    "matched": {"value": s["value"], "p_value": s["p_value"]},
                    "message": (
                        f"WARNING: {claim} changes {what} at matched loss {level}: "
                        f"{s['value']:+.3f} (p = {s['p_value']:.3g}) against "
                        f"{e['value']:+.3f} (p = {e['p_value']:.3g}) at the end point; part "
                        "of the end point's statistic reflects how far each inversion got."
                    ),
                }
            )
    return out
