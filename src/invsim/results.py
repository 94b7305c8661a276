"""The one home of invsim's results, typed, with their JSON and CSV forms.

- :class:`SimilarityMatrix`: one measure's labelled matrix (rows, columns, values and
  per-cell statistics); ``to_dict`` / ``from_dict``, :func:`write_matrix_csv`;
- :class:`LayerSimilarity`: the layer-by-layer view (every model's layers against every
  other's), :func:`depth_profile`, :func:`write_layers_csv`;
- :class:`Results`: a run's matrices by regime and measure and what the run says about
  them; ``to_json`` / ``read``. :func:`invsim.report.write_outputs` writes them all
  (results.json, the CSVs, the report): the one place outputs are written.

:class:`Results` is the one object that the pipeline returns and that
:func:`~invsim.report.write_outputs`, the report, ``invsim report`` and ``invsim similarity``
consume. Its JSON form is ``results.json``:

- ``matrices[regime]``: the primary measure's (the first listed) matrix;
- ``measures[measure][regime]``: every measure's matrix, with its intervals and nulls;
- ``summary``, ``robustness``: the primary measure's summaries; ``panel``: per measure;
- ``statistics[measure][claim]``: the paper's claims under every measure, each with its
  value, interval and p-value;
- ``confound``: the confound experiment, its ``headline`` (natural / inverted x CKA /
  dCKA for each comparison) and ``removes_confound`` (which remedy removes it);
- ``diagnostics``: each row model's inversion diagnostics; ``drift``, ``warnings``,
  ``models``, ``provenance``;
- ``layers``: the layer-by-layer view, ``natural`` and ``inverted[row]``, each a
  :class:`LayerSimilarity` (layer names on both axes);
- one key per added stage (:func:`invsim.experiment.stages.add_stage`), in ``extra``.

Examples:
    >>> import numpy as np
    >>> from invsim.results import Results, SimilarityMatrix
    >>> m = SimilarityMatrix(["a", "b"], ["a", "b"], np.eye(2), measure="linear_cka")
    >>> r = Results(matrices={"natural": {"linear_cka": m}})
    >>> Results.from_json(r.to_json()) == r, r.primary, r.matrix("natural")["a", "b"]
    (True, 'linear_cka', 0.0)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LayerSimilarity",
    "Results",
    "SimilarityMatrix",
    "confound_table",
    "depth_profile",
    "write_layers_csv",
    "write_matrix_csv",
]


@dataclass
class SimilarityMatrix:
    """A labelled matrix: ``values[i, j]`` is the similarity of ``rows[i]`` and ``cols[j]``.

    Index by names: ``m["resnet", "vgg"]``.
    """

    rows: list[str]
    cols: list[str]
    values: np.ndarray
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    # what the intervals are: ci_method, ci_target, ci_centre, ci_reason (where calibrated)
    interval: dict[str, Any] = field(default_factory=dict)
    measure: str | None = None  # the measure's name, where known
    options: dict[str, Any] = field(default_factory=dict)  # the measure's options, if set
    # what to distrust: "not_converged" -> rows whose inversions did not converge
    flags: dict[str, list[str]] = field(default_factory=dict)

    STATS = ("ci_low", "ci_high", "ci_centre", "null_mean", "p_value")
    INTERVAL = ("ci_method", "ci_target", "ci_centre_estimate", "ci_reason")

    def __post_init__(self) -> None:
        self.rows, self.cols = list(self.rows), list(self.cols)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.rows), len(self.cols)):
            raise ValueError(
                f"values have shape {self.values.shape} but there are {len(self.rows)} row and "
                f"{len(self.cols)} column labels."
            )

    def __eq__(self, other: object) -> bool:
        """Same labels, measure and interval description; values and statistics equal
        element by element (NaN equal to NaN)."""
        if not isinstance(other, SimilarityMatrix):
            return NotImplemented

        def same(a: np.ndarray, b: np.ndarray) -> bool:
            return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))

        heads = (self.rows, self.cols, self.measure, self.options, self.interval, self.flags)
        theirs = (other.rows, other.cols, other.measure, other.options, other.interval, other.flags)
        return (
            heads == theirs
            and same(self.values, other.values)
            and self.stats.keys() == other.stats.keys()
            and all(same(np.asarray(v), np.asarray(other.stats[k])) for k, v in self.stats.items())
        )

    __hash__ = None  # type: ignore[assignment]  (mutable)

    def __getitem__(self, key: tuple[str, str]) -> float:
        r, c = key
        return float(self.values[self.rows.index(r), self.cols.index(c)])

    def to_dict(self) -> dict[str, Any]:
        """rows, cols, values and, where computed, ``ci_low``, ``ci_high``, ``null_mean``
        and ``p_value`` arrays of the same shape."""
        out = {"rows": self.rows, "cols": self.cols, "values": self.values.tolist()}
        out |= {k: _none_for_nan(v) for k, v in self.stats.items()}
        if self.interval:  # the estimate the intervals centre on: ci_centre_estimate
            out |= {
                ("ci_centre_estimate" if k == "ci_centre" else k): v
                for k, v in self.interval.items()
            }
        if self.measure is not None:
            out["measure"] = self.measure
        if self.options:
            out["options"] = dict(self.options)
        if self.flags:
            out["flags"] = {k: list(v) for k, v in self.flags.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SimilarityMatrix:
        stats = {k: np.asarray(d[k], dtype=np.float64) for k in d if k in cls.STATS}
        about = {
            ("ci_centre" if k == "ci_centre_estimate" else k): d[k] for k in d if k in cls.INTERVAL
        }
        values = np.asarray(d["values"], dtype=np.float64)
        return cls(
            d["rows"],
            d["cols"],
            values,
            stats,
            about,
            d.get("measure"),
            dict(d.get("options") or {}),
            dict(d.get("flags") or {}),
        )

    def long(self) -> list[tuple[str, str, float]]:
        """Long format: (row, column, value) for every entry."""
        return [
            (r, c, float(self.values[i, j]))
            for i, r in enumerate(self.rows)
            for j, c in enumerate(self.cols)
        ]

    def stat(self, name: str, i: int, j: int) -> float | None:
        """``stats[name][i, j]``, or None when that statistic was not computed."""
        return float(self.stats[name][i, j]) if name in self.stats else None

    def __repr__(self) -> str:
        width = max(len(c) for c in self.cols + self.rows) + 1
        head = " " * width + "".join(f"{c:>{width}}" for c in self.cols)
        lines = [head] + [
            f"{r:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row)
            for r, row in zip(self.rows, self.values, strict=True)
        ]
        return "\n".join(lines)


def _none_for_nan(values: np.ndarray) -> list:
    """JSON-ready nested lists, with None where a statistic was not computed (NaN)."""
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(a), None, a).tolist()


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
        return SimilarityMatrix(
            self.layers[a], self.layers[b], np.array(block), measure=name, flags=flags, stats=stats
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = {k: _nan_list(v) for k, v in self.values.items()}
        out["stats"] = {m: {k: _nan_list(v) for k, v in by.items()} for m, by in self.stats.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSimilarity:
        values = {k: np.array(v, dtype=float) for k, v in d["values"].items()}
        stats = {
            m: {k: np.array(v, dtype=float) for k, v in by.items()}
            for m, by in d.get("stats", {}).items()
        }
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
            points.append(
                {
                    "model": a,
                    "layer": layer,
                    "depth": t,
                    "mean": float(np.mean(finite)) if finite else None,
                }
            )
    return points


def write_layers_csv(result: LayerSimilarity, path: Any) -> None:
    """Long format, one row per (model, layer) x (model, layer) cell and measure."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        stats = ("ci_low", "ci_high", "ci_centre", "null_mean")
        w.writerow(
            [
                "images",
                "row_model",
                "row_layer",
                "column_model",
                "column_layer",
                "measure",
                "value",
                *stats,
            ]
        )
        for name in result.measures:
            for a in result.models:
                for b in result.models:
                    m = result.pair(a, b, name)
                    for i, la in enumerate(m.rows):
                        for j, lb in enumerate(m.cols):
                            cells = [
                                m.values[i, j],
                                *(m.stats[k][i, j] if k in m.stats else math.nan for k in stats),
                            ]
                            text = ["" if not math.isfinite(v) else f"{v:.10g}" for v in cells]
                            w.writerow([result.row or "natural", a, la, b, lb, name, *text])


