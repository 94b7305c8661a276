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
and processes add up (``merge``, ``state_tensors`` for an all-reduce).

Example:
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
    ...         acc.add_tile(held, start, [X[j:j + 10], Y[j:j + 10]], j)
    >>> abs(float(acc.cka()[0, 1]) - linear_cka(X, Y)) < 1e-10
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from invsim.similarity._inputs import check_enough

__all__ = ["GramTiles", "minibatch_hsic"]


class GramTiles:
    """Linear HSIC between V views of n examples, accumulated from Gram tiles.

    ``add_tile(held, i0, batch, j0)`` adds the tile of example pairs (i, j), i in the held
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
    ) -> None:
        self.n = n
        self.shifts = [s.detach().to(torch.float64).flatten() for s in shifts]
        self.product_dtype = product_dtype
        v = len(self.shifts)
        self.P = torch.zeros(v, v, dtype=torch.float64)
        self.rows = torch.zeros(v, n, dtype=torch.float64)
        self.diag = torch.zeros(v, n, dtype=torch.float64)

    @property
    def views(self) -> int:
        return len(self.shifts)

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

    def add_tile(
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
        flat = tiles.reshape(self.views, -1)
        self.P += (1.0 if inside else 2.0) * (flat @ flat.T)
        self.rows[:, i0 : i0 + m] += tiles.sum(dim=2)
        if inside:
            k = j0 - i0
            self.diag[:, j0 : j0 + w] += tiles[:, k : k + w].diagonal(dim1=1, dim2=2)
        else:
            self.rows[:, j0 : j0 + w] += tiles.sum(dim=1)

    def merge(self, other: GramTiles) -> GramTiles:
        """Add another accumulator's tiles (same n and shifts). Returns self."""
        if other.n != self.n or other.views != self.views:
            raise ValueError(
                f"cannot merge tiles over n={other.n}, {other.views} views into n={self.n}, "
                f"{self.views} views."
            )
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine += theirs
        return self

    def state_tensors(self) -> list[torch.Tensor]:
        """The state, for an all-reduce (sum) across processes that share the shifts."""
        return [self.P, self.rows, self.diag]

    def hsic(self, *, debiased: bool = False) -> torch.Tensor:
        """(V, V) linear HSIC between the views: biased over ``(n-1)^2``, or Song et al.'s
        unbiased estimator over ``n(n-3)``."""
        n = self.n
        check_enough(n, debiased=debiased)
        r, d = self.rows, self.diag
        if not debiased:
            s = r.sum(dim=1)
            return (self.P - 2.0 / n * (r @ r.T) + torch.outer(s, s) / n**2) / (n - 1) ** 2
        rt = r - d
        st = rt.sum(dim=1)
        pt = self.P - d @ d.T
        value = pt + torch.outer(st, st) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rt @ rt.T)
        return value / (n * (n - 3))

    def cka(self, *, debiased: bool = False) -> torch.Tensor:
        """(V, V) linear CKA between the views (NaN where a view has zero variance)."""
        h = self.hsic(debiased=debiased)
        scale = h.diagonal().clamp(min=0).sqrt()
        with torch.no_grad():
            out = h / torch.outer(scale, scale)
        out[(scale == 0)[:, None] | (scale == 0)[None, :]] = float("nan")
        return out


def minibatch_hsic(
    views: Sequence[torch.Tensor], *, product_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(V, V) unbiased HSIC of one batch's views (Nguyen et al. 2021's minibatch CKA sums
    these over batches): U-centred Gram matrices in float64, one matmul for all pairs.
    ``product_dtype=torch.float32`` forms each Gram in float32 from the column-centred
    batch (well conditioned; ~1e-7)."""
    from invsim.similarity.core import center_gram

    m = views[0].shape[0]
    if m <= 3:
        raise ValueError(f"minibatch CKA needs batches of n >= 4; got a batch of n={m}.")
    grams = []
    for v in views:
        x = v.to(torch.float64)
        x = (x - x.mean(dim=0)).to(product_dtype)
        grams.append(center_gram((x @ x.T).to(torch.float64), unbiased=True).reshape(-1))
    flat = torch.stack(grams)
    return flat @ flat.T / (m * (m - 3))
