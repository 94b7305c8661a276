"""dcka (Cui et al. 2022): what it removes, what it keeps, and bad input. Its value
against an independent numpy computation and its declared invariances are checked with
every other measure (test_references.py, test_measures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invsim.similarity import measure
from invsim.similarity.deconfounded import residual_gram


def _clustered(seed: int, n: int = 200, d: int = 40, clusters: int = 20):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(clusters, d, generator=g, dtype=torch.float64)
    z = centres[torch.arange(n) % clusters] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return z, g


def test_similarity_the_inputs_explain_is_removed():
    """Two random linear networks of the same clustered inputs: CKA near 1 only because
    their inputs are alike; dCKA is that of independent noise, about 0."""
    cka, dcka = [], []
    for seed in range(6):
        z, g = _clustered(seed)
        a = z @ torch.randn(40, 256, generator=g, dtype=torch.float64)
        b = z @ torch.randn(40, 256, generator=g, dtype=torch.float64)
        cka.append(measure("linear_cka", a, b))
        dcka.append(measure("dcka", a, b, inputs=z))
    assert min(cka) > 0.9
    assert abs(np.mean(dcka)) < 0.06 and max(abs(v) for v in dcka) < 0.25


def test_similarity_the_inputs_do_not_explain_is_kept():
    """Both representations share a feature that is not in the inputs (as large as the
    inputs' part): dCKA keeps it, and a feature they do not share leaves it near 0."""
    z, g = _clustered(0)
    shared = torch.randn(200, 3, generator=g, dtype=torch.float64)
    a = torch.cat([z @ torch.randn(40, 8, generator=g, dtype=torch.float64), 30 * shared], 1)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    b = torch.cat([z @ torch.randn(40, 8, generator=g, dtype=torch.float64), 30 * shared @ q], 1)
    assert measure("dcka", a, b, inputs=z) > 0.8
    unrelated = torch.randn(200, 3, generator=g, dtype=torch.float64)
    c = torch.cat([z @ torch.randn(40, 8, generator=g, dtype=torch.float64), 30 * unrelated], 1)
    assert measure("dcka", a, c, inputs=z) < measure("dcka", a, b, inputs=z) - 0.4


def test_residual_of_an_affine_function_of_the_inputs_gram_is_zero_and_dcka_says_so():
    z, _ = _clustered(1, n=30, d=5)
    kz = z @ z.T
    assert float(residual_gram(2.5 * kz - 1.0, kz).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="entirely that of the inputs"):
        measure("dcka", z, torch.randn(30, 4, dtype=torch.float64), inputs=z)


def test_bad_input_names_the_fix():
    x = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="pass inputs=Z"):
        measure("dcka", x, x)
    with pytest.raises(ValueError, match="inputs has 19 examples"):
        measure("dcka", x, x, inputs=torch.randn(19, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        measure("dcka", x, x, inputs=torch.full((20, 3), float("nan")))
