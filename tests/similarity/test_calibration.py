"""calibrate(): the interval covers at its level, the null is the value for unrelated
representations, p-values are uniform under the null, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from invsim.similarity import calibrate, linear_cka


def _batched_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of many data sets at once: x (S, n, d1), y (S, n, d2)."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    xy, xx, yy = (torch.linalg.matrix_norm(a.transpose(1, 2) @ b) for a, b in
                  ((x, y), (x, x), (y, y)))  # fmt: skip
    return xy**2 / (xx * yy)


def test_interval_covers_at_its_level():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 8, generator=g, dtype=torch.float64)

    def draw(n, sets=1):
        x = torch.randn(sets, n, 10, generator=g, dtype=torch.float64)
        return x, x @ a + 2.5 * torch.randn(sets, n, 8, generator=g, dtype=torch.float64)

    population = float(_batched_cka(*draw(200_000)))  # the value at n -> infinity
    xs, ys = draw(300, sets=200)
    pairs = enumerate(zip(xs, ys, strict=True))
    covered = [calibrate(x, y, n_boot=200, n_perm=0, seed=i) for i, (x, y) in pairs]
    rate = np.mean([c.ci_low <= population <= c.ci_high for c in covered])
    assert 0.90 <= rate <= 0.99, rate
    # the estimator is biased upwards at this n: the interval must not simply centre on it
    assert np.mean([c.value for c in covered]) > population


@pytest.mark.parametrize("null", ["moments", "permutation"])
def test_null_is_the_value_for_unrelated_representations(null):
    g = torch.Generator().manual_seed(1)
    n, draws = 40, 200
    x = torch.randn(draws, n, 10, generator=g, dtype=torch.float64)
    y = torch.randn(draws, n, 8, generator=g, dtype=torch.float64)
    results = [
        calibrate(a, b, n_boot=1, n_perm=200, seed=i, null=null)
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
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_deterministic_dtype_free_and_a_strong_signal():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = calibrate(x, y, seed=3)
    assert a == calibrate(x, y, seed=3)
    b = calibrate(x.float().numpy(), y.float().numpy(), seed=3)
    assert b.value == pytest.approx(a.value, abs=1e-6)
    assert b.p_value == pytest.approx(a.p_value, rel=1e-3)
    assert a.value == pytest.approx(linear_cka(x, y)) and a.p_value < 1e-12 and a.null == "moments"
    mc = calibrate(x, y, seed=3, null="permutation")
    assert mc.p_value == pytest.approx(1 / 201) and mc.null == "permutation"
    assert a.ci_low <= a.value <= a.ci_high and a.null_mean < 0.2


def test_poisson_weights_are_drawn_example_by_example():
    from invsim.similarity.calibration import poisson_weights

    whole = poisson_weights(1000, 50, seed=4)
    assert torch.equal(poisson_weights(300, 50, seed=4), whole[:, :300])  # any prefix
    assert not torch.equal(poisson_weights(300, 50, seed=5), whole[:, :300])
    assert abs(float(whole.mean()) - 1) < 0.02 and abs(float(whole.var()) - 1) < 0.05
    # the counts of 0, 1, ..., 4 and >= 5 follow Poisson(1) (a chi-square test can fail)
    seen = np.bincount(whole.long().flatten().clamp(max=5).numpy(), minlength=6)
    p = stats.poisson.pmf(np.arange(5), 1)
    expected = whole.numel() * np.append(p, 1 - p.sum())
    assert stats.chisquare(seen, expected).pvalue > 0.001, (seen, expected)


def test_large_n_path_equals_the_gram_path(monkeypatch):
    # above GRAM_LIMIT examples: feature-space replicates and Monte-Carlo permutations;
    # the same weights give the same interval, and both nulls agree
    from invsim.similarity import calibration

    g = torch.Generator().manual_seed(6)
    x = torch.randn(120, 5, generator=g, dtype=torch.float64)
    y = x[:, :3] + torch.randn(120, 3, generator=g, dtype=torch.float64)
    gram = calibrate(x, y, n_boot=100, n_perm=2000, seed=1)
    monkeypatch.setattr(calibration, "GRAM_LIMIT", 100)
    features = calibrate(x, y, n_boot=100, n_perm=2000, seed=1)
    assert features.null == "permutation" and gram.null == "moments"
    assert features.ci_low == pytest.approx(gram.ci_low, abs=1e-6)
    assert features.ci_high == pytest.approx(gram.ci_high, abs=1e-6)
    assert features.null_mean == pytest.approx(gram.null_mean, rel=0.03)


def test_other_measures_use_the_same_rule():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    c = calibrate(x, x + 0.3 * torch.randn(60, 4, generator=g, dtype=torch.float64),
                  measure="procrustes", n_boot=50, n_perm=50)  # fmt: skip
    assert c.ci_low < c.value < c.ci_high and c.p_value == pytest.approx(1 / 51)
    assert c.null_mean < c.value


def test_bad_input_is_named():
    x = torch.randn(30, 4)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1; got 0"):
        calibrate(x, x, n_boot=0)
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


def _float64_replicates(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted linear CKA of each row of weights w, straight from the definition."""
    x, y, w = (t.double() for t in (x, y, w))
    k, el = ((a - a.mean(0)) @ (a - a.mean(0)).T for a in (x, y))

    def hsic(k, el):
        s, wk, wl = w.sum(1), w @ k, w @ el
        return (
            ((w @ (k * el)) * w).sum(1)
            - 2 * (w * wk * wl).sum(1) / s
            + ((wk * w).sum(1) * (wl * w).sum(1) / s**2)
        )

    return hsic(k, el) / (hsic(k, k) * hsic(el, el)).sqrt()


