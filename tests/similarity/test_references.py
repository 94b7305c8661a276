"""Every measure in the registry against an independent reference at an intermediate
value: a different implementation (scipy, scikit-learn, rsatoolbox, brute force) or the
definition written another way, in both directions for the asymmetric ones, for the
direct form and, where the measure streams, the one-pass moments form. A shared-formula
bug (a wrong variance share, a swapped direction, an off-by-one k, a wrong bandwidth)
passes a streaming-equals-direct test but fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import cdist, jensenshannon, pdist
from scipy.special import softmax
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from invsim.similarity import MEASURES, StreamingPanel, measure


def _pair(n=90, d1=12, d2=8, seed=0):
    """Related but far from identical representations (every measure strictly inside its
    range), with means far from zero and unequal widths."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) @ rng.normal(size=(d1, d1)) + 3.0
    y = np.tanh(x[:, :6] @ rng.normal(size=(6, d2)) / 3) + 0.6 * rng.normal(size=(n, d2)) - 2.0
    return x, y


def _centre(a):
    return a - a.mean(0)


# ---- references, each from its definition, written independently of invsim ----------


def ref_linear_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, el = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.trace(k @ el) / np.sqrt(np.trace(k @ k) * np.trace(el @ el))


def _unbiased_hsic(k, el):
    """Song et al. (2012), eq. 5, with zero diagonals."""
    n = len(k)
    k, el = k - np.diag(np.diag(k)), el - np.diag(np.diag(el))
    one = np.ones(n)
    return (
        np.trace(k @ el)
        + (one @ k @ one) * (one @ el @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ k @ el @ one
    ) / (n * (n - 3))


def ref_debiased_cka(x, y):
    k, el = x @ x.T, y @ y.T  # the unbiased HSIC needs no centring
    return _unbiased_hsic(k, el) / np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(el, el))


def ref_rbf_cka(x, y, threshold=1.0):
    def gram(a):
        sq = cdist(a, a, "sqeuclidean")
        return np.exp(-sq / (2 * threshold**2 * np.median(sq)))  # Kornblith et al.

    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, el = h @ gram(x) @ h, h @ gram(y) @ h
    return np.sum(k * el) / np.sqrt(np.sum(k * k) * np.sum(el * el))


def ref_procrustes(x, y):
    xc, yc = _centre(x), _centre(y)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    d = max(x.shape[1], y.shape[1])  # scipy wants equal widths: pad with zero features
    xp, yp = (np.pad(a, ((0, 0), (0, d - a.shape[1]))) for a in (xc, yc))
    r, _ = orthogonal_procrustes(xp, yp)
    return float(np.sum((xp @ r) * yp))  # <X R, Y> at the optimal rotation


def _canonical(x, y):
    """Canonical correlations and X's canonical variates (unit norm), from QR bases."""
    qx, _ = np.linalg.qr(_centre(x))
    qy, _ = np.linalg.qr(_centre(y))
    u, s, _ = np.linalg.svd(qx.T @ qy)
    r = min(qx.shape[1], qy.shape[1])
    return s[:r], (qx @ u)[:, :r]


def ref_mean_cca(x, y):
    return _canonical(x, y)[0].mean()


