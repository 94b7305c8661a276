"""Neighbourhood measures, computed blockwise (memory O(block x n), never n x n):

- ``mutual_knn``: Huh et al. (2024)'s mutual k-nearest-neighbour alignment, the mean
  over examples of |N_X(i) ∩ N_Y(i)| / k, with cosine neighbours (rows L2-normalised, as
  in their code);
- ``knn_jaccard``: the mean Jaccard index |N_X(i) ∩ N_Y(i)| / |N_X(i) ∪ N_Y(i)| of
  Euclidean k-nearest-neighbour sets (Klabunde et al.'s ReSi).

An example is never its own neighbour. Ties are broken by index.

Examples:
    >>> import torch
    >>> from invsim.similarity.neighbors import knn_jaccard, mutual_knn
    >>> X = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    >>> mutual_knn(X, 3 * X, k=5), knn_jaccard(X, X + 1, k=5)
    (1.0, 1.0)
"""

from __future__ import annotations

import torch

from invsim.similarity._inputs import ArrayLike, as_matrix, check_pair
from invsim.similarity.registry import Measure, register

__all__ = ["knn", "knn_jaccard", "mutual_knn"]


def knn(x: torch.Tensor, k: int, *, metric: str = "euclidean", block: int = 1024) -> torch.Tensor:
    """Indices (n, k) of each row's k nearest other rows, computed ``block`` rows at a time."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} nearest neighbours need 1 <= k < n; got n={n}. Use a smaller k.")
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    elif metric == "euclidean":
        x = x - x.mean(dim=0, keepdim=True)  # distances are translation-free; less cancellation
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean'; got {metric!r}.")
    sq = (x * x).sum(dim=1)
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        score = x[rows] @ x.T  # larger = nearer
        if metric == "euclidean":
            score = 2 * score - sq[rows, None] - sq[None, :]  # = -||x_i - x_j||^2
        score[torch.arange(score.shape[0]), torch.arange(rows.start, rows.stop)] = -torch.inf
        out[rows] = score.topk(k, dim=1).indices
    return out


def _overlap(X: ArrayLike, Y: ArrayLike, k: int, metric: str) -> torch.Tensor:
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_pair(x, y, debiased=False)
    nx, ny = knn(x, k, metric=metric), knn(y, k, metric=metric)
    return (nx[:, :, None] == ny[:, None, :]).any(dim=2).sum(dim=1).double()


def mutual_knn(X: ArrayLike, Y: ArrayLike, *, k: int = 10, metric: str = "cosine") -> float:
    """Mean fraction of shared k nearest neighbours (Huh et al. 2024)."""
    return float((_overlap(X, Y, k, metric) / k).mean())


def knn_jaccard(X: ArrayLike, Y: ArrayLike, *, k: int = 10, metric: str = "euclidean") -> float:
    """Mean Jaccard index of the k-nearest-neighbour sets."""
    inter = _overlap(X, Y, k, metric)
    return float((inter / (2 * k - inter)).mean())


register(
    Measure(
        "mutual_knn",
        mutual_knn,
        (0.0, 1.0),
        invariances=frozenset({"orthogonal", "isotropic_scaling", "permutation"}),
        description="mutual k-NN alignment, cosine, k=10 (Huh et al. 2024)",
    )
)
register(
    Measure(
        "knn_jaccard",
        knn_jaccard,
        (0.0, 1.0),
        invariances=frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"}),
        description="Jaccard of Euclidean k-NN sets, k=10",
    )
)
