"""The exact permutation null of linear CKA, from its first three moments.

Permuting the examples of one side turns the numerator of linear CKA into the quadratic
assignment statistic ``T(P) = <A, P B P^T>`` of the two centred Gram matrices (the
denominator does not change). Its mean, variance and skewness over *all* n!
permutations have closed forms (the RV coefficient's, Kazi-Aoual et al. 1995); here they
are computed generically: for the k-th raw moment, sum ``A`` and ``B`` over each
equality pattern of the 2k indices (a set partition; Moebius inversion on the partition
lattice turns "indices at least this equal" sums, a few matrix-vector products each,
into "exactly this pattern" sums), then

    E[T^k] = sum over patterns s of S_A(s) S_B(s) / (n)_{|s|}    (falling factorial),

because a uniform permutation sends distinct indices to a uniform tuple of distinct
indices. Everything that depends on one model is computed once per model, so a whole
matrix of nulls costs a few O(n^2) passes per model and one small product per cell.

- ``null_mean`` is then exact: ``tr A tr B / ((n - 1) ||A|| ||B||)``.
- ``p_value`` is the upper tail of a Pearson type III distribution with the exact mean,
  variance and skewness (the approximation Josse, Pages & Husson 2008 validated for the
  RV coefficient; tested here against enumeration and Monte-Carlo permutations).

Examples:
    >>> import torch
    >>> from invsim.similarity.core import centred, gram_linear
    >>> from invsim.similarity.null import null_moments, pattern_sums
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = (gram_linear(centred(torch.randn(30, d, generator=g))) for d in (4, 3))
    >>> centred_mean, var, skew = null_moments(pattern_sums(a), pattern_sums(b), 30)
    >>> mean = float(torch.trace(a) * torch.trace(b)) / 29  # E T, exactly
    >>> abs(centred_mean) < 1e-9 * mean, var > 0, skew > 0
    (True, True, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cache

import numpy as np
import torch

from invsim.similarity.core import centre_gram

__all__ = ["null_moments", "pattern_sums", "pearson3_sf"]

ORDER = 3  # moments used: mean, variance, skewness


def _partitions(m: int) -> Iterator[tuple[int, ...]]:
    """Set partitions of range(m) as restricted growth strings (block labels in order of
    first appearance)."""

    def grow(prefix: tuple[int, ...], top: int) -> Iterator[tuple[int, ...]]:
        if len(prefix) == m:
            yield prefix
            return
        for label in range(top + 2):
            yield from grow((*prefix, label), max(top, label))

    yield from grow((0,), 0) if m else iter([()])


def _canonical(labels: tuple[int, ...]) -> tuple[int, ...]:
    first: dict[int, int] = {}
    return tuple(first.setdefault(v, len(first)) for v in labels)


@cache
def _lattice(k: int) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The set partitions of 2k indices and the Moebius matrix M with
    exact-pattern sums = M @ at-least-pattern sums."""
    parts = list(_partitions(2 * k))
    where = {p: i for i, p in enumerate(parts)}
    mobius = np.zeros((len(parts), len(parts)))
    for i, p in enumerate(parts):
        for merge in _partitions(max(p) + 1):  # coarsenings: partitions of p's blocks
            sizes = np.bincount(merge)
            mu = math.prod((-1) ** (s - 1) * math.factorial(s - 1) for s in sizes)
            mobius[i, where[_canonical(tuple(merge[b] for b in p))]] += mu
    return parts, mobius


