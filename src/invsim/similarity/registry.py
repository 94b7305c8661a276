"""The registry of similarity measures: a name -> :class:`Measure` with its metadata.

A *measure* is a similarity index between two representations of the same examples
(linear CKA, Procrustes, mutual kNN, ...); which data it is computed on (natural,
inverted, STIR) is the *regime*, never part of the measure. Each measure declares its
range, whether higher means more similar, whether it is symmetric, the transformations
it is invariant to (:data:`INVARIANCES`, a test checks each one and shows each
undeclared one failing), what it reads (the representation or the model's logits) and
whether it streams from the one-pass cross-moments (``from_moments``).

Adding a measure is one module in ``invsim/similarity/`` that calls :func:`register`,
plus its tests; the experiment, CLI and report pick it up by name.

Examples:
    >>> import numpy as np
    >>> from invsim.similarity import MEASURES, measure
    >>> X = np.random.default_rng(0).normal(size=(100, 5))
    >>> round(measure("procrustes", X, 2 * X + 1), 6), MEASURES["procrustes"].symmetric
    (1.0, True)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "INVARIANCES",
    "MEASURES",
    "Measure",
    "MeasureLike",
    "get_measure",
    "measure",
    "parse_measure",
    "register",
]

INVARIANCES = (
    "orthogonal",  # X -> X Q, Q orthogonal
    "isotropic_scaling",  # X -> a X, a > 0
    "translation",  # X -> X + 1 b^T
    "permutation",  # X -> X P (features reordered)
    "invertible_linear",  # X -> X A, A invertible
)

INTERVALS = ("cka_jackknife", None)


@dataclass(frozen=True)
class Measure:
    """A similarity measure and what it promises.

    ``fn(X, Y, **options) -> float`` is the direct, full-data computation.
    ``from_moments(centred, a, b, **options)``, when given, computes the same value from
    :class:`~invsim.similarity.moments.CentredMoments` (one streamed pass, mergeable
    across processes). ``inputs`` is ``"representation"`` or ``"logits"``.
    ``interval``: how its interval for the population value is made
    (:mod:`invsim.similarity.calibration`): ``"cka_jackknife"`` (the closed-form
    delete-one jackknife of debiased CKA, for the CKA family) or None (no method was shown
    to cover; no interval is reported).
    ``exact_null``: its permutation null has the exact moments of linear CKA.
    ``options``: the keyword options this instance is bound to (:meth:`with_options`);
    empty for a registered measure at its defaults.
    ``debiased``: the name of this measure's debiased twin, if it has one.
    ``deconfounds``: ``fn`` also takes ``inputs=Z``, the examples' inputs (or another
    representation) it removes from the comparison (``dcka``); a run passes each
    regime's images (:meth:`against`).
    """

    name: str
    fn: Callable[..., float]
    range: tuple[float, float]
    higher_is_similar: bool = True
    symmetric: bool = True
    invariances: frozenset[str] = frozenset()
    inputs: str = "representation"
    from_moments: Callable[..., float] | None = None
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    interval: str | None = None
    exact_null: bool = False
    debiased: str | None = None
    deconfounds: bool = False

    @property
    def streams(self) -> bool:
        """Whether the value comes from the one-pass, mergeable cross-moments."""
        return self.from_moments is not None

    def __post_init__(self) -> None:
        unknown = set(self.invariances) - set(INVARIANCES)
        if unknown:
            raise ValueError(f"unknown invariances {sorted(unknown)}; use {INVARIANCES}.")
        if self.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS}; got {self.interval!r}.")
        if self.inputs not in ("representation", "logits"):
            raise ValueError(f"inputs must be 'representation' or 'logits'; got {self.inputs!r}.")

    def option_names(self) -> list[str]:
        """The keyword options ``fn`` takes after X and Y (a deconfounding measure's
        ``inputs`` is data, not an option)."""
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in params if p.kind in kinds and p.name != "inputs"]

    def against(self, inputs: Any) -> Measure:
        """This deconfounding measure with the examples' ``inputs`` bound (the data, not an
        option: it is not recorded in ``options``); any other measure unchanged."""
        if not self.deconfounds:
            return self
        return dataclasses.replace(self, fn=functools.partial(self.fn, inputs=inputs))

    def with_options(self, **options: Any) -> Measure:
        """This measure with ``options`` bound (``k=20`` for ``mutual_knn``); an option
        its function does not take is an error naming the ones it does.

        Examples:
            >>> from invsim.similarity import get_measure
            >>> get_measure("mutual_knn").with_options(k=20).options
            {'k': 20}
        """
        if not options:
            return self
        allowed = self.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"measure {self.name!r} has no option {unknown}; its options: {allowed or 'none'}."
            )
        merged = {**self.options, **options}
        fm = self.from_moments and functools.partial(self.from_moments, **merged)
        return dataclasses.replace(
            self,
            fn=functools.partial(_unbound(self.fn), **merged),
            from_moments=fm,
            options=merged,
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-ready: everything but the functions."""
        return {
            "name": self.name,
            "range": list(self.range),
            "higher_is_similar": self.higher_is_similar,
            "symmetric": self.symmetric,
            "invariances": sorted(self.invariances),
            "inputs": self.inputs,
            "streams": self.streams,
            "description": self.description,
            "interval": self.interval,
            "exact_null": self.exact_null,
            "deconfounds": self.deconfounds,
            "options": dict(self.options),
        }


