"""The layer-by-layer view as a typed result: :class:`LayerSimilarity` (every model's
layers against every other's, labelled), similarity by relative depth, and its CSV.
Pure data (numpy); :func:`invsim.experiment.layers.layer_similarity` computes it.

Example:
    >>> import numpy as np
    >>> from invsim.similarity.by_layer import LayerSimilarity
    >>> res = LayerSimilarity(["a", "b"], {"a": ["l1", "l2"], "b": ["m1"]},
    ...                       {"a": [4, 2], "b": [3]}, {"linear_cka": np.eye(3)}, n=10)
    >>> res.pair("a", "b").rows, res.pair("a", "b").cols
    (['l1', 'l2'], ['m1'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from invsim.similarity.matrix import SimilarityMatrix

__all__ = ["LayerSimilarity", "depth_profile", "write_layers_csv"]


@dataclass
class LayerSimilarity:
    """Layer-by-layer similarity of every model with every other.

    ``values[measure]`` is the (V, V) matrix over all (model, layer) views in
    ``models``' order; :meth:`pair` labels the block of two models (rows: the first
    model's layers, columns: the second's). ``images`` names the examples (natural data,
    or a row model's inverted set), ``row`` the model whose inverted set it is."""

    models: list[str]
    layers: dict[str, list[str]]
    dims: dict[str, list[int]]
    values: dict[str, np.ndarray]
    n: int
    estimator: str = "exact"
    schedule: dict[str, Any] = field(default_factory=dict)
    images: str = ""
    row: str | None = None
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    about: dict[str, Any] = field(default_factory=dict)

    @property
    def measures(self) -> list[str]:
        return list(self.values)

    def _span(self, model: str) -> slice:
        if model not in self.layers:
            raise KeyError(f"no model {model!r} here; models: {self.models}.")
        start = sum(len(self.layers[k]) for k in self.models[: self.models.index(model)])
        return slice(start, start + len(self.layers[model]))

    def pair(self, a: str, b: str, measure: str | None = None) -> SimilarityMatrix:
        """The L_a x L_b matrix of models ``a`` (rows) and ``b`` (columns)."""
        name = measure or self.measures[0]
        if name not in self.values:
            raise KeyError(f"no {name!r} here; measures: {self.measures}.")
        rows, cols = self._span(a), self._span(b)
        block = self.values[name][rows, cols]
        flags = {"estimator": self.estimator} if self.estimator != "exact" else {}
        stats = {k: np.array(v[rows, cols]) for k, v in self.stats.get(name, {}).items()}
        return SimilarityMatrix(self.layers[a], self.layers[b], np.array(block), measure=name,
                                flags=flags, stats=stats)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = {k: _nan_list(v) for k, v in self.values.items()}
        out["stats"] = {m: {k: _nan_list(v) for k, v in by.items()} for m, by in self.stats.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSimilarity:
        values = {k: np.array(v, dtype=float) for k, v in d["values"].items()}
        stats = {m: {k: np.array(v, dtype=float) for k, v in by.items()}
                 for m, by in d.get("stats", {}).items()}  # fmt: skip
        return cls(**{**d, "values": values, "stats": stats})


def _nan_list(a: np.ndarray) -> list:
    return [[None if x is None or not math.isfinite(x) else float(x) for x in row] for row in a]


def depth_profile(result: LayerSimilarity, measure: str | None = None) -> list[dict[str, Any]]:
    """Similarity by relative depth: for each of the row models' layers at relative depth
    t = i / (L - 1), the mean over other models b of the entry at b's layer of nearest
    relative depth (the diagonal of "same relative depth"). With ``result.row`` set (an
    inverted set), only that row model's layers; else every model's, pooled."""
    name = measure or result.measures[0]
    rows = [result.row] if result.row else result.models
    points = []
    for a in rows:
        others = [b for b in result.models if b != a]
        la = result.layers[a]
        for i, layer in enumerate(la):
            t = i / max(len(la) - 1, 1)
            vals = []
            for b in others:
                lb = result.layers[b]
                j = round(t * (len(lb) - 1))
                vals.append(float(result.pair(a, b, name).values[i, j]))
            finite = [v for v in vals if math.isfinite(v)]
            points.append({"model": a, "layer": layer, "depth": t,
                           "mean": float(np.mean(finite)) if finite else None})  # fmt: skip
    return points


def write_layers_csv(result: LayerSimilarity, path: Any) -> None:
    """Long format, one row per (model, layer) x (model, layer) cell and measure."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        stats = ("ci_low", "ci_high", "ci_centre", "null_mean")
        w.writerow(["images", "row_model", "row_layer", "column_model", "column_layer",
                    "measure", "value", *stats])  # fmt: skip
        for name in result.measures:
            for a in result.models:
                for b in result.models:
                    m = result.pair(a, b, name)
                    for i, la in enumerate(m.rows):
                        for j, lb in enumerate(m.cols):
                            cells = [m.values[i, j], *(m.stats[k][i, j] if k in m.stats
                                                       else math.nan for k in stats)]  # fmt: skip
                            text = ["" if not math.isfinite(v) else f"{v:.10g}" for v in cells]
                            w.writerow([result.row or "natural", a, la, b, lb, name, *text])
