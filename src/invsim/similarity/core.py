"""The one home of CKA's building blocks: centring, Gram matrices, HSIC and the CKA ratio.

The functional, streaming, null and calibration code all use these; none defines its
own. Every value is float64.

Example:
    >>> import torch
    >>> from invsim.similarity.core import center_gram, cka_ratio, gram_linear, hsic
    >>> x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> k = center_gram(gram_linear(x))
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
    "center_gram",
    "distance_blocks",
    "centred",
    "centred_gram",
    "cka_ratio",
    "cka_ratio_matrix",
    "double_centre",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_from_moments",
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


def center_gram(gram: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Double-centre a Gram matrix, or U-centre it when ``unbiased``.

    U-centring (Szekely & Rizzo 2014) zeroes the diagonal and, off the diagonal, sets
    ``K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` with row sums ``r`` and total ``s``
    of the zero-diagonal matrix. ``<U(K), U(L)> / (n(n-3))`` is the unbiased HSIC.
    """
    n = gram.shape[0]
    g = gram.to(torch.float64).clone()
    if not unbiased:
        row = g.mean(dim=1, keepdim=True)
        col = g.mean(dim=0, keepdim=True)
        return g - row - col + g.mean()
    g.fill_diagonal_(0.0)
    row = g.sum(dim=1) / (n - 2)
    col = g.sum(dim=0) / (n - 2)
    total = g.sum() / ((n - 1) * (n - 2))
    g = g - row[:, None] - col[None, :] + total
    g.fill_diagonal_(0.0)
    return g


def double_centre(gram: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``gram`` as a new float64 tensor with every row and column summing to zero."""
    a = torch.as_tensor(gram).to(torch.float64, copy=True)
    rows, cols, total = a.mean(1), a.mean(0), a.mean()
    a -= cols
    a -= rows[:, None]
    a += total
    return a


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """The float64 doubly centred linear Gram matrix of ``x`` (n, ...)."""
    x = centred(x)
    return x @ x.T


def hsic(k_centered: torch.Tensor, l_centered: torch.Tensor, *, debiased: bool = False) -> float:
    """HSIC from two already centred (or U-centred, when ``debiased``) Gram matrices."""
    n = k_centered.shape[0]
    dot = float((k_centered * l_centered).sum())
    return dot / (n * (n - 3)) if debiased else dot / ((n - 1) ** 2)


def hsic_from_moments(cross_sq, r_ab, r_a, r_b, n: int, *, debiased: bool):
    """Linear HSIC from the feature-space moments of *column-centred* data.

    ``cross_sq = ||X_a^T X_b||_F^2``, ``r_ab = sum_i ||x_ai||^2 ||x_bi||^2``,
    ``r_a = sum_i ||x_ai||^2``. The debiased form is Song et al.'s estimator written
    in feature space (it needs no n x n matrix); the ``n(n-3)`` factor is applied with
    explicit parentheses. The arguments may be floats or broadcastable tensors.
    """
    if not debiased:
        return cross_sq / ((n - 1) ** 2)
    value = cross_sq - r_ab * n / (n - 2) + r_a * r_b / ((n - 1) * (n - 2))
    return value / (n * (n - 3))


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
