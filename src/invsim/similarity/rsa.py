"""Representational similarity analysis: the Spearman correlation of the two
representational dissimilarity matrices (Euclidean distances between examples, upper
triangle). Memory is O(n^2): n(n-1)/2 distances per representation (n = 10,000 needs
about 1.2 GB); subsample examples beyond that.

Examples:
    >>> import torch
    >>> from invsim.similarity.rsa import rsa
    >>> X = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    >>> round(rsa(X, 5 * X + 2), 6)
    1.0
"""

from __future__ import annotations

import numpy as np
import torch

from invsim.similarity._inputs import ArrayLike, as_matrix, check_not_constant, check_pair
from invsim.similarity.registry import Measure, register

__all__ = ["rdm", "rsa"]


def rdm(x: torch.Tensor) -> torch.Tensor:
    """Condensed Euclidean RDM: the n(n-1)/2 pairwise distances, row-major upper triangle."""
    return torch.pdist(x - x.mean(dim=0, keepdim=True))


def rsa(X: ArrayLike, Y: ArrayLike) -> float:
    """Spearman correlation of the Euclidean RDMs of X and Y."""
    from scipy.stats import rankdata

    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_pair(x, y, debiased=False)
    if x.shape[0] < 3:
        raise ValueError(f"RSA needs at least 3 examples (2 distances); got n={x.shape[0]}.")
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    rx, ry = (rankdata(rdm(t).numpy()) for t in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))


register(
    Measure(
        "rsa",
        rsa,
        (-1.0, 1.0),
        invariances=frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"}),
        description="Spearman correlation of Euclidean RDMs",
    )
)