def write_matrix_csv(
    matrices: SimilarityMatrix | Mapping[str, SimilarityMatrix], path: Path
) -> None:
    """Long format: row, column, measure, value, and beside the value its interval and
    null (``ci_low``, ``ci_high``, ``ci_centre``, ``null_mean``, ``p_value``; empty where
    not computed)."""
    if isinstance(matrices, SimilarityMatrix):
        matrices = {matrices.measure or "linear_cka": matrices}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "column", "measure", "value", *SimilarityMatrix.STATS])
        for name, m in matrices.items():
            for i, r in enumerate(m.rows):
                for j, c in enumerate(m.cols):
                    extra = [m.stat(k, i, j) for k in SimilarityMatrix.STATS]
                    cells = ["" if v is None or math.isnan(v) else f"{v:.10g}" for v in extra]
                    w.writerow([r, c, name, f"{m.values[i, j]:.10g}", *cells])


# results.json's top-level keys besides the matrices, in the order they are written
_PLAIN = (
    "summary",
    "panel",
    "diagnostics",
    "robustness",
    "models",
    "drift",
    "statistics",
    "warnings",
    "confound",
    "provenance",
)


@dataclass
class Results:
    """Matrices by regime and measure (``matrices[regime][measure]``, the first measure
    primary) and what the run says about them; the other fields are JSON-ready values
    (None where the run did not compute them). ``extra`` holds added stages' artefacts
    by stage name."""

    matrices: dict[str, dict[str, SimilarityMatrix]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    panel: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    robustness: dict[str, Any] | None = None
    models: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    confound: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def measures(self) -> list[str]:
        """The measures computed, the primary first."""
        return list(next(iter(self.matrices.values()))) if self.matrices else []

    @property
    def primary(self) -> str | None:
        """The primary measure's name (the first listed)."""
        return self.measures[0] if self.measures else None

    @property
    def regimes(self) -> list[str]:
        return list(self.matrices)

    def matrix(self, regime: str, measure: str | None = None) -> SimilarityMatrix:
        """The matrix of ``regime`` under ``measure`` (default: the primary measure)."""
        by = self.matrices.get(regime)
        if by is None:
            raise KeyError(f"no {regime!r} matrices in these results; regimes: {self.regimes}.")
        name = measure or self.primary
        if name not in by:
            raise KeyError(f"no {name!r} matrix for {regime!r}; measures: {list(by)}.")
        return by[name]

    def __getitem__(self, key: str) -> Any:
        """results.json's view by key (``r["matrices"]["natural"]["values"]``)."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """results.json's layout (JSON-ready; NaN statistics become null)."""
        labelled = {
            m: {r: _labelled(by[m], m) for r, by in self.matrices.items()} for m in self.measures
        }
        out: dict[str, Any] = {
            "matrices": {r: labelled[self.primary][r] for r in self.matrices}
            if self.primary
            else {},
            "measures": labelled,
        }
        for key in _PLAIN:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.layers is not None:
            out["layers"] = _layers_json(self.layers)
        for key, value in self.extra.items():
            if key in out or key in _FIELDS:
                raise ValueError(f"stage artefact {key!r} would overwrite results.{key}.")
            out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"

    def __eq__(self, other: object) -> bool:
        """Equal matrices, and equal values elsewhere (NaN equal to NaN)."""
        if not isinstance(other, Results):
            return NotImplemented
        return (
            self.matrices == other.matrices
            and _comparable(_layers_json(self.layers or {}))
            == _comparable(_layers_json(other.layers or {}))
            and all(
                _comparable(getattr(self, f)) == _comparable(getattr(other, f))
                for f in _FIELDS - {"matrices", "layers"}
            )
        )

    __hash__ = None  # type: ignore[assignment]  (mutable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Results:
        """Read results.json's layout, this version's or an older one's (which held the
        diagnostics under ``inversion`` and, before the panel, only ``matrices``)."""
        if "measures" in d and d["measures"]:
            matrices = {
                r: {
                    m: SimilarityMatrix.from_dict({"measure": m, **by[r]})
                    for m, by in d["measures"].items()
                    if r in by
                }
                for r in d.get("matrices", {}) or next(iter(d["measures"].values()))
            }
        else:
            matrices = {
                r: {v.get("measure", "linear_cka"): SimilarityMatrix.from_dict(v)}
                for r, v in d.get("matrices", {}).items()
            }
        plain = {k: d[k] for k in _PLAIN if k in d}
        if "diagnostics" not in plain and "inversion" in d:
            plain["diagnostics"] = d["inversion"]
        known = {"matrices", "measures", "inversion", "layers", *_PLAIN}
        extra = {k: v for k, v in d.items() if k not in known}
        layers = _layers_typed(d["layers"]) if d.get("layers") is not None else None
        return cls(matrices=matrices, **plain, layers=layers, extra=extra)

    @classmethod
    def from_json(cls, text: str) -> Results:
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: str | Path) -> Results:
        """``results.json`` at ``path`` (a file, or a run's directory)."""
        p = Path(path)
        p = p / "results.json" if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"{str(p)!r} not found: run an experiment into this dir.")
        return cls.from_json(p.read_text())


