"""Alignment measures of the linear family, direct (full-data) forms: orthogonal
Procrustes similarity, mean CCA, SVCCA, PWCCA and linear-regression R².

Their streaming twins (:mod:`invsim.similarity.moments`) give the same values from one
pass of cross-moments; both use the same rank rule (a direction is kept when its
variance exceeds ``RANK_TOL`` times the largest; no ridge) and SVCCA's 99%-variance rule.

- ``procrustes``: ``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)``, in [0, 1] (1 - the
  normalised orthogonal Procrustes distance's square over 2; Ding et al. 2021).
- ``mean_cca``: the mean canonical correlation over min(rank X, rank Y) pairs.
- ``svcca``: mean CCA after keeping each side's leading 99%-variance directions.
- ``pwcca``: canonical correlations weighted by how much of X each canonical variate
  accounts for (Morcos et al. 2018); asymmetric (the weights come from X).
- ``linreg_r2``: R² of predicting Y from X by least squares; asymmetric.

Examples:
    >>> import torch
    >>> from invsim.similarity.alignment import mean_cca, procrustes
    >>> X = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    >>> A = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    >>> round(mean_cca(X, X @ A + 3), 6), round(procrustes(X, 2 * X), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

import torch

from invsim.similarity import moments
from invsim.similarity._inputs import ArrayLike, as_matrix, check_not_constant, check_pair
from invsim.similarity.moments import RANK_TOL, SVCCA_VARIANCE
from invsim.similarity.registry import Measure, register

__all__ = ["linreg_r2", "mean_cca", "procrustes", "pwcca", "svcca"]


def _centred(X: ArrayLike, Y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_pair(x, y, debiased=False)
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    return x - x.mean(dim=0, keepdim=True), y - y.mean(dim=0, keepdim=True)


def _basis(x: torch.Tensor, keep: str = "rank") -> torch.Tensor:
    """Orthonormal basis (n, r) of the kept directions of centred x (left singular vectors)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    var = s * s
    r = int((var > RANK_TOL * var[0]).sum())
    if keep == "svcca":
        share = torch.cumsum(var[:r], 0) / var[:r].sum()
        r = min(r, int((share < SVCCA_VARIANCE).sum()) + 1)
    return u[:, :r]


def procrustes(X: ArrayLike, Y: ArrayLike) -> float:
    """Orthogonal Procrustes similarity ``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)``."""
    x, y = _centred(X, Y)
    return float(torch.linalg.svdvals(x.T @ y).sum() / (x.norm() * y.norm()))


def _canonical(X: ArrayLike, Y: ArrayLike, keep: str = "rank"):
    x, y = _centred(X, Y)
    ux, uy = _basis(x, keep), _basis(y, keep)
    moments.warn_degenerate_cca(ux.shape[1], uy.shape[1], x.shape[0])
    u, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return rho.clamp(max=1.0), ux @ u, x


def mean_cca(X: ArrayLike, Y: ArrayLike) -> float:
    """Mean canonical correlation (rank rule, no ridge)."""
    return float(_canonical(X, Y)[0].mean())


def svcca(X: ArrayLike, Y: ArrayLike) -> float:
    """SVCCA: mean CCA on each side's leading directions explaining 99% of its variance."""
    return float(_canonical(X, Y, keep="svcca")[0].mean())


def pwcca(X: ArrayLike, Y: ArrayLike) -> float:
    """Projection-weighted CCA (Morcos et al. 2018): weights from X's neurons."""
    rho, variates, x = _canonical(X, Y)
    alpha = (variates.T @ x).abs().sum(dim=1)
    return float((alpha * rho).sum() / alpha.sum())


def linreg_r2(X: ArrayLike, Y: ArrayLike) -> float:
    """R² of the least-squares prediction of Y from X (pseudo-inverse; no ridge)."""
    x, y = _centred(X, Y)
    ux = _basis(x)
    return float((ux.T @ y).norm() ** 2 / y.norm() ** 2)


_LINEAR = frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"})
register(
    Measure(
        "procrustes",
        procrustes,
        (0.0, 1.0),
        invariances=_LINEAR,
        from_moments=moments.procrustes,
        description="orthogonal Procrustes similarity (nuclear norm)",
    )
)
register(
    Measure(
        "mean_cca",
        mean_cca,
        (0.0, 1.0),
        invariances=_LINEAR | {"invertible_linear"},
        from_moments=moments.mean_cca,
        description="mean canonical correlation",
    )
)
register(
    Measure(
        "svcca",
        svcca,
        (0.0, 1.0),
        invariances=_LINEAR,
        from_moments=moments.svcca,
        description="mean CCA on 99%-variance SVD directions",
    )
)
register(
    Measure(
        "pwcca",
        pwcca,
        (0.0, 1.0),
        symmetric=False,
        invariances=frozenset({"isotropic_scaling", "translation", "permutation"}),
        from_moments=moments.pwcca,
        description="projection-weighted CCA (weights from X)",
    )
)
register(
    Measure(
        "linreg_r2",
        linreg_r2,
        (0.0, 1.0),
        symmetric=False,
        invariances=_LINEAR,
        from_moments=moments.linreg_r2,
        description="R² of predicting Y from X",
    )
)
