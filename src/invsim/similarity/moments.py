"""Measures from centred second moments: one streamed pass serves them all.

:class:`CentredMoments` holds, for k views of the same n examples, the centred sums
``G_ab = sum_i (x_ai - mean_a)(x_bi - mean_b)^T`` (float64) and the row-norm statistics
the debiased HSIC needs. It comes from :meth:`CrossMoments.centred`
(:mod:`invsim.similarity.streaming`), so it merges across batches and processes.
Each view's eigendecomposition is computed once and shared by every pair.

The moment forms here are checked against the direct, data-based forms (the measures'
``fn``) to 1e-8 in the tests. Rank rule for CCA-type measures and regression: a
direction is kept when its covariance eigenvalue exceeds ``RANK_TOL`` times the
largest (a pseudo-inverse; no ridge). SVCCA keeps the leading directions that explain
``SVCCA_VARIANCE`` (99%) of each view's variance (Raghu et al. 2017).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from invsim.similarity.core import cka_ratio, hsic_from_moments

__all__ = ["RANK_TOL", "SVCCA_VARIANCE", "CentredMoments", "warn_degenerate_cca"]

RANK_TOL = 1e-10
SVCCA_VARIANCE = 0.99


@dataclass
class CentredMoments:
    """Centred second moments of k views (sums over examples, float64)."""

    n: int
    G: dict[tuple[int, int], torch.Tensor]  # (a, b) with a <= b
    R1: torch.Tensor  # (k,) sum_i ||x_ai||^2
    R2: torch.Tensor  # (k, k) sum_i ||x_ai||^2 ||x_bi||^2
    _eig: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _canon: dict[tuple, tuple] = field(default_factory=dict)
    _white: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def cov(self, a: int, b: int) -> torch.Tensor:
        return self.G[a, b] if a <= b else self.G[b, a].T

    def eig(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and eigenvectors of view a's scatter, cached."""
        if a not in self._eig:
            vals, vecs = torch.linalg.eigh(self.cov(a, a))
            self._eig[a] = (vals.flip(0), vecs.flip(1))
        return self._eig[a]

    def whitener(self, a: int, *, keep: str = "rank") -> torch.Tensor:
        """W (d_a, r) with W^T G_aa W = I over the kept directions (see module doc),
        cached per view and rule."""
        if (a, keep) not in self._white:
            self._white[a, keep] = self._whitener(a, keep)
        return self._white[a, keep]

    def _whitener(self, a: int, keep: str) -> torch.Tensor:
        vals, vecs = self.eig(a)
        top = float(vals[0]) if len(vals) else 0.0
        if top <= 0:
            raise ValueError(f"view {a} has zero variance; the measure is undefined for it.")
        r = int((vals > RANK_TOL * top).sum())
        if keep == "svcca":
            share = torch.cumsum(vals[:r], 0) / vals[:r].sum()
            r = min(r, int((share < SVCCA_VARIANCE).sum()) + 1)
        return vecs[:, :r] / vals[:r].sqrt()

    def loadings(self, a: int) -> torch.Tensor:
        """G_aa W_a (d_a, r): the covariances of view a's neurons with its whitened
        directions, ``V_r Lambda_r^(1/2)`` from the cached eigendecomposition."""
        vals, vecs = self.eig(a)
        r = self.whitener(a).shape[1]
        return vecs[:, :r] * vals[:r].sqrt()

    def canonical(self, a: int, b: int, *, keep: str = "rank", directions: bool = True):
        """Canonical correlations (descending, min(rank a, rank b) of them) and, with
        ``directions``, view a's canonical directions in its whitened coordinates, U (the
        directions themselves are ``W_a U``): from the eigendecomposition of the smaller
        of ``T T^T`` and ``T^T T``, ``T = W_a^T G_ab W_b``. One
        decomposition serves both orders of a pair (the other side's directions are
        ``T^T u / rho``, or their own decomposition where some rho is too small for that),
        and mean CCA and PWCCA share it."""
        key = (min(a, b), max(a, b), keep)
        if key not in self._canon:
            self._canon[key] = self._decompose(key[0], key[1], keep, directions)
        rho, dirs = self._canon[key]
        if not directions:
            return rho, None
        if dirs is None:  # values were cached without directions: decompose again
            self._canon[key] = self._decompose(key[0], key[1], keep, True)
            rho, dirs = self._canon[key]
        return rho, dirs[0 if a == key[0] else 1]

    def _decompose(self, a: int, b: int, keep: str, directions: bool) -> tuple:
        wa, wb = self.whitener(a, keep=keep), self.whitener(b, keep=keep)
        if a == b:  # a view against itself: T = I
            eye = torch.eye(wa.shape[1], dtype=wa.dtype)
            return torch.ones(wa.shape[1], dtype=wa.dtype), (eye, eye) if directions else None
        warn_degenerate_cca(wa.shape[1], wb.shape[1], self.n)
        t = wa.T @ self.cov(a, b) @ wb
        flip = t.shape[0] > t.shape[1]  # decompose the smaller Gram matrix of T
        small = t.T @ t if flip else t @ t.T
        r = min(t.shape)
        if not directions:
            vals = torch.linalg.eigvalsh(small)
            return vals.flip(0)[:r].clamp(0.0, 1.0).sqrt(), None
        vals, u = torch.linalg.eigh(small)
        rho = vals.flip(0)[:r].clamp(0.0, 1.0).sqrt()
        u = u.flip(1)[:, :r]  # singular vectors of T on the smaller side
        if float(rho[-1]) > 1e-6:  # the other side's: T^T u / rho, accurate here
            other = ((t if flip else t.T) @ u) / rho
        else:
            big = t @ t.T if flip else t.T @ t
            other = torch.linalg.eigh(big)[1].flip(1)[:, :r]
        return rho, (other, u) if flip else (u, other)


