"""Deconfounded CKA (Cui et al., NeurIPS 2022, "Deconfounded Representation Similarity
for Comparison of Neural Networks").

Two networks can look alike only because their inputs are alike: two *random* ReLU
networks applied to clustered inputs have a high linear CKA, which the inputs' own
similarity structure explains. dCKA removes that part before comparing. For each
representation X (n, d) with linear Gram matrix ``K_X = X X^T``, and the inputs Z (n,
...) with ``K_Z = Z Z^T``, it fits by ordinary least squares over all n^2 entries

    vec(K_X) = a + b vec(K_Z) + residual,

and compares the residual matrices ``R_X``, ``R_Y`` with CKA (double-centred, the biased
HSIC of :func:`invsim.similarity.core.hsic`):

    dCKA(X, Y; Z) = <H R_X H, H R_Y H> / sqrt(<H R_X H, H R_X H> <H R_Y H, H R_Y H>).

The Gram matrices are of the representations as given (Cui et al.'s definition), so dCKA
is invariant to orthogonal transforms, feature permutations and isotropic scaling of X
or Y, but not to translating them (a translation changes K_X, and so the fit). Residual
matrices are not positive semi-definite, so dCKA can be negative. ``inputs`` may be the
images (flattened) or any other representation of the same examples to deconfound
against. In a run (:func:`invsim.experiment.natural_similarity` and
:func:`~invsim.experiment.inverted_similarity`) the inputs are the regime's images:
the natural images for the natural matrix, the row model's inverted images for its row.

Examples:
    >>> import torch
    >>> from invsim.similarity import measure
    >>> g = torch.Generator().manual_seed(0)
    >>> Z = torch.randn(60, 10, generator=g, dtype=torch.float64)
    >>> X = torch.relu(Z @ torch.randn(10, 32, generator=g, dtype=torch.float64))
    >>> round(measure("dcka", X, 2 * X, inputs=Z), 6)
    1.0
"""

from __future__ import annotations

import torch

from invsim.similarity._inputs import ArrayLike, as_matrix, check_not_constant, check_pair
from invsim.similarity.core import centre_gram, cka_ratio, gram_linear, hsic
from invsim.similarity.registry import Measure, register

__all__ = ["dcka", "residual_gram"]


def residual_gram(gram: torch.Tensor, input_gram: torch.Tensor) -> torch.Tensor:
    """What is left of ``gram`` after the least-squares fit ``a + b input_gram`` over all
    n^2 entries (Cui et al.'s regression, the intercept included).

    Examples:
        >>> import torch
        >>> kz = torch.rand(5, 5, dtype=torch.float64)
        >>> bool(residual_gram(3 * kz + 2, kz).abs().max() < 1e-12)
        True
    """
    k = gram.to(torch.float64)
    kz = input_gram.to(torch.float64)
    kz_c = kz - kz.mean()
    k_c = k - k.mean()
    spread = float((kz_c * kz_c).sum())
    slope = float((kz_c * k_c).sum()) / spread if spread > 0 else 0.0
    return k_c - slope * kz_c


def dcka(X: ArrayLike, Y: ArrayLike, *, inputs: ArrayLike | None = None) -> float:
    """Deconfounded linear CKA of X (n, d1) and Y (n, d2) given the examples' ``inputs``
    (n, ...): CKA of the two Gram matrices' residuals after regressing each on the
    inputs' Gram matrix (see the module doc)."""
    if inputs is None:
        raise ValueError(
            "dcka deconfounds against the examples' inputs: pass inputs=Z (n, ...), the "
            "images the representations were computed from (or another representation)."
        )
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    z = as_matrix(inputs, "inputs")
    check_pair(x, y, debiased=False)
    if z.shape[0] != x.shape[0]:
        raise ValueError(
            f"inputs has {z.shape[0]} examples but X and Y have {x.shape[0]}; deconfounding "
            "needs the inputs of the same examples, in the same order."
        )
    check_not_constant(x, "X")
    check_not_constant(y, "Y")
    kz = gram_linear(z)
    residuals = {}
    for name, v in (("X", x), ("Y", y)):
        k = centre_gram(gram_linear(v))
        r = centre_gram(residual_gram(gram_linear(v), kz))
        if float((r * r).sum()) <= 1e-20 * float((k * k).sum()):
            raise ValueError(
                f"{name}'s similarity structure is entirely that of the inputs (its Gram "
                "matrix is an affine function of theirs), so nothing is left to compare and "
                "dCKA is undefined; compare it with linear_cka instead."
            )
        residuals[name] = r
    rx, ry = residuals["X"], residuals["Y"]
    return cka_ratio(hsic(rx, ry), hsic(rx, rx), hsic(ry, ry))


register(
    Measure(
        "dcka",
        dcka,
        (-1.0, 1.0),
        invariances=frozenset({"orthogonal", "isotropic_scaling", "permutation"}),
        deconfounds=True,
        description="deconfounded linear CKA (Cui et al. 2022): CKA of the Gram matrices' "
        "residuals after regressing out the inputs' Gram matrix",
    )
)
