"""calibrate(): the interval covers at its level, the null is the value for unrelated
representations, p-values are uniform under the null, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from invsim.similarity import calibrate, linear_cka
from invsim.similarity.populations import Population


def _batched_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of many data sets at once: x (S, n, d1), y (S, n, d2)."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    xy, xx, yy = (torch.linalg.matrix_norm(a.transpose(1, 2) @ b) for a, b in
                  ((x, y), (x, x), (y, y)))  # fmt: skip
    return xy**2 / (xx * yy)


# (n, widths, population settings): the old low-dimensional regime, and the regime invsim
# runs in, n at or below the widths (inverted sets of a few hundred through layers 512+)
REGIMES = [
    (300, (10, 8), {"kind": "readout", "noise": 1.0}),
    (256, (84, 512), {"kind": "relu", "shared": 1.0, "noise": 0.5}),
    (256, (512, 512), {"kind": "readout", "noise": 0.2}),
    (256, (512, 1024), {"kind": "relu", "shared": 0.35, "noise": 0.7}),
    (40, (160, 160), {"kind": "relu", "shared": 1.0, "noise": 0.5}),
]
DRAWS = 150


def _coverage_draws():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, widths, settings in REGIMES:
        pop = Population(widths, **settings, rng_seed=1)
        cells = [calibrate(*pop.draw(n, g), n_perm=0) for _ in range(DRAWS)]
        out.append((pop, cells))
    return out


def test_interval_covers_its_population_value_where_invsim_runs():
    # Power, from these numbers: 5 regimes x 150 draws. A regime whose true coverage is
    # 0.88 passes its own [0.90, 0.99] check with probability ~0.23 (binomial sd 0.027),
    # so the pooled check does the work: over 750 draws (sd 0.011 at 0.90) a true pooled
    # coverage of 0.90 reads >= 0.93 with probability < 0.5%, and one of 0.995 reads
    # <= 0.985 with probability < 0.1%: either miscalibration fails here with
    # probability > 0.99. The old Poisson bootstrap covered 0-62% in these regimes.
    rates, pooled = [], []
    for pop, cells in _coverage_draws():
        hit = [c.ci_low <= pop.cka <= c.ci_high for c in cells]
        rates.append(np.mean(hit))
        pooled += hit
        # the interval centres on debiased CKA; biased CKA is biased upwards here
        assert all(c.ci_low < c.ci_centre < c.ci_high for c in cells)
        assert np.mean([c.value for c in cells]) > pop.cka
        assert all(c.ci_method and c.ci_target and c.ci_reason is None for c in cells)
    assert all(0.90 <= r <= 0.99 for r in rates), rates
    assert 0.93 <= np.mean(pooled) <= 0.985, np.mean(pooled)


def _degenerate_reference(xc, yc):
    """2 E[r_ij^2] / (n (n - 1)) over i != j, r the doubly centred (over i != j)
    linearised CKA kernel, written with explicit off-diagonal masks."""
    n = len(xc)
    k, el = xc @ xc.T, yc @ yc.T
    off = ~np.eye(n, dtype=bool)
    sxy, sxx, syy = ((a * b)[off].mean() for a, b in ((k, el), (k, k), (el, el)))
    c = sxy / np.sqrt(sxx * syy)
    w = (k * el) / np.sqrt(sxx * syy) - c / 2 * (k * k / sxx + el * el / syy)
    h = np.array([w[i, off[i]].mean() for i in range(n)])
    r = w - h[:, None] - h[None, :] + w[off].mean()
    return 2 * (r[off] ** 2).mean() / (n * (n - 1))


def test_delete_one_values_equal_the_definition(monkeypatch):
    # the closed-form delete-one HSICs (Gram and feature forms) against debiased CKA
    # recomputed with each example really left out
    from invsim.similarity import calibration

    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(30, 50, generator=g, dtype=torch.float64)) + 4.0  # far from 0
    y = x[:, :20] ** 2 + torch.randn(30, 20, generator=g, dtype=torch.float64)
    left_out = [torch.arange(30) != i for i in range(30)]
    brute = torch.tensor(
        [float(linear_cka(x[k], y[k], debiased=True)) for k in left_out], dtype=torch.float64
    )
    xc, yc = x - x.mean(0), y - y.mean(0)
    for grams in ((xc @ xc.T, yc @ yc.T), ()):
        full, loo = calibration._unbiased_hsic(calibration._terms(xc, yc, *grams), 30)
        own = [
            calibration._unbiased_hsic(
                calibration._terms(a, a, *((a @ a.T,) * 2 if grams else ())), 30
            )
            for a in (xc, yc)
        ]
        got = loo / (own[0][1] * own[1][1]).sqrt()
        assert torch.allclose(got, brute, atol=1e-12, rtol=0)
        assert float(full / (own[0][0] * own[1][0]).sqrt()) == pytest.approx(
            linear_cka(x, y, debiased=True), abs=1e-12
        )
    # and the interval is the t interval of those values, about debiased CKA, with the
    # jackknife's double count of the degenerate part taken off its variance
    c = calibrate(x, y, n_perm=0)
    var = float((29 / 30) * ((brute - brute.mean()) ** 2).sum())
    se = np.sqrt(var - _degenerate_reference(xc.numpy(), yc.numpy()))
    z = stats.t.ppf(0.975, 29)
    assert c.ci_centre == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)
    assert c.ci_low == pytest.approx(c.ci_centre - z * se, abs=1e-10)
    assert c.ci_high == pytest.approx(c.ci_centre + z * se, abs=1e-10)
    assert calibrate(x, y, measure="debiased_cka", n_perm=0).ci_low == pytest.approx(c.ci_low)


def test_no_interval_where_none_can_be_trusted():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 30, generator=g, dtype=torch.float64)
    c = calibrate(x, x + torch.randn(12, 30, generator=g, dtype=torch.float64))
    assert c.ci_low is None and c.ci_high is None and c.ci_method is None
    assert "n=12 is below 20 examples" in c.ci_reason and c.p_value is not None


@pytest.mark.parametrize("null", ["moments", "permutation"])
def test_null_is_the_value_for_unrelated_representations(null):
    g = torch.Generator().manual_seed(1)
    n, draws = 40, 500
    x = torch.randn(draws, n, 10, generator=g, dtype=torch.float64)
    y = torch.randn(draws, n, 8, generator=g, dtype=torch.float64)
    results = [
        calibrate(a, b, n_perm=200, rng_seed=i, null=null)
        for i, (a, b) in enumerate(zip(x, y, strict=True))
    ]
    # what biased CKA averages for independent data at this n and these widths
    many = _batched_cka(torch.randn(4000, n, 10, generator=g, dtype=torch.float64),
                        torch.randn(4000, n, 8, generator=g, dtype=torch.float64))  # fmt: skip
    expected, se = float(many.mean()), float(many.std() / np.sqrt(len(many)))
    null_means = np.array([r.null_mean for r in results])
    spread = null_means.std() / np.sqrt(draws)
    assert abs(null_means.mean() - expected) < 4 * (se + spread), (null_means.mean(), expected)
    assert expected > 0.15  # the bias the null exposes: far from 0 at n=40
    p = np.array([r.p_value for r in results])
    # Power, from these numbers: 500 independent pairs, so the 5% test's rejections are
    # Binomial(500, 0.05) when calibrated (25 expected). The two-sided binomial test at
    # 0.01 fails at 39 or more rejections (or 12 or fewer): a test that really rejects 10%
    # of the time is caught with probability 0.96 (14.5%: > 0.999), a calibrated one
    # falsely with probability 0.007.
    rejections = int((p <= 0.05).sum())
    assert stats.binomtest(rejections, draws, 0.05).pvalue > 0.01, rejections
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_deterministic_dtype_free_and_a_strong_signal():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = calibrate(x, y, rng_seed=3)
    assert a == calibrate(x, y, rng_seed=3)
    b = calibrate(x.float().numpy(), y.float().numpy(), rng_seed=3)
    assert b.value == pytest.approx(a.value, abs=1e-6)
    assert b.p_value == pytest.approx(a.p_value, rel=1e-3)
    assert a.value == pytest.approx(linear_cka(x, y)) and a.p_value < 1e-12 and a.null == "moments"
    mc = calibrate(x, y, rng_seed=3, null="permutation")
    assert mc.p_value == pytest.approx(1 / 201) and mc.null == "permutation"
    assert a.ci_low <= a.value <= a.ci_high and a.null_mean < 0.2


def test_large_n_path_equals_the_gram_path(monkeypatch):
    # above GRAM_LIMIT examples: the delete-one sums from the features and Monte-Carlo
    # permutations; the same jackknife (without the degenerate-term correction, which
    # needs the Gram matrices and is negligible at such n), and both nulls agree
    from invsim.similarity import calibration

    g = torch.Generator().manual_seed(6)
    x = torch.randn(120, 5, generator=g, dtype=torch.float64)
    y = x[:, :3] + torch.randn(120, 3, generator=g, dtype=torch.float64)
    gram = calibrate(x, y, n_perm=2000, rng_seed=1)
    monkeypatch.setattr(calibration, "GRAM_LIMIT", 100)
    features = calibrate(x, y, n_perm=2000, rng_seed=1)
    assert features.null == "permutation" and gram.null == "moments"
    assert features.ci_centre == pytest.approx(gram.ci_centre, abs=1e-12)
    z = stats.t.ppf(0.975, 119)
    var_g, var_f = (((c.ci_high - c.ci_low) / (2 * z)) ** 2 for c in (gram, features))
    correction = _degenerate_reference((x - x.mean(0)).numpy(), (y - y.mean(0)).numpy())
    assert var_f == pytest.approx(var_g + correction, rel=1e-9)
    assert 0 < correction < 0.2 * var_f
    assert features.null_mean == pytest.approx(gram.null_mean, rel=0.03)


def test_other_measures_report_a_null_but_no_interval():
    # no interval method was shown to cover their population values (docs/trust.md)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 4, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(100, 4, generator=g, dtype=torch.float64)
    c = calibrate(x, y, measure="procrustes", n_perm=50)
    assert c.p_value == pytest.approx(1 / 51) and c.null_mean < c.value
    assert c.ci_low is None and c.ci_high is None and c.ci_method is None
    assert "procrustes has no estimator whose small-sample bias is removed" in c.ci_reason


def test_bad_input_is_named():
    x = torch.randn(30, 4)
    with pytest.raises(ValueError, match="n_perm must be an integer >= 0; got -1"):
        calibrate(x, x, n_perm=-1)
    with pytest.raises(ValueError, match=r"ci must lie in \(0, 1\).*got 1.5"):
        calibrate(x, x, ci=1.5)
    with pytest.raises(ValueError, match="null must be one of .*got 'exact'"):
        calibrate(x, x, null="exact")
    with pytest.raises(ValueError, match="X has 30 examples but Y has 20"):
        calibrate(x, x[:20])
    with pytest.raises(ValueError, match="debiased CKA needs at least 4 examples; got n=3"):
        calibrate(x[:3], x[:3], measure="debiased_cka")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        calibrate(bad, x)
