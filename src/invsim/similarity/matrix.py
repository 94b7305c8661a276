"""Similarity matrices between many models: labelled values and ``cka_matrix``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from invsim.results import SimilarityMatrix
from invsim.similarity._inputs import (
    ArrayLike,
    as_matrix,
    check_enough,
    check_not_constant,
)
from invsim.similarity.core import centre_gram, cka_ratio, gram_linear, gram_rbf, hsic
from invsim.similarity.functional import linear_hsic_matrix

__all__ = ["cka_matrix", "each_cell"]

T = TypeVar("T")


def each_cell(
    rows: Sequence[str], cols: Sequence[str], cell: Callable[[str, str], T], *, symmetric: bool
) -> list[list[T]]:
    """``cell(r, c)`` for every row and column, called once per unordered pair when the
    measure is ``symmetric`` (the mirrored cell reuses it).

    Examples:
        >>> calls = []
        >>> each_cell("ab", "ab", lambda r, c: calls.append(r + c) or r + c, symmetric=True)
        [['aa', 'ab'], ['ab', 'bb']]
        >>> calls
        ['aa', 'ab', 'bb']
    """
    done: dict[tuple[str, str], T] = {}
    for r in rows:
        for c in cols:
            key = (c, r) if symmetric and (c, r) in done else (r, c)
            if key not in done:
                done[key] = cell(*key)
    return [[done[(c, r) if (r, c) not in done else (r, c)] for c in cols] for r in rows]


def cka_matrix(
    representations: Mapping[str, ArrayLike],
    *,
    kernel: str = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
) -> SimilarityMatrix:
    """CKA between every pair of representations of the same n examples.

    ``kernel`` is ``"linear"`` or ``"rbf"`` (bandwidth as in :func:`kernel_cka`). Each
    model's centred representation, Gram matrix and self-HSIC are computed once, not
    once per pair. Returns a symmetric :class:`SimilarityMatrix`.

    Examples:
        >>> import torch
        >>> from invsim import cka_matrix
        >>> X = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> m = cka_matrix({"a": X, "b": 3 * X, "c": X ** 2})
        >>> round(m["a", "b"], 6), m.values.shape
        (1.0, (3, 3))
    """
    names = list(representations)
    if not names:
        raise ValueError("representations is empty; pass a mapping name -> (n, d) tensor.")
    xs = [as_matrix(representations[k], k) for k in names]
    sizes = {k: x.shape[0] for k, x in zip(names, xs, strict=True)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"representations have different numbers of examples: {sizes}.")
    n = xs[0].shape[0]
    check_enough(n, debiased=debiased)
    for k, x in zip(names, xs, strict=True):
        check_not_constant(x, k)
    m = len(names)
    h = np.zeros((m, m))
    mean_d = sum(x.shape[1] for x in xs) / m
    if kernel == "rbf" or (kernel == "linear" and n <= mean_d):
        if kernel == "rbf":
            grams = [centre_gram(gram_rbf(x, threshold), debiased=debiased) for x in xs]
        else:
            grams = [centre_gram(gram_linear(x), debiased=debiased) for x in xs]
        for i in range(m):
            for j in range(i, m):
                h[i, j] = h[j, i] = hsic(grams[i], grams[j], debiased=debiased)
    elif kernel == "linear":
        h = linear_hsic_matrix(xs, debiased=debiased).numpy()
    else:
        raise ValueError(f"kernel must be 'linear' or 'rbf'; got {kernel!r}.")
    values = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            values[i, j] = cka_ratio(h[i, j], h[i, i], h[j, j])
    return SimilarityMatrix(names, names, values)