MEASURES: dict[str, Measure] = {}


def register(m: Measure, *, replace: bool = False) -> Measure:
    """Add ``m`` to :data:`MEASURES` (``replace=True`` to overwrite a name)."""
    if m.name in MEASURES and not replace:
        raise ValueError(f"a measure named {m.name!r} is already registered.")
    MEASURES[m.name] = m
    return m


MeasureLike = str | Mapping[str, Any] | Measure


def _unbound(fn: Callable[..., float]) -> Callable[..., float]:
    return fn.func if isinstance(fn, functools.partial) else fn


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def parse_measure(spec: MeasureLike) -> tuple[str, dict[str, Any]]:
    """A measure's name and options from ``"mutual_knn"``, ``"mutual_knn:k=20,metric=l2"``
    (the CLI's form), ``{"name": "mutual_knn", "k": 20}`` (YAML's) or a :class:`Measure`.

    Examples:
        >>> parse_measure("mutual_knn:k=20")
        ('mutual_knn', {'k': 20})
    """
    if isinstance(spec, Measure):
        return spec.name, dict(spec.options)
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"a measure given as a mapping needs a 'name'; got {dict(spec)}.")
        return str(spec["name"]), {k: v for k, v in spec.items() if k != "name"}
    name, _, rest = str(spec).partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"measure option {item!r} in {spec!r} must read key=value.")
        options[key.strip()] = _value(value.strip())
    return name, options


def get_measure(name: MeasureLike) -> Measure:
    """The registered measure ``name`` (any form :func:`parse_measure` reads), with its
    options bound; an unknown name is an error with close matches."""
    if isinstance(name, Measure):
        return name
    if not isinstance(name, str) or ":" in name:
        base, options = parse_measure(name)
        return get_measure(base).with_options(**options)
    if name in MEASURES:
        return MEASURES[name]
    close = difflib.get_close_matches(name, list(MEASURES), n=3, cutoff=0.4)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"unknown measure {name!r}.{hint} Known: {sorted(MEASURES)}.")


def measure(name: str, X: Any, Y: Any, **options: Any) -> float:
    """The measure ``name`` between X (n, d1) and Y (n, d2): the functional form.

    For ``inputs="logits"`` measures, X and Y are the two models' logits (n, classes).
    """
    return float(get_measure(name).fn(X, Y, **options))
