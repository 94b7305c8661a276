"""Exact linear CKA between many views (every layer of every model) from Gram tiles.

A layer can be far wider than the example count (an early convolution of a ResNet is
64 x 56 x 56 = 200,704 features), so neither its d x d cross-moments nor its n x d
representation need fit in memory. :class:`GramTiles` never forms either: it sums, over
tiles of example pairs (i in a held block, j in a batch), the statistics that linear
HSIC needs for every pair of views u, v:

- ``P[u, v] = sum_ij K_u[i, j] K_v[i, j]`` (one (V, V) matmul per tile),
- each view's Gram row sums ``r_u[i] = sum_j K_u[i, j]`` and diagonal ``K_u[i, i]``,

where ``K_u = (X_u - s_u)(X_u - s_u)^T`` on features shifted by a fixed per-view shift
(the first batch's mean: post-ReLU means are many standard deviations, and unshifted
sums would cancel catastrophically). Then, exactly (the ``H`` of centring, ``~`` the
zero diagonal, ``S`` the sum of all entries):

- biased:   ``<H K_u H, H K_v H> = P - 2/n r_u.r_v + S_u S_v / n^2``, over ``(n - 1)^2``;
- debiased: ``[P~ + S~_u S~_v / ((n-1)(n-2)) - 2/(n-2) r~_u.r~_v] / (n (n-3))``
  (Song et al. 2012), with ``P~ = P - sum_i K_u[i,i] K_v[i,i]``, ``r~ = r - diag``.

Both are invariant to the shift, so they equal :func:`invsim.linear_cka` on the full
data (to ~1e-10 in float64). The state is a sum over tiles: tiles split across passes
and processes add up (the accumulator contract of :mod:`invsim.similarity.accumulator`).

Examples:
    >>> import torch
    >>> from invsim import linear_cka
    >>> from invsim.similarity.layerwise import GramTiles
    >>> g = torch.Generator().manual_seed(0)
    >>> X = 5 + torch.randn(40, 30, generator=g, dtype=torch.float64)
    >>> Y = X[:, :4] ** 2 + torch.randn(40, 4, generator=g, dtype=torch.float64)
    >>> acc = GramTiles(40, shifts=[X[:8].mean(0), Y[:8].mean(0)])
    >>> for start in range(0, 40, 20):  # held blocks of 20 examples, batches of 10
    ...     held = [X[start:start + 20], Y[start:start + 20]]
    ...     for j in range(start, 40, 10):
    ...         acc.update(held, start, [X[j:j + 10], Y[j:j + 10]], j)
    >>> abs(float(acc.compute()[0, 1]) - linear_cka(X, Y)) < 1e-10
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from invsim.similarity._inputs import check_enough
from invsim.similarity.accumulator import Accumulator
from invsim.similarity.core import centre_gram, cka_ratio_matrix, hsic_from_sums

__all__ = ["GramTiles", "minibatch_hsic"]


class GramTiles(Accumulator):
    """Linear HSIC between V views of n examples, accumulated from Gram tiles.

    ``update(held, i0, batch, j0)`` adds the tile of example pairs (i, j), i in the held
    block starting at ``i0``, j in the batch starting at ``j0``. A tile with
    ``j0 >= i0 + len(held)`` lies above the diagonal and also stands for its transpose;
    a batch inside the held block adds only its own columns. Every unordered example pair
    must be added once (see :func:`invsim.experiment.layers.plan_passes` for a schedule).
    """

    def __init__(
        self,
        n: int,
        *,
        shifts: Sequence[torch.Tensor],
        product_dtype: torch.dtype = torch.float64,
        groups: int = 1,
    ) -> None:
        self.n = n
        self.shifts = [s.detach().to(torch.float64).flatten() for s in shifts]
        self.product_dtype = product_dtype
        self.groups = max(1, min(groups, n))
        g = self.groups
        # example i is in group g when bounds[g] <= i < bounds[g + 1] (contiguous groups)
        self.bounds = [round(k * n / g) for k in range(g + 1)]
        self.reset()

    def reset(self) -> None:
        v, g, n = len(self.shifts), self.groups, self.n
        self.E = torch.zeros(g, g, v, v, dtype=torch.float64)  # P split by (group i, group j)
        self.R = torch.zeros(v, n, g, dtype=torch.float64)  # row sums split by group of j
        self.diag = torch.zeros(v, n, dtype=torch.float64)

    @property
    def views(self) -> int:
        return len(self.shifts)

    @property
    def P(self) -> torch.Tensor:
        """(V, V): sum over all example pairs of K_u[i, j] K_v[i, j]."""
        return self.E.sum(dim=(0, 1))

    @property
    def rows(self) -> torch.Tensor:
        """(V, n): each view's Gram row sums."""
        return self.R.sum(dim=2)

    def _segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(group, first, last) local ranges of [start, stop) that lie in one group each."""
        out, b = [], self.bounds
        g = max(k for k in range(self.groups) if b[k] <= start)
        i = start
        while i < stop:
            end = min(stop, b[g + 1])
            if end > i:
                out.append((g, i - start, end - start))
            i, g = end, g + 1
        return out

    def shifted(
        self, views: Sequence[torch.Tensor], *, inplace: bool = False
    ) -> list[torch.Tensor]:
        """``views`` minus the shift, in the product dtype (float64: exact). With
        ``inplace``, float64 views are shifted where they are (the caller's own copies)."""
        out = []
        for v, s in zip(views, self.shifts, strict=True):
            s = s.to(v.device)
            x = v.sub_(s) if inplace and v.dtype == torch.float64 else v.to(torch.float64) - s
            out.append(x.to(self.product_dtype))
        return out

    def update(
        self,
        held: Sequence[torch.Tensor],
        i0: int,
        batch: Sequence[torch.Tensor],
        j0: int,
        *,
        shifted: bool = False,
    ) -> None:
        """Add the tile (held block at ``i0``) x (batch at ``j0``); ``shifted`` says both
        are already shifted (:meth:`shifted`), as the features kept for a pass are."""
        a, b = (list(held), list(batch)) if shifted else (self.shifted(held), self.shifted(batch))
        m, w = a[0].shape[0], b[0].shape[0]
        inside = i0 <= j0 and j0 + w <= i0 + m
        if not inside and j0 < i0 + m:
            raise ValueError(f"batch [{j0}, {j0 + w}) straddles the held block [{i0}, {i0 + m}).")
        tiles = torch.stack([x @ y.T for x, y in zip(a, b, strict=True)]).to(torch.float64)
        v = self.views
        for gc, c0, c1 in self._segments(j0, j0 + w):
            part = tiles[:, :, c0:c1]
            self.R[:, i0 : i0 + m, gc] += part.sum(dim=2)
            for gr, r0, r1 in self._segments(i0, i0 + m):
                flat = part[:, r0:r1].reshape(v, -1)
                prod = flat @ flat.T
                self.E[gr, gc] += prod
                if not inside:  # the transposed tile: pairs (j, i)
                    self.E[gc, gr] += prod
                    self.R[:, j0 + c0 : j0 + c1, gr] += part[:, r0:r1].sum(dim=1)
        if inside:
            k = j0 - i0
            self.diag[:, j0 : j0 + w] += tiles[:, k : k + w].diagonal(dim1=1, dim2=2)

    def _check_mergeable(self, other: Accumulator) -> None:
        """Tiles add up over the same n, shifts and groups."""
        super()._check_mergeable(other)
        assert isinstance(other, GramTiles)
        if (other.n, other.views, other.groups) != (self.n, self.views, self.groups):
            raise ValueError(
                f"cannot merge tiles over n={other.n}, {other.views} views, {other.groups} "
                f"groups into n={self.n}, {self.views} views, {self.groups} groups."
            )

    def state_tensors(self) -> list[torch.Tensor]:
        """The state, for an all-reduce (sum) across processes that share the shifts."""
        return [self.E, self.R, self.diag]

    def hsic(self, *, debiased: bool = False) -> torch.Tensor:
        """(V, V) linear HSIC between the views: biased over ``(n-1)^2``, or Song et al.'s
        unbiased estimator over ``n(n-3)``."""
        check_enough(self.n, debiased=debiased)
        return _hsic(self.P, self.rows, self.diag, self.n, debiased)

    def hsic_without(self, group: int, *, debiased: bool = False) -> torch.Tensor:
        """(V, V) linear HSIC of the examples outside ``group`` (the grouped jackknife)."""
        lo, hi = self.bounds[group], self.bounds[group + 1]
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[lo:hi] = False
        e = self.E
        p = self.P - e[group].sum(dim=0) - e[:, group].sum(dim=0) + e[group, group]
        rows = (self.rows - self.R[:, :, group])[:, keep]
        return _hsic(p, rows, self.diag[:, keep], int(keep.sum()), debiased)

    def compute(self, *, debiased: bool = False) -> torch.Tensor:
        """(V, V) linear CKA between the views (NaN where a view has zero variance)."""
        return cka_ratio_matrix(self.hsic(debiased=debiased))

    def jackknife(self, *, debiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, standard error), each (V, V): CKA on all examples and the grouped
        (delete-one-group) jackknife's standard error, over :attr:`groups` groups."""
        g = self.groups
        if g < 2:
            raise ValueError("the jackknife needs groups >= 2 (GramTiles(..., groups=k)).")
        parts = torch.stack(
            [cka_ratio_matrix(self.hsic_without(k, debiased=debiased)) for k in range(g)]
        )
        spread = ((parts - parts.mean(dim=0)) ** 2).sum(dim=0)
        return self.compute(debiased=debiased), ((g - 1) / g * spread).sqrt()

    def null_mean(self) -> torch.Tensor:
        """(V, V): the exact mean of biased linear CKA over all permutations of one side's
        examples, ``tr A tr B / ((n - 1) ||A|| ||B||)`` for the centred Gram matrices: the
        value expected of unrelated representations at this n and these widths."""
        n, r, d = self.n, self.rows, self.diag
        trace = d.sum(dim=1) - r.sum(dim=1) / n  # tr(H K H)
        norm = (self.hsic(debiased=False).diagonal().clamp(min=0)).sqrt() * (n - 1)
        return torch.outer(trace, trace) / ((n - 1) * torch.outer(norm, norm))


def _hsic(p: torch.Tensor, r: torch.Tensor, d: torch.Tensor, n: int, debiased: bool):
    """(V, V) HSIC from P, the row sums ``r`` (V, n) and diagonals ``d`` (V, n)."""
    if debiased:  # the zero-diagonal matrices
        p, r = p - d @ d.T, r - d
    s = r.sum(dim=1)
    return hsic_from_sums(p, r @ r.T, s[:, None], s[None, :], n, debiased=debiased)


def minibatch_hsic(
    views: Sequence[torch.Tensor], *, product_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(V, V) unbiased HSIC of one batch's views (Nguyen et al. 2021's minibatch CKA sums
    these over batches): U-centred Gram matrices in float64, one matmul for all pairs.
    ``product_dtype=torch.float32`` forms each Gram in float32 from the column-centred
    batch (well conditioned; ~1e-7)."""
    m = views[0].shape[0]
    if m <= 3:
        raise ValueError(
            f"minibatch CKA uses the unbiased HSIC, which needs batches of n >= 4; got a "
            f"batch of n={m}. Use larger batches or drop the last one (drop_last=True)."
        )
    grams = []
    for v in views:
        if product_dtype == torch.float64:
            x = v.to(torch.float64)
            x = x - x.mean(dim=0)
        else:  # centred in the low dtype (U-centring removes the means exactly; centring
            # first only conditions the product): one copy, no float64 batch
            x = v.to(product_dtype)
            x = x - x.mean(dim=0)
        grams.append(centre_gram((x @ x.T).to(torch.float64), debiased=True).reshape(-1))
    flat = torch.stack(grams)
    return hsic_from_sums(flat @ flat.T, 0.0, 0.0, 0.0, m, debiased=True)
