"""CKA functions: golden values, invariances, numerics and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invsim import cka_matrix, kernel_cka, linear_cka
from invsim.similarity import centre_gram, gram_linear


@pytest.fixture(scope="module")
def kornblith_xy():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return X, Y


def test_golden_values_from_kornblith_demo(kornblith_xy):
    X, Y = kornblith_xy
    assert round(linear_cka(X, Y), 5) == 0.55761
    assert round(kernel_cka(X, Y, threshold=0.5), 5) == 0.65483
    assert round(linear_cka(X, Y, debiased=True), 5) == 0.51346


def test_debiased_gram_and_feature_forms_agree(kornblith_xy):
    X, Y = kornblith_xy
    feature = linear_cka(X, Y, debiased=True, method="feature")
    gram = linear_cka(X, Y, debiased=True, method="gram")
    kernel = kernel_cka(X, Y, kernel="linear", debiased=True)
    assert feature == pytest.approx(gram, abs=1e-12)
    assert feature == pytest.approx(kernel, abs=1e-12)


def test_unbiased_hsic_matches_song_formula(kornblith_xy):
    # Song et al. (2012), written out directly, against U-centring.
    X, Y = (torch.from_numpy(a) for a in kornblith_xy)
    n = X.shape[0]
    K, L = gram_linear(X), gram_linear(Y)
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    song = (
        torch.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))
    ku = centre_gram(gram_linear(X), debiased=True)
    lu = centre_gram(gram_linear(Y), debiased=True)
    assert float((ku * lu).sum()) / (n * (n - 3)) == pytest.approx(float(song), rel=1e-10)


matrices = st.tuples(
    st.integers(min_value=6, max_value=40),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=0, max_value=2**31 - 1),
)


def _draw(n, d1, d2, seed):
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, d1))
    Y = X[:, : min(d1, d2)] @ g.normal(size=(min(d1, d2), d2)) + g.normal(size=(n, d2))
    return X, Y


@settings(max_examples=40, deadline=None)
@given(matrices, st.booleans())
def test_self_similarity_symmetry_and_range(params, debiased):
    X, Y = _draw(*params)
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(
        linear_cka(Y, X, debiased=debiased), abs=1e-12
    )
    if not debiased:
        assert -1e-12 <= linear_cka(X, Y) <= 1 + 1e-12
        assert -1e-12 <= kernel_cka(X, Y) <= 1 + 1e-12


@settings(max_examples=40, deadline=None)
@given(matrices, st.booleans(), st.floats(min_value=1e-3, max_value=1e3))
def test_invariances(params, debiased, scale):
    n, d1, d2, seed = params
    X, Y = _draw(n, d1, d2, seed)
    g = np.random.default_rng(seed + 1)
    Q, _ = np.linalg.qr(g.normal(size=(d1, d1)))
    ref = linear_cka(X, Y, debiased=debiased)
    assert linear_cka(X @ Q, Y, debiased=debiased) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(scale * X, Y, debiased=debiased) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(X, Y / scale, debiased=debiased) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(X + g.normal(size=d1) * 10, Y, debiased=debiased) == pytest.approx(
        ref, abs=1e-9
    )
    # RBF CKA is invariant to orthogonal maps, scaling (median bandwidth) and translation.
    kref = kernel_cka(X, Y)
    assert kernel_cka(scale * X @ Q + 3.0, Y) == pytest.approx(kref, abs=1e-9)


def test_general_invertible_linear_map_changes_cka():
    g = np.random.default_rng(0)
    X = g.normal(size=(200, 5))
    Y = X + 0.5 * g.normal(size=(200, 5))
    A = np.diag([100.0, 1.0, 1.0, 1.0, 0.01]) @ np.linalg.qr(g.normal(size=(5, 5)))[0]
    assert abs(np.linalg.det(A)) > 0
    assert abs(linear_cka(X @ A, Y) - linear_cka(X, Y)) > 0.05


@settings(max_examples=30, deadline=None)
@given(matrices, st.booleans())
def test_feature_and_gram_forms_agree(params, debiased):
    X, Y = _draw(*params)
    f = linear_cka(X, Y, debiased=debiased, method="feature")
    g = linear_cka(X, Y, debiased=debiased, method="gram")
    assert f == pytest.approx(g, abs=1e-10)


def test_float32_large_mean_matches_float64():
    g = torch.Generator().manual_seed(0)
    X64 = 1e4 + torch.randn(500, 20, generator=g, dtype=torch.float64)
    Y64 = X64[:, :10] + torch.randn(500, 10, generator=g, dtype=torch.float64)
    X32, Y32 = X64.float(), Y64.float()
    for debiased in (False, True):
        ref = linear_cka(X32.double(), Y32.double(), debiased=debiased)
        assert linear_cka(X32, Y32, debiased=debiased) == pytest.approx(ref, abs=1e-6)
        # and the value is meaningful (not destroyed by cancellation)
        assert linear_cka(X64, Y64, debiased=debiased) == pytest.approx(ref, abs=1e-3)


def test_higher_rank_inputs_are_flattened():
    X = torch.randn(30, 2, 3, 4)
    Y = torch.randn(30, 7)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(X.reshape(30, -1), Y), abs=1e-14)


def test_debiased_can_be_negative_and_is_not_clamped():
    values = []
    for seed in range(40):
        g = np.random.default_rng(seed)
        values.append(linear_cka(g.normal(size=(8, 3)), g.normal(size=(8, 3)), debiased=True))
    assert min(values) < 0


def test_cka_matrix_matches_pairwise_and_is_symmetric():
    g = np.random.default_rng(3)
    reps = {"a": g.normal(size=(60, 8)), "b": g.normal(size=(60, 3)), "c": g.normal(size=(60, 90))}
    reps["b"] = reps["b"] + reps["a"][:, :3]
    for debiased in (False, True):
        m = cka_matrix(reps, debiased=debiased)
        assert np.allclose(m.values, m.values.T)
        for r in reps:
            for c in reps:
                assert m[r, c] == pytest.approx(linear_cka(reps[r], reps[c], debiased=debiased))
    rbf = cka_matrix(reps, kernel="rbf", threshold=0.5)
    assert rbf["a", "b"] == pytest.approx(kernel_cka(reps["a"], reps["b"], threshold=0.5))


# ---- bad input -------------------------------------------------------------------------


def test_mismatched_n_names_both_sizes():
    with pytest.raises(ValueError, match=r"X has 10 examples but Y has 12"):
        linear_cka(np.ones((10, 3)), np.ones((12, 3)))


@pytest.mark.parametrize("side", ["X", "Y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_names_the_side(side, bad):
    X, Y = np.random.randn(10, 3), np.random.randn(10, 3)
    (X if side == "X" else Y)[2, 1] = bad
    with pytest.raises(ValueError, match=rf"^{side} contains NaN or Inf"):
        linear_cka(X, Y)
    with pytest.raises(ValueError, match=rf"^{side} contains NaN or Inf"):
        kernel_cka(X, Y)


def test_too_few_examples():
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(np.random.randn(3, 3), np.random.randn(3, 3), debiased=True)
    with pytest.raises(ValueError, match="at least 4"):
        kernel_cka(np.random.randn(3, 3), np.random.randn(3, 3), debiased=True)


def test_constant_side_is_an_error_not_nan():
    X = np.random.randn(10, 3)
    with pytest.raises(ValueError, match="Y is constant.*undefined"):
        linear_cka(X, np.full((10, 4), 7.0))
    with pytest.raises(ValueError, match="X is constant.*undefined"):
        kernel_cka(np.zeros((10, 4)), X)
    with pytest.raises(ValueError, match="constant"):
        cka_matrix({"a": X, "dead": np.zeros((10, 2))})