@pytest.mark.parametrize("product", [torch.bfloat16, torch.float32])
def test_rounding_never_moves_an_interval_beyond_its_tolerance(monkeypatch, product):
    # the fast products (bfloat16 where the CPU has it, else float32) are checked cell by
    # cell against their rounding bound; a cell whose interval is too narrow for them is
    # redone in float32 or float64. Against float64 replicates from the definition:
    from invsim.similarity import calibration

    monkeypatch.setattr(calibration, "PRODUCT_DTYPE", product)
    g = torch.Generator().manual_seed(8)
    n = 600  # above LOW_PRECISION_FROM
    x = torch.randn(n, 96, generator=g)
    reps = {
        "x": x,
        "relu": torch.relu(x @ torch.randn(96, 120, generator=g)),
        "noisy": x + torch.randn(n, 96, generator=g),
        "twin": x + 1e-3 * torch.randn(n, 96, generator=g),  # CKA 1 - 1e-6: width ~1e-7
        "other": torch.randn(n, 40, generator=g),
    }
    names = list(reps)
    values = np.array([[float(linear_cka(reps[r].double(), reps[c].double())) for c in names]
                       for r in names])  # fmt: skip
    got = calibration.cka_calibration(reps, values, names, names, n_boot=100, ci=0.9, seed=2,
                                      null=False)  # fmt: skip
    w = calibration.poisson_weights(n, 100, seed=2)
    for i, r in enumerate(names):
        for j, c in enumerate(names[i + 1 :], start=i + 1):
            exact = _float64_replicates(reps[r], reps[c], w).numpy()
            lo, hi = np.quantile(exact, [0.05, 0.95])
            ref = (2 * values[i, j] - hi, 2 * values[i, j] - lo)
            moved = max(abs(got["ci_low"][i, j] - ref[0]), abs(got["ci_high"][i, j] - ref[1]))
            assert moved <= 0.02 * (hi - lo), (r, c, moved, hi - lo)  # the documented 2%


def test_the_bfloat16_rounding_bound_holds():
    # the per-cell bound on how far bfloat16 products move any replicate is above the
    # largest error measured against float64, and not absurdly loose
    from invsim.similarity import calibration

    g = torch.Generator().manual_seed(9)
    n = 600
    x = torch.randn(n, 64, generator=g)
    reps = {"x": x, "relu": torch.relu(x @ torch.randn(64, 80, generator=g)),
            "noisy": x + 0.5 * torch.randn(n, 64, generator=g),
            "other": torch.randn(n, 30, generator=g)}  # fmt: skip
    names = list(reps)
    low = {m: calibration._centred(v).float() for m, v in reps.items()}
    grams = {m: calibration._gram(v) for m, v in low.items()}
    w = calibration.poisson_weights(n, 100, seed=3)
    fast, _, bound, _ = calibration._replicates(grams, low, names, names, w, torch.bfloat16)
    ratios = []
    for i, r in enumerate(names):
        for j, c in enumerate(names[i + 1 :], start=i + 1):
            error = np.abs(fast[i, j] - _float64_replicates(reps[r], reps[c], w).numpy()).max()
            assert error <= bound[i, j], (r, c, error, bound[i, j])
            ratios.append(error / bound[i, j])
    assert max(ratios) > 0.05  # a bound that is not a thousand times too large