@cache
def _plan(labels: tuple[int, ...]) -> tuple:
    """How to sum prod_e A[block(2e), block(2e+1)] over free block values, for a centred,
    trace-free A: ``()`` when it vanishes, ``("tr3",)`` for the triangle, else an einsum
    over elementwise powers of A (keys 1-3) and powers of its diagonal (("diag", m)),
    times n per block that no index touches."""
    blocks = max(labels) + 1
    loops = np.zeros(blocks, dtype=int)
    degree = np.zeros(blocks, dtype=int)
    edges: dict[tuple[int, int], int] = {}
    for u, v in zip(labels[::2], labels[1::2], strict=True):
        if u == v:
            loops[u] += 1
        else:
            edges[(min(u, v), max(u, v))] = edges.get((min(u, v), max(u, v)), 0) + 1
            degree[[u, v]] += 1
    for (u, v), m in edges.items():  # a leaf on a plain A edge sums a row of A: zero
        if m == 1 and any(loops[b] == 0 and degree[b] == 1 for b in (u, v)):
            return ()
    if any(loops[b] == 1 and degree[b] == 0 for b in range(blocks)):
        return ()  # a lone diagonal entry summed: tr A = 0
    if len(edges) == 3 and blocks == 3 and set(edges.values()) == {1}:
        return ("tr3",)
    letters = "abcdef"
    subs, keys = [], []
    for (u, v), m in edges.items():  # A∘A∘A as the two operands A∘A and A
        subs += [letters[u] + letters[v]] * (1 + m // 3)
        keys += [2, 1] if m == 3 else [m]
    for b in np.flatnonzero(loops):
        subs.append(letters[b])
        keys.append(("diag", int(loops[b])))
    isolated = int(((degree == 0) & (loops == 0)).sum())
    return ",".join(subs) + "->", tuple(keys), isolated


def _evaluate(plan: tuple, parts: dict, n: int) -> float:
    if not plan:
        return 0.0
    if plan == ("tr3",):
        return parts["tr3"]
    subs, keys, isolated = plan
    if keys == (2,):  # the sum of A∘A, from its row sums
        value = float(parts["rows2"].sum())
    elif keys == (2, ("diag", 1)):  # A∘A weighted by the diagonal on either side (symmetric)
        value = float(parts["rows2"] @ parts["diag", 1].to(parts["rows2"].dtype))
    else:
        value = float(torch.einsum(subs, *[parts[k] for k in keys])) if keys else 1.0
    return value * float(n) ** isolated


def pattern_sums(
    gram: torch.Tensor | np.ndarray,
    tr3: float | None = None,
    *,
    centred: bool = False,
    overwrite: bool = False,
) -> list[np.ndarray]:
    """For k = 1..3, the sums of the trace-free part of a centred Gram matrix K over every
    equality pattern of 2k indices (see the module doc). ``tr3``: tr(K^3), when the
    caller has a cheaper way to it (else one n^3 product); ``centred``: K's rows and
    columns already sum to zero (see :func:`~invsim.similarity.core.centre_gram`), and a
    float32 K is then
    summed in float32 (tested: the moments move by ~1e-7 relative); ``overwrite``: a
    centred ``gram`` tensor may serve as scratch space (one n x n allocation fewer)."""
    n = gram.shape[0]
    a = torch.as_tensor(gram) if centred else centre_gram(gram)
    if a.dtype not in (torch.float32, torch.float64):
        a = a.double()
    t1 = float(torch.trace(a))
    c = t1 / (n - 1)
    # minus c (I - 11^T/n): trace-free, so the statistic's mean moves to 0
    a = a.add_(c / n) if overwrite and a is gram else a + c / n
    a.diagonal().sub_(c)
    square = a * a
    rows2 = square.sum(dim=1).double()  # serves every sum of A∘A alone or with the diagonal
    if tr3 is None:
        shifted_tr3 = float(((a @ a) * a).sum())
    else:  # tr((K - cH)^3) with KH = K, H^2 = H, tr H = n - 1
        t2 = float(rows2.sum()) + 2 * c * t1 - c**2 * (n - 1)  # ||K||^2
        shifted_tr3 = tr3 - 3 * c * t2 + 3 * c**2 * t1 - c**3 * (n - 1)
    d = a.diagonal()
    parts = {
        1: a,
        2: square,
        **{("diag", m): d**m for m in (1, 2, 3)},
        "tr3": shifted_tr3,
        "rows2": rows2,
    }
    out = []
    for k in range(1, ORDER + 1):
        labels, mobius = _lattice(k)
        plans = [_plan(p) for p in labels]
        values = {plan: _evaluate(plan, parts, n) for plan in dict.fromkeys(plans)}
        out.append(mobius @ np.array([values[plan] for plan in plans]))
    return out


def _inverse_falling(n: int, k: int) -> np.ndarray:
    """1 / (n)_{blocks} per pattern of 2k indices; 0 where a pattern has more blocks than
    there are examples (its sums are empty)."""
    labels, _ = _lattice(k)
    ff = np.array([math.perm(n, max(p) + 1) for p in labels], dtype=np.float64)
    return np.divide(1.0, ff, out=np.zeros_like(ff), where=ff > 0)


def null_moments(sa: list[np.ndarray], sb: list[np.ndarray], n: int):
    """Mean, variance and skewness of ``T(P) - E T`` over uniform permutations P, from
    :func:`pattern_sums` of each side. ``sa[k]`` may stack rows (R, P_k) and ``sb[k]``
    columns (C, P_k), giving (R, C) arrays. The mean is 0 by construction (returned as a
    check)."""
    pairwise = np.ndim(sa[0]) > 1 or np.ndim(sb[0]) > 1
    mean, var, third = (
        (np.atleast_2d(x) * _inverse_falling(n, k + 1)) @ np.atleast_2d(y).T
        for k, (x, y) in enumerate(zip(sa, sb, strict=True))
    )
    var = np.maximum(var, 0.0)
    skew = np.divide(third, var**1.5, out=np.zeros_like(third), where=var > 0)
    if not pairwise:
        return float(mean[0, 0]), float(var[0, 0]), float(skew[0, 0])
    return mean, var, skew


def pearson3_sf(z: np.ndarray, skew: np.ndarray) -> np.ndarray:
    """P(Z >= z) for a standardised Pearson type III variable with this skewness (a
    shifted gamma; reflected when the skewness is negative, normal when it vanishes)."""
    z, skew = np.broadcast_arrays(np.asarray(z, float), np.asarray(skew, float))
    shape = 4 / np.maximum(skew**2, 1e-12)
    k, x = torch.from_numpy(shape), torch.from_numpy(z)
    upper = torch.special.gammaincc(k, (k + x * k.sqrt()).clamp(min=0))
    lower = torch.special.gammainc(k, (k - x * k.sqrt()).clamp(min=0))
    normal = torch.special.ndtr(-x)
    out = torch.where(torch.from_numpy(skew) > 0, upper, lower)
    return torch.where(torch.from_numpy(np.abs(skew) < 1e-4), normal, out).numpy()
