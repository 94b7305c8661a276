"""Streaming accumulators: exactness for any split, merging, numerics, minibatch CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invsim import LinearCKA, MinibatchCKA, StreamingPanel, cka_matrix, linear_cka
from invsim.similarity import centre_gram, gram_linear


def _data(seed: int, n: int = 120, d1: int = 7, d2: int = 5, mean: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64) + mean
    Y = X[:, :d2] @ torch.randn(d2, d2, generator=g, dtype=torch.float64)
    Y = Y + torch.randn(n, d2, generator=g, dtype=torch.float64) + 3 * mean
    return X, Y


def _random_split(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, n), size=rng.integers(1, 8), replace=False).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 5.0, 1e3]))
def test_streaming_equals_full_batch_for_random_splits(seed, mean):
    X, Y = _data(seed, mean=mean)
    acc = LinearCKA()
    sizes = _random_split(X.shape[0], seed)
    for xb, yb in zip(X.split(sizes), Y.split(sizes), strict=True):
        acc.update(xb, yb)
    assert acc.n == X.shape[0]
    assert acc.compute() == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert acc.compute(debiased=True) == pytest.approx(linear_cka(X, Y, debiased=True), abs=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 119))
def test_merge_equals_one_accumulator_over_both(seed, cut):
    X, Y = _data(seed, mean=2.0)
    # different first batches -> different shifts, so merge must re-shift exactly
    a, b, whole = LinearCKA(), LinearCKA(), LinearCKA()
    a.update(X[:cut], Y[:cut])
    b.update(X[cut:], Y[cut:])
    whole.update(X, Y)
    a.merge(b)
    for debiased in (False, True):
        assert a.compute(debiased=debiased) == pytest.approx(
            whole.compute(debiased=debiased), abs=1e-10
        )
    merged_into_empty = LinearCKA().merge(whole)
    assert merged_into_empty.compute() == pytest.approx(whole.compute(), abs=1e-12)


def test_reshift_then_sum_is_plain_allreduce():
    X, Y = _data(1, mean=10.0)
    parts = [LinearCKA() for _ in range(3)]
    for i, acc in enumerate(parts):
        acc.update(X[i::3], Y[i::3])
    common = parts[0].moments.shift
    for acc in parts:
        acc.moments.reshift(common)
    states = [acc.moments.state_tensors() for acc in parts]
    summed = LinearCKA()
    summed.moments = parts[0].moments.copy()
    for t_sum, *ts in zip(summed.moments.state_tensors(), *states[1:], strict=True):
        for t in ts:
            t_sum += t
    assert summed.compute() == pytest.approx(linear_cka(X, Y), abs=1e-10)


def test_float32_large_mean_stream_is_stable():
    g = torch.Generator().manual_seed(0)
    X = (1e4 + torch.randn(2000, 16, generator=g, dtype=torch.float64)).float()
    Y = (X.double()[:, :8] + torch.randn(2000, 8, generator=g, dtype=torch.float64)).float()
    acc = LinearCKA()
    for xb, yb in zip(X.split(100), Y.split(100), strict=True):
        acc.update(xb, yb)
    assert acc.compute() == pytest.approx(linear_cka(X.double(), Y.double()), abs=1e-6)


def test_float32_products_sum_every_batch_and_merge(monkeypatch):
    from invsim.similarity.streaming import CrossMoments

    monkeypatch.setattr(CrossMoments, "FLUSH_ROWS", 250)  # flushes mid-stream and not
    X, Y = _data(7, n=1000, mean=3.0)
    fast, other = LinearCKA(product_dtype=torch.float32), LinearCKA(product_dtype=torch.float32)
    for i, (xb, yb) in enumerate(zip(X.float().split(90), Y.float().split(90), strict=True)):
        (fast if i < 7 else other).update(xb, yb)
    assert other.moments._pending_rows > 0  # unflushed float32 sums travel with a merge
    fast.merge(other)
    for debiased in (False, True):
        want = linear_cka(X, Y, debiased=debiased)
        assert fast.compute(debiased=debiased) == pytest.approx(want, abs=1e-6)
    # the float32 state is flushed before it is read: all-reduce sees every batch
    states = fast.moments.state_tensors()
    assert float(states[0]) == 1000 and fast.moments._pending_rows == 0


def test_matrix_accumulator_equals_cka_matrix():
    X, Y = _data(5, mean=1.0)
    Z = torch.tanh(X[:, :4])
    reps = {"x": X, "y": Y, "z": Z}
    acc = StreamingPanel(list(reps))
    for i in range(0, 120, 25):
        acc.update({k: v[i : i + 25] for k, v in reps.items()})
    for debiased in (False, True):
        name = "debiased_cka" if debiased else "linear_cka"
        got = acc.compute([name])[name]
        want = cka_matrix(reps, debiased=debiased)
        assert np.allclose(got.values, want.values, atol=1e-10)
        assert got.rows == ["x", "y", "z"]


def test_streaming_bad_input():
    acc = LinearCKA()
    with pytest.raises(ValueError, match="X batch has 4 examples but Y batch has 5"):
        acc.update(torch.randn(4, 3), torch.randn(5, 3))
    acc.update(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="feature sizes"):
        acc.update(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.full((4, 3), float("nan")), torch.randn(4, 2))
    with pytest.raises(ValueError, match="no data"):
        LinearCKA().compute()
    tiny = LinearCKA()
    tiny.update(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 4"):
        tiny.compute(debiased=True)
    const = LinearCKA()
    const.update(torch.full((10, 3), 5.0), torch.randn(10, 2))
    with pytest.raises(ValueError, match="constant"):
        const.compute()


# ---- minibatch CKA ---------------------------------------------------------------------


def _unbiased_hsic(a: torch.Tensor, b: torch.Tensor) -> float:
    n = a.shape[0]
    ka = centre_gram(gram_linear(a.double()), debiased=True)
    kb = centre_gram(gram_linear(b.double()), debiased=True)
    return float((ka * kb).sum()) / (n * (n - 3))


@pytest.mark.parametrize("weighting", ["batch", "size"])
def test_minibatch_cka_sums_every_batch(weighting):
    X, Y = _data(2, n=130)
    sizes = [40, 40, 40, 10]
    acc = MinibatchCKA(weighting=weighting)
    xy = xx = yy = 0.0
    for xb, yb in zip(X.split(sizes), Y.split(sizes), strict=True):
        acc.update(xb, yb)
        w = 1.0 if weighting == "batch" else xb.shape[0]
        xy += w * _unbiased_hsic(xb, yb)
        xx += w * _unbiased_hsic(xb, xb)
        yy += w * _unbiased_hsic(yb, yb)
    assert acc.compute() == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-10)
    # a result reflecting only the last batch would differ:
    last = _unbiased_hsic(X[-10:], Y[-10:]) / np.sqrt(
        _unbiased_hsic(X[-10:], X[-10:]) * _unbiased_hsic(Y[-10:], Y[-10:])
    )
    assert abs(acc.compute() - last) > 1e-3


def test_minibatch_merge_and_errors():
    X, Y = _data(3, n=96)
    a, b, whole = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for i, (xb, yb) in enumerate(zip(X.split(16), Y.split(16), strict=True)):
        (a if i % 2 else b).update(xb, yb)
        whole.update(xb, yb)
    assert a.merge(b).compute() == pytest.approx(whole.compute(), rel=1e-12)
    with pytest.raises(ValueError, match="n=3"):
        MinibatchCKA().update(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="no data"):
        MinibatchCKA().compute()


def test_minibatch_float32_products_agree():
    X, Y = _data(4, n=200, mean=1e3)
    exact, fast = MinibatchCKA(), MinibatchCKA(product_dtype=torch.float32)
    for xb, yb in zip(X.split(50), Y.split(50), strict=True):
        exact.update(xb, yb)
        fast.update(xb, yb)
    assert fast.compute() == pytest.approx(exact.compute(), abs=1e-5)