def ref_svcca(x, y):
    def reduce(a):  # Raghu et al.: the top directions explaining 99% of the variance
        u, s, _ = np.linalg.svd(_centre(a), full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        keep = int(np.searchsorted(share, 0.99) + 1)
        return u[:, :keep] * s[:keep]

    return _canonical(reduce(x), reduce(y))[0].mean()


def ref_pwcca(x, y):
    rho, h = _canonical(x, y)  # Morcos et al.: weights from X's own variates and neurons
    alpha = np.abs(h.T @ _centre(x)).sum(axis=1)
    return float((alpha * rho).sum() / alpha.sum())


def ref_linreg_r2(x, y):
    xc, yc = _centre(x), _centre(y)
    coef, *_ = np.linalg.lstsq(xc, yc, rcond=None)  # predict Y from X
    return 1 - np.sum((yc - xc @ coef) ** 2) / np.sum(yc**2)


def _neighbours(dist, k):
    np.fill_diagonal(dist, np.inf)
    return [set(np.argsort(row, kind="stable")[:k]) for row in dist]


def ref_mutual_knn(x, y, k=10):
    nx, ny = (_neighbours(cdist(a, a, "cosine"), k) for a in (x, y))
    return np.mean([len(a & b) / k for a, b in zip(nx, ny, strict=True)])


def ref_knn_jaccard(x, y, k=10):
    nx, ny = (_neighbours(cdist(a, a, "euclidean"), k) for a in (x, y))
    return np.mean([len(a & b) / len(a | b) for a, b in zip(nx, ny, strict=True)])


def ref_rsa(x, y):
    return spearmanr(pdist(x), pdist(y)).statistic


def ref_agreement(a, b):
    return np.mean(a.argmax(1) == b.argmax(1))


def ref_cohens_kappa(a, b):
    return cohen_kappa_score(a.argmax(1), b.argmax(1))


def ref_js_divergence(a, b):
    return np.mean(jensenshannon(softmax(a, axis=1), softmax(b, axis=1), axis=1) ** 2)


# the examples' inputs dcka deconfounds against: related to _pair's x
INPUTS = _pair()[0][:, :5] + 0.8 * np.random.default_rng(7).normal(size=(90, 5))


def ref_dcka(x, y, z=INPUTS):
    """Cui et al.'s dCKA: OLS of each vec(Gram) on [1, vec(K_Z)] (numpy's lstsq), the
    residual matrices double-centred with H, then their CKA."""
    n = len(x)
    kz = z @ z.T
    design = np.column_stack([np.ones(n * n), kz.ravel()])
    h = np.eye(n) - np.ones((n, n)) / n

    def residual(a):
        k = (a @ a.T).ravel()
        coef, *_ = np.linalg.lstsq(design, k, rcond=None)
        return h @ (k - design @ coef).reshape(n, n) @ h

    rx, ry = residual(x), residual(y)
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


REFERENCES = {
    "dcka": ref_dcka,
    "linear_cka": ref_linear_cka,
    "debiased_cka": ref_debiased_cka,
    "rbf_cka": ref_rbf_cka,
    "procrustes": ref_procrustes,
    "mean_cca": ref_mean_cca,
    "svcca": ref_svcca,
    "pwcca": ref_pwcca,
    "linreg_r2": ref_linreg_r2,
    "mutual_knn": ref_mutual_knn,
    "knn_jaccard": ref_knn_jaccard,
    "rsa": ref_rsa,
    "agreement": ref_agreement,
    "cohens_kappa": ref_cohens_kappa,
    "js_divergence": ref_js_divergence,
}


def _inputs(name):
    if MEASURES[name].inputs == "logits":
        rng = np.random.default_rng(3)
        a = 2 * rng.normal(size=(200, 5))
        return a, a + 2.5 * rng.normal(size=(200, 5))  # partly agreeing classifiers
    return _pair()


def test_every_registered_measure_has_a_reference():
    assert set(REFERENCES) == set(MEASURES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_measure_equals_its_reference_in_both_directions(name):
    x, y = _inputs(name)
    lo, hi = MEASURES[name].range
    for a, b in ((x, y), (y, x)):
        want = REFERENCES[name](a, b)
        assert lo + 0.02 < want < hi - 0.02, (name, want)  # an intermediate value
        extra = {"inputs": INPUTS} if MEASURES[name].deconfounds else {}
        got = measure(name, torch.from_numpy(a), torch.from_numpy(b), **extra)
        assert got == pytest.approx(want, abs=1e-9), (name, got, want)
    if not MEASURES[name].symmetric:  # the two directions really differ
        assert abs(REFERENCES[name](x, y) - REFERENCES[name](y, x)) > 0.01


@pytest.mark.parametrize("name", sorted(n for n, m in MEASURES.items() if m.streams))
def test_streamed_moments_equal_the_reference(name):
    x, y = _pair()
    acc = StreamingPanel(["x", "y"])
    for xb, yb in zip(np.array_split(x, 4), np.array_split(y, 4), strict=True):
        acc.update({"x": torch.from_numpy(xb), "y": torch.from_numpy(yb)})
    got = acc.compute([name])[name]
    assert got["x", "y"] == pytest.approx(REFERENCES[name](x, y), abs=1e-8)
    assert got["y", "x"] == pytest.approx(REFERENCES[name](y, x), abs=1e-8)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_knn_measures_at_other_k(k):
    x, y = _pair()
    assert measure("mutual_knn", x, y, k=k) == pytest.approx(ref_mutual_knn(x, y, k), abs=1e-12)
    assert measure("knn_jaccard", x, y, k=k) == pytest.approx(ref_knn_jaccard(x, y, k), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_rbf_bandwidth_at_other_thresholds(threshold):
    x, y = _pair()
    got = measure("rbf_cka", x, y, threshold=threshold)
    assert got == pytest.approx(ref_rbf_cka(x, y, threshold), abs=1e-9)
    assert abs(got - ref_rbf_cka(x, y, 1.0)) > 1e-3  # the threshold matters at these values
