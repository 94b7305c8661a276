"""Functional measures: how alike two models' *outputs* are on the same examples, from
their logits (n, classes).

- ``agreement``: the fraction of examples where the two predicted classes agree;
- ``cohens_kappa``: agreement corrected for chance, (p_o - p_e) / (1 - p_e), with p_e
  from each model's marginal class frequencies;
- ``js_divergence``: the mean Jensen-Shannon divergence (natural log, in [0, ln 2]) of
  the softmax distributions; lower is more similar.

Examples:
    >>> import torch
    >>> from invsim.similarity.outputs import agreement, cohens_kappa
    >>> a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    >>> agreement(a, 10 * a), cohens_kappa(a, a)
    (1.0, 1.0)
"""

from __future__ import annotations

import math

import torch

from invsim.similarity._inputs import ArrayLike, as_matrix
from invsim.similarity.registry import Measure, register

__all__ = ["agreement", "cohens_kappa", "js_divergence"]


def _logits(A: ArrayLike, B: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_matrix(A, "logits A"), as_matrix(B, "logits B")
    if a.shape != b.shape:
        raise ValueError(
            f"logits have shapes {tuple(a.shape)} and {tuple(b.shape)}; functional measures "
            "compare two models' outputs for the same examples over the same classes."
        )
    if a.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes; got {a.shape[1]}.")
    return a, b


def agreement(A: ArrayLike, B: ArrayLike) -> float:
    """Fraction of examples with the same predicted class."""
    a, b = _logits(A, B)
    return float((a.argmax(1) == b.argmax(1)).double().mean())


def cohens_kappa(A: ArrayLike, B: ArrayLike) -> float:
    """Cohen's kappa between the two models' predicted classes."""
    a, b = _logits(A, B)
    pa, pb = a.argmax(1), b.argmax(1)
    k = a.shape[1]
    observed = float((pa == pb).double().mean())
    fa = torch.bincount(pa, minlength=k).double() / len(pa)
    fb = torch.bincount(pb, minlength=k).double() / len(pb)
    chance = float(fa @ fb)
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else float("nan")  # both constant: kappa undefined
    return (observed - chance) / (1.0 - chance)


def js_divergence(A: ArrayLike, B: ArrayLike) -> float:
    """Mean Jensen-Shannon divergence of the softmax outputs (nats)."""
    a, b = _logits(A, B)
    lp, lq = a.log_softmax(1), b.log_softmax(1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl = lambda l1: (l1.exp() * (l1 - lm)).sum(1)  # noqa: E731
    return float((0.5 * kl(lp) + 0.5 * kl(lq)).mean())


register(
    Measure(
        "agreement",
        agreement,
        (0.0, 1.0),
        inputs="logits",
        invariances=frozenset({"isotropic_scaling"}),
        description="fraction of identical predictions",
    )
)
register(
    Measure(
        "cohens_kappa",
        cohens_kappa,
        (-1.0, 1.0),
        inputs="logits",
        invariances=frozenset({"isotropic_scaling"}),
        description="chance-corrected prediction agreement",
    )
)
register(
    Measure(
        "js_divergence",
        js_divergence,
        (0.0, math.log(2.0)),
        higher_is_similar=False,
        inputs="logits",
        description="mean Jensen-Shannon divergence of outputs",
    )
)
