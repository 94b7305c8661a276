"""Blockwise RBF CKA: equal to the n x n Gram matrices' value for any block size, the
bandwidth's median exact (numpy's) however the selection has to refine, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invsim.similarity import kernel
from invsim.similarity.core import gram_rbf
from invsim.similarity.functional import _cka_from_grams


def _full_sq_distances(x: torch.Tensor) -> np.ndarray:
    xc = x - x.mean(0)
    sq = (xc * xc).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * xc @ xc.T).clamp_min(0)
    d.fill_diagonal_(0)
    return d.numpy()


@pytest.mark.parametrize(("n", "block"), [(9, 1), (50, 7), (301, 64), (200, None)])
@pytest.mark.parametrize("debiased", [False, True])
def test_blockwise_equals_full_gram_matrices(n, block, debiased):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 6)
    y = torch.tanh(x[:, :4]) + 0.4 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    for threshold in (0.5, 1.0):
        full = _cka_from_grams(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased=debiased)
        got = kernel.rbf_cka(x, y, threshold=threshold, debiased=debiased, block=block)
        assert got == pytest.approx(full, abs=1e-10)


def _tied(n: int) -> torch.Tensor:
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[: n // 2 + 3] = 1.0  # most pairs share one distance
    x[n // 2 + 3 :, 0] = torch.arange(n - n // 2 - 3, dtype=torch.float64)
    return x


@pytest.mark.parametrize(("bins", "collect"), [(4096, 1 << 20), (8, 10), (2, 1)])
def test_median_is_exact_however_the_selection_refines(monkeypatch, bins, collect):
    monkeypatch.setattr(kernel, "BINS", bins)
    monkeypatch.setattr(kernel, "COLLECT", collect)
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (7, 40, 301)]
    cases += [_tied(40), _tied(41)]
    for x in cases:
        want = float(np.median(_full_sq_distances(x)))  # even n^2: mean of the middle two
        assert kernel.median_sq_distance(x - x.mean(0), block=3) == pytest.approx(want, rel=1e-12)


def test_bad_input_is_named():
    x = torch.randn(30, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="threshold must be > 0; got 0"):
        kernel.rbf_cka(x, x, threshold=0)
    same = torch.zeros(30, 2, dtype=torch.float64)
    same[0] = 1.0  # not constant, but almost every pair is identical
    with pytest.raises(ValueError, match="median squared distance between the examples of X"):
        kernel.rbf_cka(same, x)
