"""Seed/target pairs for inversion: a target, and a seed of a different class."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["check_pairs", "sample_pairs"]


def _as_labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a vector; got shape {arr.shape}.")
    return arr


def sample_pairs(labels: Any, n_pairs: int, *, rng_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_pairs`` (seed index, target index) pairs with different labels.

    Targets are drawn without replacement (with replacement, and a warning, only when
    ``n_pairs`` exceeds the data). Each seed is drawn uniformly among the examples whose
    label differs from its target's. Deterministic for a given ``seed``.

    Examples:
        >>> from invsim.data.pairs import sample_pairs
        >>> labels = [0, 0, 1, 1, 2, 2]
        >>> s, t = sample_pairs(labels, 4, rng_seed=0)
        >>> all(labels[i] != labels[j] for i, j in zip(s, t))
        True
    """
    y = _as_labels(labels)
    n = len(y)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1; got {n_pairs}.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(
            f"the data set has a single class ({classes.tolist()}), so no seed can differ in "
            "label from its target; inversion pairs need at least two classes."
        )
    rng = np.random.default_rng(rng_seed)
    if n_pairs > n:
        warnings.warn(
            f"n_pairs={n_pairs} exceeds the {n} examples: targets are drawn with replacement.",
            stacklevel=2,
        )
        targets = rng.choice(n, size=n_pairs, replace=True)
    else:
        targets = rng.choice(n, size=n_pairs, replace=False)
    seeds = np.empty(n_pairs, dtype=np.int64)
    for c in classes:  # sorted, so the draw order is deterministic
        where = np.flatnonzero(y[targets] == c)
        if len(where) == 0:
            continue
        pool = np.flatnonzero(y != c)
        seeds[where] = pool[rng.integers(0, len(pool), size=len(where))]
    return seeds, targets.astype(np.int64)


def check_pairs(seed_labels: Any, target_labels: Any) -> None:
    """Raise ``ValueError`` naming the positions where a seed shares its target's label."""
    s, t = _as_labels(seed_labels), _as_labels(target_labels)
    if s.shape != t.shape:
        raise ValueError(f"{len(s)} seed labels but {len(t)} target labels.")
    bad = np.flatnonzero(s == t)
    if len(bad):
        shown = ", ".join(f"{i} (label {s[i]})" for i in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(
            f"{len(bad)} seed/target pairs share a label, at positions {shown}{more}; a seed "
            "must come from a different class than its target (use sample_pairs)."
        )