def warn_degenerate_cca(rank_a: int, rank_b: int, n: int) -> None:
    """CCA with rank_a + rank_b >= n - 1 has canonical correlations forced to 1 by the
    sample size alone (e.g. inverted data sets smaller than the widths): say so."""
    if rank_a + rank_b >= n - 1:
        warnings.warn(
            f"CCA on n={n} examples with ranks {rank_a} and {rank_b}: with rank_a + rank_b "
            ">= n - 1 some canonical correlations are 1 whatever the data (CCA overfits). "
            "Use more examples than dimensions, SVCCA, or a measure without whitening.",
            stacklevel=3,
        )


def _cka(c: CentredMoments, a: int, b: int, *, debiased: bool) -> float:
    def h(i: int, j: int) -> float:
        cross = torch.linalg.matrix_norm(c.cov(i, j)) ** 2
        r2, r1 = c.R2[i, j], c.R1
        return float(hsic_from_moments(cross, r2, r1[i], r1[j], c.n, debiased=debiased))

    return cka_ratio(h(a, b), h(a, a), h(b, b))


def linear_cka(c: CentredMoments, a: int, b: int) -> float:
    return _cka(c, a, b, debiased=False)


def debiased_cka(c: CentredMoments, a: int, b: int) -> float:
    return _cka(c, a, b, debiased=True)


def procrustes(c: CentredMoments, a: int, b: int) -> float:
    cov = c.cov(a, b)
    if a == b:  # a scatter matrix: its nuclear norm is its trace
        nuclear = torch.trace(cov)
    else:  # singular values from the smaller Gram matrix's eigenvalues
        small = cov @ cov.T if cov.shape[0] <= cov.shape[1] else cov.T @ cov
        nuclear = torch.linalg.eigvalsh(small).clamp(min=0).sqrt().sum()
    return float(nuclear / (torch.trace(c.cov(a, a)) * torch.trace(c.cov(b, b))).sqrt())


def mean_cca(c: CentredMoments, a: int, b: int) -> float:
    return float(c.canonical(a, b)[0].mean())


def svcca(c: CentredMoments, a: int, b: int) -> float:
    return float(c.canonical(a, b, keep="svcca", directions=False)[0].mean())


def pwcca(c: CentredMoments, a: int, b: int) -> float:
    rho, u = c.canonical(a, b)
    # canonical variates h_i = X_c W_a u_i; their inner products with X's neurons are
    # the columns of G_aa W_a U (Morcos et al. 2018's weights, from moments)
    alpha = (c.loadings(a) @ u).abs().sum(dim=0)
    return float((alpha * rho).sum() / alpha.sum())


def linreg_r2(c: CentredMoments, a: int, b: int) -> float:
    wa = c.whitener(a)
    return float(torch.linalg.matrix_norm(wa.T @ c.cov(a, b)) ** 2 / torch.trace(c.cov(b, b)))
