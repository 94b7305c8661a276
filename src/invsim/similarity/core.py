"""The one home of CKA's building blocks: centring, Gram matrices, HSIC and the CKA ratio.

The functional, streaming, null and calibration code all use these; none defines its
own. Every value is float64.

Examples:
    >>> import torch
    >>> from invsim.similarity.core import centre_gram, cka_ratio, gram_linear, hsic
    >>> x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> k = centre_gram(gram_linear(x))
    >>> cka_ratio(hsic(k, k), hsic(k, k), hsic(k, k))
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

BLOCK_ELEMENTS = 1 << 22  # squared distances per block: 32 MB of float64

__all__ = [
    "distance_blocks",
    "centre_gram",
    "centred",
    "cka_ratio",
    "cka_ratio_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_from_moments",
    "hsic_from_sums",
]


def centred(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x`` (n, ...) flattened per example, in float64 on the CPU, column-centred."""
    x = torch.as_tensor(x).reshape(len(x), -1).to("cpu", torch.float64)
    return x - x.mean(0)


def distance_blocks(x: torch.Tensor, block: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows start:start+b of the squared-distance matrix of centred x), with
    ``block`` rows at a time (default: about ``BLOCK_ELEMENTS`` distances)."""
    n = x.shape[0]
    block = block or max(1, BLOCK_ELEMENTS // n)
    sq = (x * x).sum(dim=1)
    for start in range(0, n, block):
        rows = x[start : start + block]
        d = (sq[start : start + block, None] + sq[None, :] - 2.0 * (rows @ x.T)).clamp_min_(0)
        d[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = 0.0
        yield start, d


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X X^T`` (n, n)."""
    return x @ x.T


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram matrix with Kornblith et al.'s bandwidth convention.

    ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` with
    ``sigma^2 = threshold^2 * median(||x_i - x_j||^2)``, the median taken over the full
    n x n matrix of squared distances (diagonal zeros included), as in Kornblith et al.'s
    reference code. Other tools use the median distance (not squared) or exclude the
    diagonal; their values differ.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0; got {threshold}.")
    x = x - x.mean(dim=0, keepdim=True)  # distances are translation-free; avoids cancellation
    _, sq_dist = next(distance_blocks(x, len(x)))  # all rows in one block
    # numpy's median (mean of the two middle values), as in the reference code.
    median = float(np.median(sq_dist.cpu().numpy()))
    if median <= 0:
        raise ValueError(
            "the median squared distance between examples is 0 (more than half the pairs are "
            "identical), so the RBF bandwidth is undefined; use kernel='linear' or more "
            "diverse examples."
        )
    return torch.exp(-sq_dist / (2.0 * threshold**2 * median))


def centre_gram(gram: torch.Tensor | np.ndarray, *, debiased: bool = False) -> torch.Tensor:
    """The one centring of a Gram matrix, as a new float64 tensor: double-centred
    (``H K H``, every row and column summing to zero), or U-centred when ``debiased``.

    U-centring (Szekely & Rizzo 2014) zeroes the diagonal and, off the diagonal, sets
    ``K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` with row sums ``r`` and total ``s``
    of the zero-diagonal matrix. Features are centred by :func:`centred`; the linear Gram
    matrix of centred features is already double-centred.

    Examples:
        >>> import torch
        >>> k = centre_gram(torch.rand(6, 6, dtype=torch.float64))
        >>> bool(k.sum(dim=0).abs().max() < 1e-12)
        True
    """
    g = torch.as_tensor(gram).to(torch.float64, copy=True)
    n = g.shape[0]
    if debiased:
        g.fill_diagonal_(0.0)
        rows, cols, total = g.sum(1) / (n - 2), g.sum(0) / (n - 2), g.sum() / ((n - 1) * (n - 2))
    else:
        rows, cols, total = g.mean(1), g.mean(0), g.mean()
    g -= cols  # in place: one n x n copy in all
    g -= rows[:, None]
    g += total
    if debiased:
        g.fill_diagonal_(0.0)
    return g


def hsic_from_sums(p, rows, total_k, total_l, n: int, *, debiased: bool):
    """The one HSIC formula, from sums of two Gram matrices K, L of n examples.

    ``p = sum_ij K_ij L_ij``, ``rows = sum_i (K 1)_i (L 1)_i``, ``total_k = 1'K1``,
    ``total_l = 1'L1``. Biased (full K, L): ``<HKH, HLH> / (n-1)^2 =
    [p - 2 rows / n + total_k total_l / n^2] / (n-1)^2``. Debiased (Song et al. 2012;
    the sums of the zero-diagonal K, L): ``[p + total_k total_l / ((n-1)(n-2))
    - 2 rows / (n-2)] / (n (n-3))``, the ``n(n-3)`` in explicit parentheses. Every form
    (features, Gram matrices, tiles, kernels, the jackknife) calls this. The arguments
    may be floats or broadcastable tensors (a matrix of view pairs at once).

    Examples:
        >>> round(hsic_from_sums(8.0, 0.0, 0.0, 0.0, 5, debiased=False), 6)
        0.5
    """
    if debiased:
        value = p + total_k * total_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows
        return value / (n * (n - 3))
    return (p - 2.0 / n * rows + total_k * total_l / n**2) / (n - 1) ** 2


def hsic(k_centred: torch.Tensor, l_centred: torch.Tensor, *, debiased: bool = False) -> float:
    """HSIC from two Gram matrices already centred by :func:`centre_gram` (with the same
    ``debiased``): their rows and totals are zero, so only ``p`` remains."""
    p = float((k_centred * l_centred).sum())
    return float(hsic_from_sums(p, 0.0, 0.0, 0.0, k_centred.shape[0], debiased=debiased))


def hsic_from_moments(cross_sq, r_ab, r_a, r_b, n: int, *, debiased: bool):
    """Linear HSIC from the feature-space moments of *column-centred* data.

    ``cross_sq = ||X_a^T X_b||_F^2``, ``r_ab = sum_i ||x_ai||^2 ||x_bi||^2``,
    ``r_a = sum_i ||x_ai||^2``. Centred data have zero Gram row sums, so the
    zero-diagonal Gram matrices have ``p = cross_sq - r_ab``, row sums ``-||x_i||^2``
    and totals ``-r_a``: :func:`hsic_from_sums` in feature space, no n x n matrix.
    """
    if not debiased:
        return hsic_from_sums(cross_sq, 0.0, 0.0, 0.0, n, debiased=False)
    return hsic_from_sums(cross_sq - r_ab, r_ab, -r_a, -r_b, n, debiased=True)


def cka_ratio(hxy: float, hxx: float, hyy: float) -> float:
    """HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)), with a clear error where a self-HSIC is
    not positive."""
    if hxx <= 0 or hyy <= 0:
        side = "X" if hxx <= 0 else "Y"
        raise ValueError(
            f"the (debiased) HSIC of {side} with itself is {min(hxx, hyy):.3g} <= 0, so CKA is "
            "undefined; this happens with very few examples. Use more examples or debiased=False."
        )
    return hxy / math.sqrt(hxx * hyy)


def cka_ratio_matrix(h: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
    """CKA between every pair from a (k, k) HSIC matrix. A view whose self-HSIC is not
    positive (a constant representation, or too few examples for the debiased estimator)
    is an error naming it, or, with ``names=None``, NaN in its row and column."""
    diag = torch.diagonal(h)
    for name, v in zip(names, diag.tolist(), strict=True) if names is not None else ():
        if v <= 0:
            raise ValueError(
                f"the HSIC of {name} with itself is {v:.3g} <= 0, so CKA is undefined (a constant "
                "representation, or too few examples for the debiased estimator)."
            )
    positive = diag.clamp(min=0)
    out = h / torch.sqrt(torch.outer(positive, positive))
    bad = positive == 0
    out[bad[:, None] | bad[None, :]] = float("nan")
    return out
