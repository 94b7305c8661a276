"""What a run reports about its matrices: summaries, the robustness trend, inversion
diagnostics, the confound headline, the one-paragraph headline, and CSV output.

Examples:
    >>> import numpy as np
    >>> from invsim.similarity import SimilarityMatrix
    >>> from invsim.experiment import summarize
    >>> m = SimilarityMatrix(["a", "b"], ["a", "b"], np.array([[1.0, 0.2], [0.4, 1.0]]))
    >>> round(summarize(m)["offdiag_mean"], 3), round(summarize(m)["asymmetry"], 3)
    (0.3, 0.2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from invsim.results import CONFOUND_COLUMNS, Results, confound_table
from invsim.similarity import SimilarityMatrix
from invsim.store.diagnostics import (
    CONVERGED_LOSS,
    converged,
    diagnostics_line,
    inversion_diagnostics,
    unconverged_message,
)

__all__ = [
    "CONVERGED_LOSS",
    "claim_statistics",
    "cross_architecture_similarity",
    "robustness_within",
    "confound_headline",
    "confound_lines",
    "confound_verdict",
    "diagnostics_line",
    "warnings_of",
    "panel_summary",
    "headline",
    "inversion_diagnostics",
    "robustness_summary",
    "summarize",
]


def summarize(matrix: SimilarityMatrix) -> dict[str, Any]:
    """Off-diagonal mean and median, row and column means (off-diagonal), and asymmetry
    mean |S - S^T| over the entries whose transpose exists."""
    v = matrix.values
    rows, cols = matrix.rows, matrix.cols
    off = np.array([[r != c for c in cols] for r in rows], dtype=bool)
    out: dict[str, Any] = {
        "offdiag_mean": float(v[off].mean()) if off.any() else None,
        "offdiag_median": float(np.median(v[off])) if off.any() else None,
        "row_means": {r: float(v[i][off[i]].mean()) for i, r in enumerate(rows) if off[i].any()},
        "col_means": {
            c: float(v[:, j][off[:, j]].mean()) for j, c in enumerate(cols) if off[:, j].any()
        },
    }
    gaps = asymmetry_gaps(matrix)
    if len(gaps):
        out["asymmetry"] = float(gaps.mean())
    return out


def asymmetry_gaps(matrix: SimilarityMatrix) -> np.ndarray:
    """|S[a, b] - S[b, a]| for each unordered pair of models that are both rows and
    columns: the one definition of asymmetry (its mean is ``summarize``'s)."""
    common = [r for r in matrix.rows if r in matrix.cols]
    return np.array(
        [abs(matrix[a, b] - matrix[b, a]) for i, a in enumerate(common) for b in common[i + 1 :]]
    )


def robustness_summary(
    matrix: SimilarityMatrix, eps: Mapping[str, float], arch: Mapping[str, str]
) -> dict[str, Any]:
    """Each model's mean similarity to all others (row and column together) against its
    eps, per architecture, with the Spearman correlation over all models."""
    per_model = {}
    for name in matrix.rows:
        vals = [matrix[name, c] for c in matrix.cols if c != name]
        vals += [matrix[r, name] for r in matrix.rows if r != name and name in matrix.cols]
        per_model[name] = {
            "eps": float(eps[name]),
            "arch": arch[name],
            "mean_similarity": float(np.mean(vals)),
        }
    xs = [v["eps"] for v in per_model.values()]
    ys = [v["mean_similarity"] for v in per_model.values()]
    rho = None
    if len(set(xs)) > 1 and len(set(ys)) > 1:
        rho = float(_spearman(np.array(xs), np.array(ys)[None])[0])
    return {"per_model": per_model, "spearman": rho}


def warnings_of(results: Results) -> list[dict[str, Any]]:
    """The run's warnings: rows whose inversions did not converge, entries not settled."""
    out = []
    for name, d in results.diagnostics.items():
        if not converged(d):
            out.append(
                {
                    "kind": "not_converged",
                    "model": name,
                    "median_loss": d["median_loss"],
                    "message": unconverged_message(name, d),
                }
            )
    drift = results.drift or {}
    if drift.get("moved"):
        out.append(
            {
                "kind": "not_settled",
                "cells": len(drift["moved"]),
                "message": f"WARNING: {len(drift['moved'])} inverted entries moved by more "
                f"than {drift['threshold']} in the second half of the budget.",
            }
        )
    return out


# the confound experiment's two comparisons (models only_a, only_a_seed2, only_b) and the
# two remedies it puts side by side: inversion (natural -> inverted) and dCKA (CKA -> dCKA)
CONFOUND_PAIRS = {"a_b": ("only_a", "only_b"), "a_a2": ("only_a", "only_a_seed2")}
CONFOUND_MEASURES = ("linear_cka", "dcka")
# a remedy removes the co-occurrence confound when only-A vs only-B falls to at most this
# while the two only-A models stay at least this much above it
REMOVED_AT, CONTROL_GAP = 0.3, 0.3


def confound_headline(panels: Mapping[str, Mapping[str, SimilarityMatrix]]) -> dict[str, float]:
    """The confound experiment's numbers from its ``panels`` (regime -> measure -> matrix):
    for only-A vs only-B (``a_b``) and the two-only-A control (``a_a2``), natural and
    inverted (on only-A's inverted data, ``on_a``), linear CKA and dCKA; and only-A vs
    only-B on only-B's inverted data (``a_b_on_b``)."""
    out = {}
    for m in CONFOUND_MEASURES:
        natural, inverted = panels["natural"][m], panels["inverted"][m]
        for key, (a, b) in CONFOUND_PAIRS.items():
            out[f"natural_{m}_{key}"] = natural[a, b]
            out[f"inverted_{m}_{key}_on_a"] = inverted[a, b]
        out[f"inverted_{m}_a_b_on_b"] = inverted["only_b", "only_a"]
    return out


def confound_verdict(h: Mapping[str, float]) -> dict[str, bool]:
    """Which remedy removes the co-occurrence confound (see ``REMOVED_AT``): inversion
    (inverted linear CKA), dCKA (on natural images), and both together."""

    def removes(a_b: float, a_a2: float) -> bool:
        return a_b <= REMOVED_AT and a_a2 - a_b >= CONTROL_GAP

    return {
        "inversion": removes(h["inverted_linear_cka_a_b_on_a"], h["inverted_linear_cka_a_a2_on_a"]),
        "dcka": removes(h["natural_dcka_a_b"], h["natural_dcka_a_a2"]),
        "both": removes(h["inverted_dcka_a_b_on_a"], h["inverted_dcka_a_a2_on_a"]),
    }


def confound_lines(h: Mapping[str, float]) -> list[str]:
    """The confound experiment for a terminal or a README: the four numbers per
    comparison and which remedy removes the confound."""
    verdict = confound_verdict(h)
    lines = ["confound: " + " / ".join(CONFOUND_COLUMNS)]
    for label, cells in confound_table(h):
        lines.append(f"  {label}: " + " / ".join(f"{v:.3f}" for v in cells))
    said = {True: "removes", False: "does not remove"}
    lines.append(
        f"  inversion {said[verdict['inversion']]} the co-occurrence confound; dCKA on "
        f"natural images {said[verdict['dcka']]} it"
    )
    return lines


def panel_summary(
    panels: Mapping[str, Mapping[str, SimilarityMatrix]], measure: str, eps: Mapping[str, float]
) -> dict[str, Any]:
    """The paper's question under one measure: the natural and inverted off-diagonal
    means, and the Spearman correlation of inverted similarity with robustness."""
    from invsim.similarity import get_measure

    spec = get_measure(measure)
    out: dict[str, Any] = {"higher_is_similar": spec.higher_is_similar}
    for regime, by in panels.items():
        out[f"{regime}_offdiag_mean"] = summarize(by[measure])["offdiag_mean"]
    if "inverted" in panels and len(set(eps.values())) > 1:
        arch = {k: "all" for k in eps}
        out["inverted_robustness_spearman"] = robustness_summary(
            panels["inverted"][measure], eps, arch
        )["spearman"]
    return out


def headline(results: Results) -> str:
    """A few lines for the terminal: the paper's question answered by this run."""
    s = results.summary
    lines = []
    if "natural" in s and "inverted" in s:
        lines.append(
            f"mean off-diagonal CKA: natural {s['natural']['offdiag_mean']:.3f}, "
            f"inverted {s['inverted']['offdiag_mean']:.3f} "
            f"(asymmetry {s['inverted'].get('asymmetry', float('nan')):.3f})"
        )
    rob = (results.robustness or {}).get("inverted")
    claims = (results.statistics or {}).get(results.primary or "", {})
    trend = claims.get("robustness_spearman")
    if trend and trend["ci_low"] is not None:
        lines.append(
            f"inverted similarity vs robustness: Spearman {trend['value']:.2f} "
            f"[{trend['ci_low']:.2f}, {trend['ci_high']:.2f}], p={trend['p_value']:.3f}"
        )
    elif rob and rob["spearman"] is not None:
        lines.append(f"inverted similarity vs robustness: Spearman {rob['spearman']:.2f}")
    within = claims.get("robustness_within")
    if within:
        lines.append(
            f"within architectures, vs other architectures: mean Spearman {within['value']:.2f} "
            f"[{within['ci_low']:.2f}, {within['ci_high']:.2f}], stratified p="
            f"{within['p_value']:.3f}; the robust model is higher in {len(within['rising'])} of "
            f"{within['architectures']} architectures"
        )
    lines += _matched_line(results.extra.get("matched"))
    c = (results.confound or {}).get("headline")
    if c:
        lines += confound_lines(c)
    losses = [q["median_loss"] for q in results.diagnostics.values()]
    if losses:
        lines.append(f"median inversion loss reached: {min(losses):.3f} to {max(losses):.3f}")
    return "\n".join(lines)


def _matched_line(matched: Mapping[str, Any] | None) -> list[str]:
    """The within-architecture claim at the lowest loss level every row reached (the
    claims at matched convergence), beside the end point's line above."""
    levels = (matched or {}).get("levels") or {}
    if not levels:
        return []
    level = min(levels, key=float)
    within = levels[level]["statistics"].get("robustness_within")
    if not within:
        return []
    flipped = any(d["claim"] == "robustness_within" for d in matched.get("disagreements", []))
    return [
        f"  at matched inversion loss {level} ({levels[level]['n']} examples per row): mean "
        f"Spearman {within['value']:.2f} [{within['ci_low']:.2f}, {within['ci_high']:.2f}], "
        f"stratified p={within['p_value']:.3f}"
        + ("; differs from the end point" if flipped else "")
    ]


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of x with each row of y (ties get average ranks)."""
    from scipy.stats import rankdata

    rx = rankdata(x) - (len(x) + 1) / 2
    ry = rankdata(y, axis=-1) - (y.shape[-1] + 1) / 2
    denom = np.sqrt((rx @ rx) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ry @ rx) / denom


def cross_architecture_similarity(
    matrix: SimilarityMatrix, arch: Mapping[str, str]
) -> dict[str, float]:
    """Each row model's mean similarity to the columns of *other* architectures only (its
    own architecture's twins, e.g. its robustness ladder, left out); rows with no such
    column are omitted."""
    out = {}
    for r in matrix.rows:
        others = [matrix[r, c] for c in matrix.cols if arch.get(c) != arch.get(r)]
        if others:
            out[r] = float(np.mean(others))
    return out


def robustness_within(
    inverted: SimilarityMatrix,
    eps: Mapping[str, float],
    arch: Mapping[str, str],
    *,
    n_perm: int = 2000,
    n_boot: int = 2000,
    ci: float = 0.95,
    rng_seed: int = 0,
) -> dict[str, Any] | None:
    """The robustness claim as Jones et al. state it: within each architecture, does a
    more robust model sit closer to the *other* architectures? Statistic: the mean over
    architectures (those with at least two eps values) of the Spearman correlation of eps
    with :func:`cross_architecture_similarity`. p-value: a stratified permutation test
    (eps permuted within each architecture, every permutation enumerated when there are
    at most ``n_perm`` of them, and then exact; two-sided); interval: percentile, resampling
    architectures. ``rising``: the architectures whose most robust model is more similar
    than their least robust one (a paired comparison per ladder). None when no
    architecture has two eps values."""
    sim = cross_architecture_similarity(inverted, arch)
    ladders: dict[str, list[str]] = {}
    for m in sim:
        if m in eps:
            ladders.setdefault(arch.get(m, m), []).append(m)
    ladders = {a: ms for a, ms in ladders.items() if len({eps[m] for m in ms}) > 1}
    if not ladders:
        return None
    xs = [np.array([eps[m] for m in ms]) for ms in ladders.values()]
    ys = [np.array([sim[m] for m in ms]) for ms in ladders.values()]
    rhos = np.array([float(_spearman(x, y[None])[0]) for x, y in zip(xs, ys, strict=True)])
    value = float(rhos.mean())
    draws, exact = _stratified_null(xs, ys, n_perm, np.random.default_rng(rng_seed))
    extreme = int(np.sum(np.abs(draws) >= abs(value) - 1e-12))
    p = extreme / len(draws) if exact else (1 + extreme) / (1 + len(draws))
    rng = np.random.default_rng(rng_seed + 1)
    boot = rhos[rng.integers(0, len(rhos), size=(n_boot, len(rhos)))].mean(1)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    ends = {a: sorted(ms, key=lambda m: eps[m]) for a, ms in ladders.items()}
    rising = [a for a, ms in ends.items() if sim[ms[-1]] > sim[ms[0]]]
    return {
        "value": value,
        "ci_low": float(np.percentile(boot, lo_q)),
        "ci_high": float(np.percentile(boot, hi_q)),
        "p_value": float(p),
        "architectures": len(ladders),
        "rising": rising,
        "per_architecture": dict(zip(ladders, rhos.tolist(), strict=True)),
        "cross_architecture_similarity": sim,
    }


def _stratified_null(xs, ys, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """The mean within-architecture Spearman correlation under eps permuted within each
    architecture, and whether these are all permutations (when there are at most
    ``n_perm``; else ``n_perm`` random ones)."""
    import itertools

    total = math.prod(math.factorial(len(x)) for x in xs)
    if total <= n_perm:
        per = [
            [float(_spearman(np.array(p), y[None])[0]) for p in itertools.permutations(x)]
            for x, y in zip(xs, ys, strict=True)
        ]
        return np.array([np.mean(c) for c in itertools.product(*per)]), True
    per = [
        _spearman(y, np.array([rng.permutation(x) for _ in range(n_perm)]))
        for x, y in zip(xs, ys, strict=True)
    ]
    return np.mean(per, axis=0), False


def _robustness_spearman(inverted, eps, rng, *, n_boot: int, n_perm: int, quantiles) -> dict:
    """The older robustness statistic (:func:`claim_statistics`): Spearman over all models
    of each one's mean inverted similarity with its eps, its interval and p-value."""
    lo_q, hi_q = quantiles
    names = [r for r in inverted.rows if r in eps]
    per = robustness_summary(inverted, eps, {k: "all" for k in eps})["per_model"]
    x = np.array([eps[n] for n in names])
    y = np.array([per[n]["mean_similarity"] for n in names])
    rho = float(_spearman(x, y[None])[0])
    idx = rng.integers(0, len(names), size=(n_boot, len(names)))
    boot = np.array([_spearman(x[i], y[i][None])[0] for i in idx])
    boot = boot[np.isfinite(boot)]  # resamples with a constant eps have no correlation
    perm = _spearman(y, np.array([rng.permutation(x) for _ in range(n_perm)]))
    return {
        "value": rho,
        "ci_low": float(np.percentile(boot, lo_q)) if len(boot) else None,
        "ci_high": float(np.percentile(boot, hi_q)) if len(boot) else None,
        "p_value": float((1 + np.sum(np.abs(perm) >= abs(rho) - 1e-12)) / (1 + n_perm)),
    }


def _asymmetry(inverted, rng, *, n_boot: int, quantiles) -> dict | None:
    """Mean |S - S^T| over the inverted matrix's model pairs, with a percentile interval
    from resampling pairs (:func:`claim_statistics`); None without a pair."""
    gaps = asymmetry_gaps(inverted)
    if not len(gaps):
        return None
    boot = gaps[rng.integers(0, len(gaps), size=(n_boot, len(gaps)))].mean(1)
    lo_q, hi_q = quantiles
    return {
        "value": float(gaps.mean()),
        "ci_low": float(np.percentile(boot, lo_q)),
        "ci_high": float(np.percentile(boot, hi_q)),
    }


def claim_statistics(
    natural: SimilarityMatrix | None,
    inverted: SimilarityMatrix | None,
    eps: Mapping[str, float],
    *,
    arch: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    n_perm: int = 2000,
    rng_seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Intervals and p-values for the paper's three claims, on the primary measure.

    - ``robustness_within`` (with ``arch``): the claim as the paper states it, within
      architectures and against other architectures only (:func:`robustness_within`).
    - ``robustness_spearman``: the older statistic, kept for comparison: Spearman
      correlation over all models of each model's mean inverted similarity (its own
      architecture's twins included) with its eps; percentile interval from resampling
      models, p-value from permuting eps over all models (two-sided).
    - ``asymmetry``: mean |S - S^T| of the inverted matrix; percentile interval from
      resampling model pairs.
    - ``natural_minus_inverted``: the mean over off-diagonal cells of natural minus
      inverted similarity; percentile interval from resampling cells, p-value from random
      sign flips of the paired differences (two-sided).

    The units resampled are models, pairs and cells: these intervals speak of this zoo,
    not of architectures in general (each cell's own interval is in the matrices).
    """
    rng = np.random.default_rng(rng_seed)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out: dict[str, Any] = {}
    if inverted is not None and arch is not None:
        within = robustness_within(
            inverted, eps, arch, n_perm=n_perm, n_boot=n_boot, ci=ci, rng_seed=rng_seed
        )
        if within is not None:
            out["robustness_within"] = within
    if inverted is not None and len(set(eps.values())) > 1:
        out["robustness_spearman"] = _robustness_spearman(
            inverted, eps, rng, n_boot=n_boot, n_perm=n_perm, quantiles=(lo_q, hi_q)
        )
    gaps = (
        None
        if inverted is None
        else _asymmetry(inverted, rng, n_boot=n_boot, quantiles=(lo_q, hi_q))
    )
    if gaps is not None:
        out["asymmetry"] = gaps
    if natural is not None and inverted is not None:
        d = np.array(
            [natural[r, c] - inverted[r, c] for r in inverted.rows for c in inverted.cols if r != c]
        )
        if len(d):
            boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
            flips = (rng.choice([-1.0, 1.0], size=(n_perm, len(d))) * d).mean(1)
            out["natural_minus_inverted"] = {
                "value": float(d.mean()),
                "ci_low": float(np.percentile(boot, lo_q)),
                "ci_high": float(np.percentile(boot, hi_q)),
                "p_value": float((1 + np.sum(np.abs(flips) >= abs(d.mean()))) / (1 + n_perm)),
            }
    return out
