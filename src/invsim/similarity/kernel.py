"""RBF CKA, blockwise: memory O(block x n) instead of the two n x n Gram matrices.

The value is Kornblith et al.'s RBF CKA exactly as :func:`invsim.kernel_cka` defines
it (bandwidth ``sigma^2 = threshold^2 * median`` of the squared distances over the full
n x n matrix, diagonal zeros included, numpy's median). Everything is computed from
blocks of rows of the distance matrix, recomputed on each pass:

- the median by exact selection: a histogram of the squared distances, then the values
  in the bins that hold the middle rank(s), sorted (refining those bins first while they
  hold more than ``COLLECT`` values);
- HSIC from sums the centring needs: ``sum K*L``, the row sums of K and L, and (for the
  unbiased estimator) their diagonals. ``tr(K H L H) = sum K*L - 2/n k.l + (1'k)(1'l)/n^2``
  with row sums ``k``, ``l``; the unbiased form is Song et al.'s, with the diagonal removed.

Examples:
    >>> import torch
    >>> from invsim.similarity.kernel import rbf_cka
    >>> X = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    >>> round(rbf_cka(X, X, block=64), 6), round(rbf_cka(X, 3 * X + 1), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from invsim.similarity._inputs import ArrayLike, as_matrix, check_not_constant, check_pair
from invsim.similarity.core import cka_ratio, distance_blocks, hsic_from_sums

__all__ = ["distance_blocks", "median_sq_distance", "rbf_cka"]

BINS = 4096
COLLECT = 1 << 20  # the most values sorted at once when selecting the median


def median_sq_distance(x: torch.Tensor, *, block: int | None = None) -> float:
    """numpy's median of all n^2 squared distances between the rows of centred float64
    ``x`` (the diagonal zeros included), by exact selection over blocks: histogram the
    values in a range, keep the bins that hold the middle ranks, repeat until few enough
    values remain to sort. Bins are assigned by comparison with their edges only, so a
    value's bin never depends on rounding."""
    n = x.shape[0]
    ranks = [(n * n - 1) // 2, n * n // 2]  # numpy: the mean of these two (equal if odd)
    lo, hi = 0.0, 4.0 * float((x * x).sum(dim=1).max())  # |xi - xj|^2 <= 4 max |x|^2
    closed, below = True, 0  # range [lo, hi] or [lo, hi); values under lo
    while True:
        edges = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)
        edges[0], edges[-1] = lo, hi
        counts = torch.zeros(BINS, dtype=torch.int64)
        vmin, vmax = float("inf"), float("-inf")
        for inside in _in_range(x, block, lo, hi, closed):
            if inside.numel():
                vmin, vmax = min(vmin, float(inside.min())), max(vmax, float(inside.max()))
            counts += torch.bincount(
                torch.bucketize(inside, edges[1:-1], right=True), minlength=BINS
            )
        if vmin == vmax:  # every value left is the same: it is the median
            return vmin
        cum = below + torch.cumsum(counts, 0)
        first, last = (int(torch.searchsorted(cum, r, right=True)) for r in ranks)
        start = int(cum[first - 1]) if first > 0 else below
        new = (float(edges[first]), float(edges[last + 1]), closed and last == BINS - 1)
        if int(cum[last]) - start <= COLLECT or new == (lo, hi, closed):
            values = torch.sort(torch.cat(list(_in_range(x, block, *new)))).values
            return float(sum(values[r - start] for r in ranks) / 2)
        (lo, hi, closed), below = new, start


def _in_range(x, block, lo: float, hi: float, closed: bool) -> Iterator[torch.Tensor]:
    """The squared distances in [lo, hi] (``closed``) or [lo, hi), block by block."""
    for _, d in distance_blocks(x, block):
        yield d[(d >= lo) & ((d <= hi) if closed else (d < hi))]


def _sums(x: torch.Tensor, y: torch.Tensor, sx: float, sy: float, block: int | None):
    """sum K*L, sum K*K, sum L*L and the row sums of K and L, blockwise."""
    n = x.shape[0]
    kl = kk = ll = 0.0
    k_rows, l_rows = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for (start, dx), (_, dy) in zip(
        distance_blocks(x, block), distance_blocks(y, block), strict=True
    ):
        k, l = torch.exp(-dx / sx), torch.exp(-dy / sy)  # noqa: E741
        kl, kk, ll = kl + float((k * l).sum()), kk + float((k * k).sum()), ll + float((l * l).sum())
        k_rows[start : start + len(k)], l_rows[start : start + len(l)] = k.sum(1), l.sum(1)
    return kl, kk, ll, k_rows, l_rows


def _hsic(dot: float, a: torch.Tensor, b: torch.Tensor, n: int, debiased: bool) -> float:
    """HSIC (up to a factor common to the CKA ratio) of two RBF Gram matrices (unit
    diagonal) from sum K*L (``dot``) and their row sums ``a``, ``b``."""
    if debiased:  # the zero-diagonal matrices: row sums less 1, sum K*L less n
        a, b, dot = a - 1.0, b - 1.0, dot - n
    return hsic_from_sums(dot, float(a @ b), float(a.sum()), float(b.sum()), n, debiased=debiased)


def rbf_cka(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    threshold: float = 1.0,
    debiased: bool = False,
    block: int | None = None,
) -> float:
    """RBF CKA (Kornblith et al.'s bandwidth; see the module doc) in O(block x n)
    memory; ``block`` rows of the distance matrices at a time (default: about four
    million distances)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0; got {threshold}.")
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_pair(x, y, debiased=debiased)
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)  # distances are translation-free
    scales = []
    for name, v in (("X", x), ("Y", y)):
        median = median_sq_distance(v, block=block)
        if median <= 0:
            raise ValueError(
                f"the median squared distance between the examples of {name} is 0 (more than "
                "half the pairs are identical), so the RBF bandwidth is undefined; use a linear "
                "measure or more diverse examples."
            )
        scales.append(2.0 * threshold**2 * median)
    n = x.shape[0]
    kl, kk, ll, k_rows, l_rows = _sums(x, y, scales[0], scales[1], block)
    hxy = _hsic(kl, k_rows, l_rows, n, debiased)
    hxx, hyy = _hsic(kk, k_rows, k_rows, n, debiased), _hsic(ll, l_rows, l_rows, n, debiased)
    return cka_ratio(hxy, hxx, hyy)
