"""The exact permutation null of linear CKA: its moments equal the moments over all n!
permutations, its p-value agrees with Monte-Carlo permutations, its tail function with
an independent implementation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from invsim.similarity import calibrate
from invsim.similarity.calibration import _trace_cubed
from invsim.similarity.core import centred, gram_linear
from invsim.similarity.null import null_moments, pattern_sums, pearson3_sf


def centred_gram(x):
    return gram_linear(centred(x))


def _enumerated(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean, variance, skewness of <A, P B P^T> over every permutation P."""
    n = len(a)
    t = np.array([(a * b[np.ix_(p, p)]).sum() for p in itertools.permutations(range(n))])
    c = t - t.mean()
    return t.mean(), c.var(), (c**3).mean() / c.var() ** 1.5


@pytest.mark.parametrize(
    ("n", "d1", "d2", "heavy"),
    [(7, 3, 2, False), (7, 2, 9, True), (7, 8, 1, True), (4, 3, 2, True)],  # n=4: fewer
)  # examples than the 6 indices of the third moment
def test_moments_equal_enumeration_over_all_permutations(n, d1, d2, heavy):
    g = torch.Generator().manual_seed(d1 * 10 + d2)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = torch.randn(n, d2, generator=g, dtype=torch.float64)
    if heavy:  # skewed, outlying features
        y = y**3
    a, b = centred_gram(x), centred_gram(y)
    mean, var, skew = _enumerated(a.numpy(), b.numpy())
    # the n^3 route and the feature-space route to tr(K^3) agree
    xc = x - x.mean(0)
    tr3 = _trace_cubed(xc)
    sa = pattern_sums(a, tr3=tr3 if tr3 is not None else float(torch.trace(a @ a @ a)))
    zero, v, s = null_moments(sa, pattern_sums(b), n)
    assert zero == pytest.approx(0, abs=1e-9 * mean)
    assert float(torch.trace(a) * torch.trace(b)) / (n - 1) == pytest.approx(mean, rel=1e-12)
    assert v == pytest.approx(var, rel=1e-6) and s == pytest.approx(skew, rel=1e-4, abs=1e-9)


def test_stacked_moments_equal_one_pair_at_a_time():
    g = torch.Generator().manual_seed(3)
    grams = [centred_gram(torch.randn(20, d, generator=g)) for d in (2, 5, 9)]
    sums = [pattern_sums(k) for k in grams]
    rows = [np.stack([s[k] for s in sums[:2]]) for k in range(3)]
    cols = [np.stack([s[k] for s in sums]) for k in range(3)]
    _, var, skew = null_moments(rows, cols, 20)
    for i in range(2):
        for j in range(3):
            _, v, s = null_moments(sums[i], sums[j], 20)
            assert var[i, j] == pytest.approx(v) and skew[i, j] == pytest.approx(s)


@pytest.mark.parametrize("skew", [-1.2, -0.3, 0.0, 1e-6, 0.4, 2.0])
def test_pearson3_tail_matches_scipy(skew):
    z = np.linspace(-3, 4, 15)
    ours = pearson3_sf(z, np.full_like(z, skew))
    assert np.allclose(ours, stats.pearson3.sf(z, skew), atol=1e-6)


@pytest.mark.parametrize(("n", "d1", "d2"), [(50, 5, 4), (40, 30, 25), (30, 2, 1)])
def test_p_value_agrees_with_monte_carlo_permutations(n, d1, d2):
    # narrow, wide (near-isotropic Gram matrices, high null mean) and near-scalar sides
    g = torch.Generator().manual_seed(5 + d1)
    diffs = []
    for strength in (0.0, 0.1, 0.2, 0.3, 0.5):
        x = torch.randn(n, d1, generator=g, dtype=torch.float64)
        y = torch.randn(n, d2, generator=g, dtype=torch.float64)
        y[:, : min(d1, d2)] += strength * x[:, : min(d1, d2)]
        exact = calibrate(x, y)
        mc = calibrate(x, y, n_perm=4000, null="permutation")
        assert exact.null_mean == pytest.approx(mc.null_mean, rel=0.05)  # MC s.e. < 2%
        diffs.append(abs(exact.p_value - mc.p_value))
    # Monte-Carlo error at 4,000 permutations is at most 0.008 (one s.e.)
    assert max(diffs) < 0.03, diffs


def test_float32_gram_matrices_give_the_same_moments():
    # the calibration sums float32 Gram matrices (made from float64-centred features)
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(400, d, generator=g, dtype=torch.float64) for d in (64, 256)]
    xs[1][:, :4] += xs[0][:, :4]
    exact, low = [], []
    for x in xs:
        xc = x - x.mean(0)
        exact.append(pattern_sums(xc @ xc.T, centred=True))
        low.append(pattern_sums(xc.float() @ xc.float().T, centred=True))
    _, v64, s64 = null_moments(*exact, 400)
    _, v32, s32 = null_moments(*low, 400)
    assert v32 == pytest.approx(v64, rel=1e-5) and s32 == pytest.approx(s64, rel=1e-4)