_FIELDS = {f.name for f in fields(Results)}


def _layers_json(layers: dict[str, Any]) -> dict[str, Any]:
    """The layer-by-layer view as JSON: ``natural`` one result, ``inverted`` one per row."""
    out: dict[str, Any] = {}
    for key, value in layers.items():
        if hasattr(value, "to_dict"):
            out[key] = value.to_dict()
        else:
            out[key] = {row: v.to_dict() for row, v in value.items()}
    return out


def _layers_typed(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if "values" in value:
            out[key] = LayerSimilarity.from_dict(value)
        else:
            out[key] = {row: LayerSimilarity.from_dict(v) for row, v in value.items()}
    return out


def _labelled(matrix: SimilarityMatrix, measure: str) -> dict[str, Any]:
    return {**matrix.to_dict(), "measure": matrix.measure or measure}


def _comparable(value: Any) -> Any:
    """``value`` with NaN replaced by a marker that equals itself, tuples as lists and
    numpy scalars as Python numbers, for equality after a JSON round trip."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


CONFOUND_COLUMNS = ("natural CKA", "natural dCKA", "inverted CKA", "inverted dCKA")


def confound_table(headline: Mapping[str, float]) -> list[tuple[str, list[float]]]:
    """The confound experiment's headline (``results.confound["headline"]``) as its table:
    for only-A vs only-B and the two only-A models, the four numbers of
    ``CONFOUND_COLUMNS`` (inverted: on only-A's inverted data)."""
    return [
        (
            label,
            [
                headline[f"natural_linear_cka_{key}"],
                headline[f"natural_dcka_{key}"],
                headline[f"inverted_linear_cka_{key}_on_a"],
                headline[f"inverted_dcka_{key}_on_a"],
            ],
        )
        for key, label in (("a_b", "only-A vs only-B"), ("a_a2", "two only-A models"))
    ]
