"""A run's results, typed: what ``results.json`` holds, and what the outputs read.

:class:`Results` is the one object that the pipeline returns and that ``write_outputs``,
the report, ``invsim report`` and ``invsim similarity`` consume. Its JSON form is
``results.json``, whose keys older files share, so they still load and render:

- ``matrices[regime]``: the primary measure's (the first listed) matrix;
- ``measures[measure][regime]``: every measure's matrix, with its intervals and nulls;
- ``summary``, ``robustness``: the primary measure's summaries; ``panel``: per measure;
- ``diagnostics``: each row model's inversion diagnostics; ``drift``, ``statistics``,
  ``warnings``, ``confound``, ``models``, ``provenance``;
- ``layers``: the layer-by-layer view, ``natural`` and ``inverted[row]``, each a
  :class:`~invsim.similarity.by_layer.LayerSimilarity` (layer names on both axes);
- one key per added stage (:func:`invsim.experiment.stages.add_stage`), in ``extra``.

Example:
    >>> import numpy as np
    >>> from invsim.results import Results
    >>> from invsim.similarity import SimilarityMatrix
    >>> m = SimilarityMatrix(["a", "b"], ["a", "b"], np.eye(2), measure="linear_cka")
    >>> r = Results(matrices={"natural": {"linear_cka": m}})
    >>> Results.from_json(r.to_json()) == r, r.primary, r.matrix("natural")["a", "b"]
    (True, 'linear_cka', 0.0)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from invsim.similarity.matrix import SimilarityMatrix

__all__ = ["Results"]

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
        """results.json's view by key (``r["matrices"]["natural"]["values"]``), as the
        dictionary that ``run_experiment`` returned before it returned this type."""
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
            "matrices": {r: labelled[self.primary][r] for r in self.matrices} if self.primary
            else {},
            "measures": labelled,
        }  # fmt: skip
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
                r: {m: SimilarityMatrix.from_dict({"measure": m, **by[r]}) for m, by in
                    d["measures"].items() if r in by}
                for r in d.get("matrices", {}) or next(iter(d["measures"].values()))
            }  # fmt: skip
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

    @classmethod
    def coerce(cls, value: Results | dict[str, Any]) -> Results:
        """``value`` as :class:`Results` (a results.json mapping is read)."""
        return value if isinstance(value, Results) else cls.from_dict(dict(value))


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
    from invsim.similarity.by_layer import LayerSimilarity

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
