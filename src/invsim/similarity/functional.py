"""The CKA family as plain functions (the functional twins of the accumulators).

Everything is computed in float64, whatever the input dtype.

Definitions (Kornblith et al. 2019): with column-centred X (n, d1) and Y (n, d2),

    linear CKA = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)
               = <Kc, Lc> / (||Kc|| ||Lc||)   with K = X X^T, L = Y Y^T centred.

``debiased=True`` replaces the biased HSIC by the unbiased estimator of Song et al.
(2012), which equals HSIC computed on U-centred Gram matrices. Debiased CKA can be
negative; it is returned as it is.
"""

from __future__ import annotations

import torch

from invsim.similarity import kernel as kernel_module
from invsim.similarity import moments
from invsim.similarity._inputs import ArrayLike, as_matrix, check_not_constant, check_pair
from invsim.similarity.core import (
    centre_gram,
    cka_ratio,
    gram_linear,
    hsic,
    hsic_from_moments,
)
from invsim.similarity.registry import Measure, register

__all__ = ["kernel_cka", "linear_cka", "linear_hsic_matrix"]


def linear_cka(
    X: ArrayLike, Y: ArrayLike, *, debiased: bool = False, method: str = "auto"
) -> float:
    """Linear CKA between two representations of the same ``n`` examples.

    X is (n, d1), Y is (n, d2) (higher ranks are flattened per example), as torch
    tensors or numpy arrays of any float dtype; the computation is float64.
    ``method="auto"`` picks the feature-space form (d x d products, cost ~ n d^2) or the
    Gram form (n x n, cost ~ n^2 d) by whichever is cheaper; both give the same value.

    Examples:
        >>> import torch
        >>> from invsim import linear_cka
        >>> X = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
        >>> round(linear_cka(X, X), 6)
        1.0
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
        >>> abs(linear_cka(X, X.double() @ Q) - 1.0) < 1e-12
        True
    """
    x = as_matrix(X, "X")
    y = as_matrix(Y, "Y")
    check_pair(x, y, debiased=debiased)
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    n, d1 = x.shape
    d2 = y.shape[1]
    if method == "auto":
        feature_cost = n * (d1 * d1 + d2 * d2 + d1 * d2)
        gram_cost = n * n * (d1 + d2)
        method = "feature" if feature_cost <= gram_cost else "gram"
    if method == "gram":
        return _cka_from_grams(gram_linear(x), gram_linear(y), debiased=debiased)
    if method != "feature":
        raise ValueError(f"method must be 'auto', 'feature' or 'gram'; got {method!r}.")
    h = linear_hsic_matrix([x, y], debiased=debiased)
    return cka_ratio(float(h[0, 1]), float(h[0, 0]), float(h[1, 1]))


def linear_hsic_matrix(xs: list[torch.Tensor], *, debiased: bool) -> torch.Tensor:
    """(k, k) linear HSIC between k representations of the same n examples, in feature
    space (d x d products; no n x n matrix). Each is column-centred here."""
    xs = [x - x.mean(dim=0, keepdim=True) for x in xs]
    r = torch.stack([(x * x).sum(dim=1) for x in xs])  # (k, n)
    k = len(xs)
    cross = torch.empty(k, k, dtype=torch.float64)
    for a in range(k):
        for b in range(a, k):
            cross[a, b] = cross[b, a] = torch.linalg.matrix_norm(xs[a].T @ xs[b]) ** 2
    r1 = r.sum(dim=1)
    return hsic_from_moments(
        cross, r @ r.T, r1[:, None], r1[None, :], xs[0].shape[0], debiased=debiased
    )


def _cka_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool) -> float:  # noqa: E741
    kc = centre_gram(k, debiased=debiased)
    lc = centre_gram(l, debiased=debiased)
    return cka_ratio(
        hsic(kc, lc, debiased=debiased),
        hsic(kc, kc, debiased=debiased),
        hsic(lc, lc, debiased=debiased),
    )


def kernel_cka(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    kernel: str = "rbf",
    threshold: float = 1.0,
    debiased: bool = False,
) -> float:
    """Kernel CKA with an RBF (or linear) kernel.

    RBF bandwidth (Kornblith et al. 2019): ``sigma^2 = threshold^2 * median`` of the
    squared pairwise distances, over the full n x n matrix. Note that other tools
    use other conventions (median distance, or a fixed sigma). The RBF form is computed
    blockwise in O(block x n) memory (:func:`invsim.similarity.kernel.rbf_cka`); it
    equals the value from the n x n Gram matrices (``gram_rbf``) to rounding.

    Examples:
        >>> import numpy as np
        >>> from invsim import kernel_cka
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(100, 10))
        >>> round(kernel_cka(X, X, threshold=0.5), 6)
        1.0
    """
    x = as_matrix(X, "X")
    y = as_matrix(Y, "Y")
    check_pair(x, y, debiased=debiased)
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    if kernel == "rbf":  # blockwise, O(block x n) memory
        return kernel_module.rbf_cka(x, y, threshold=threshold, debiased=debiased)
    if kernel != "linear":
        raise ValueError(f"kernel must be 'rbf' or 'linear'; got {kernel!r}.")
    return _cka_from_grams(gram_linear(x), gram_linear(y), debiased=debiased)


def _debiased_cka(X: ArrayLike, Y: ArrayLike) -> float:
    return linear_cka(X, Y, debiased=True)


def _rbf_cka(X: ArrayLike, Y: ArrayLike, *, threshold: float = 1.0) -> float:
    return kernel_cka(X, Y, threshold=threshold)


_CKA_INVARIANT = frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"})
register(
    Measure(
        "linear_cka",
        linear_cka,
        (0.0, 1.0),
        invariances=_CKA_INVARIANT,
        from_moments=moments.linear_cka,
        description="linear CKA (biased HSIC)",
        interval="cka_jackknife",
        exact_null=True,
        debiased="debiased_cka",
    )
)
register(
    Measure(
        "debiased_cka",
        _debiased_cka,
        (-1.0, 1.0),
        invariances=_CKA_INVARIANT,
        from_moments=moments.debiased_cka,
        description="linear CKA with the unbiased HSIC; may be negative",
        interval="cka_jackknife",
    )
)
register(
    Measure(
        "rbf_cka",
        _rbf_cka,
        (0.0, 1.0),
        invariances=_CKA_INVARIANT,
        description="RBF CKA, sigma^2 = median squared distance (Kornblith et al.)",
    )
)
