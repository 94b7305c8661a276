"""Similarity matrices between many models: labelled values and ``cka_matrix``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from invsim.similarity._inputs import (
    ArrayLike,
    as_matrix,
    check_enough,
    check_not_constant,
)
from invsim.similarity.core import centre_gram, cka_ratio, gram_linear, gram_rbf, hsic
from invsim.similarity.functional import linear_hsic_matrix

__all__ = ["SimilarityMatrix", "cka_matrix", "each_cell"]

T = TypeVar("T")


def each_cell(
    rows: Sequence[str], cols: Sequence[str], cell: Callable[[str, str], T], *, symmetric: bool
) -> list[list[T]]:
    """``cell(r, c)`` for every row and column, called once per unordered pair when the
    measure is ``symmetric`` (the mirrored cell reuses it).

    Example:
        >>> calls = []
        >>> each_cell("ab", "ab", lambda r, c: calls.append(r + c) or r + c, symmetric=True)
        [['aa', 'ab'], ['ab', 'bb']]
        >>> calls
        ['aa', 'ab', 'bb']
    """
    done: dict[tuple[str, str], T] = {}
    for r in rows:
        for c in cols:
            key = (c, r) if symmetric and (c, r) in done else (r, c)
            if key not in done:
                done[key] = cell(*key)
    return [[done[(c, r) if (r, c) not in done else (r, c)] for c in cols] for r in rows]


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
        theirs = (other.rows, other.cols, other.measure, other.options, other.interval,
                  other.flags)  # fmt: skip
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
            out |= {("ci_centre_estimate" if k == "ci_centre" else k): v
                    for k, v in self.interval.items()}  # fmt: skip
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
        about = {("ci_centre" if k == "ci_centre_estimate" else k): d[k]
                 for k in d if k in cls.INTERVAL}  # fmt: skip
        values = np.asarray(d["values"], dtype=np.float64)
        return cls(d["rows"], d["cols"], values, stats, about, d.get("measure"),
                   dict(d.get("options") or {}), dict(d.get("flags") or {}))  # fmt: skip

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


def cka_matrix(
    representations: Mapping[str, ArrayLike],
    *,
    kernel: str = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
) -> SimilarityMatrix:
    """CKA between every pair of representations of the same n examples.

    ``kernel`` is ``"linear"`` or ``"rbf"`` (bandwidth as in :func:`kernel_cka`). Each
    model's centred representation, Gram matrix and self-HSIC are computed once, not
    once per pair. Returns a symmetric :class:`SimilarityMatrix`.

    Example:
        >>> import torch
        >>> from invsim import cka_matrix
        >>> X = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> m = cka_matrix({"a": X, "b": 3 * X, "c": X ** 2})
        >>> round(m["a", "b"], 6), m.values.shape
        (1.0, (3, 3))
    """
    names = list(representations)
    if not names:
        raise ValueError("representations is empty; pass a mapping name -> (n, d) tensor.")
    xs = [as_matrix(representations[k], k) for k in names]
    sizes = {k: x.shape[0] for k, x in zip(names, xs, strict=True)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"representations have different numbers of examples: {sizes}.")
    n = xs[0].shape[0]
    check_enough(n, debiased=debiased)
    for k, x in zip(names, xs, strict=True):
        check_not_constant(x, k)
    m = len(names)
    h = np.zeros((m, m))
    mean_d = sum(x.shape[1] for x in xs) / m
    if kernel == "rbf" or (kernel == "linear" and n <= mean_d):
        if kernel == "rbf":
            grams = [centre_gram(gram_rbf(x, threshold), debiased=debiased) for x in xs]
        else:
            grams = [centre_gram(gram_linear(x), debiased=debiased) for x in xs]
        for i in range(m):
            for j in range(i, m):
                h[i, j] = h[j, i] = hsic(grams[i], grams[j], debiased=debiased)
    elif kernel == "linear":
        h = linear_hsic_matrix(xs, debiased=debiased).numpy()
    else:
        raise ValueError(f"kernel must be 'linear' or 'rbf'; got {kernel!r}.")
    values = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            values[i, j] = cka_ratio(h[i, j], h[i, i], h[j, j])
    return SimilarityMatrix(names, names, values)
