"""The measure registry: metadata, streaming = direct, declared invariances hold and
undeclared ones fail, closed forms, an independent implementation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invsim.similarity import INVARIANCES, MEASURES, StreamingPanel, get_measure, measure

G = torch.Generator().manual_seed(0)


def _data(n=120, d1=9, d2=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x[:, :5] @ torch.randn(5, d2, generator=g, dtype=torch.float64)
    y = y + 0.7 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y


def _transform(kind: str, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=x.dtype))
        return x @ q
    if kind == "isotropic_scaling":
        return 3.7 * x
    if kind == "translation":
        return x + 5 * torch.randn(1, d, generator=g, dtype=x.dtype)
    if kind == "permutation":
        return x[:, torch.randperm(d, generator=g)]
    a = torch.randn(d, d, generator=g, dtype=x.dtype) + 0.5 * torch.eye(d, dtype=x.dtype)
    return x @ a  # invertible linear


# the examples' inputs a deconfounding measure (dcka) removes: related to _data's x
Z = _data()[0][:, :4] + 0.5 * torch.randn(120, 6, generator=G, dtype=torch.float64)[:, :4]


def _call(name, x, y, **options):
    """``measure(name, x, y)``, with the inputs of _data's examples for dcka."""
    if MEASURES[name].deconfounds:
        options["inputs"] = Z[: len(x)]
    return measure(name, x, y, **options)


def _inputs(spec):
    if spec.inputs == "logits":
        x, y = _data(d1=6, d2=6)
        return x, y + 0.8 * x  # two models' logits over the same 6 classes
    return _data()


def test_registry_metadata_is_complete():
    for name, m in MEASURES.items():
        assert m.name == name and m.range[0] < m.range[1]
        assert set(m.invariances) <= set(INVARIANCES)
        meta = m.metadata()
        assert meta["streams"] == (m.from_moments is not None) and meta["inputs"] in (
            "representation", "logits")  # fmt: skip
    assert {"linear_cka", "debiased_cka", "procrustes", "mean_cca", "svcca", "pwcca",
            "linreg_r2", "mutual_knn", "knn_jaccard", "rsa", "rbf_cka", "agreement",
            "cohens_kappa", "js_divergence"} <= set(MEASURES)  # fmt: skip


@pytest.mark.parametrize("name", sorted(n for n, m in MEASURES.items() if m.streams))
def test_streaming_equals_direct(name):
    x, y = _data(n=300)
    z = torch.tanh(x[:, :4]) + 100.0  # a large mean: no cancellation in the moments
    acc, other = StreamingPanel(["x", "y", "z"]), StreamingPanel(["x", "y", "z"])
    for i, (xb, yb, zb) in enumerate(zip(x.split(41), y.split(41), z.split(41), strict=True)):
        (acc if i % 2 else other).update({"x": xb, "y": yb, "z": zb})
    acc.merge(other)  # two accumulators with different shifts, merged
    got = acc.compute([name])[name]
    reps = {"x": x, "y": y, "z": z}
    for r in reps:
        for c in reps:
            assert got[r, c] == pytest.approx(measure(name, reps[r], reps[c]), abs=1e-8), (r, c)


def test_pwcca_both_orders_with_a_zero_canonical_correlation():
    # one direction of Y is exactly uncorrelated with X (equal widths, so every canonical
    # direction is defined): the shared decomposition cannot divide by rho there, and
    # takes the other side's own decomposition instead
    x, y = _data(n=200, d1=5, d2=4, seed=3)
    x = x[:, :4]
    xc = x - x.mean(0)
    z = torch.randn(200, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    z = z - z.mean(0)
    z = z - xc @ torch.linalg.lstsq(xc, z).solution  # residual: orthogonal to X
    y = torch.cat([y[:, :3], z], dim=1)
    acc = StreamingPanel(["x", "y"])
    acc.update({"x": x, "y": y})
    assert float(acc.moments.compute().canonical(0, 1)[0][-1]) < 1e-6
    got = acc.compute(["pwcca", "mean_cca"])
    for name in ("pwcca", "mean_cca"):
        assert got[name]["x", "y"] == pytest.approx(measure(name, x, y), abs=1e-8)
        assert got[name]["y", "x"] == pytest.approx(measure(name, y, x), abs=1e-8)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_declared_invariances_hold_and_the_others_fail(name):
    spec = get_measure(name)
    x, y = _inputs(spec)
    base = _call(name, x, y)
    lo, hi = spec.range
    assert lo - 1e-9 <= base <= hi + 1e-9
    for kind in INVARIANCES:
        moved = [abs(_call(name, _transform(kind, x, s), y) - base) for s in (1, 2, 3)]
        moved += [abs(_call(name, x, _transform(kind, y, s)) - base) for s in (1, 2, 3)]
        if kind in spec.invariances:
            assert max(moved) < 1e-7, (kind, moved)
        else:
            assert max(moved) > 1e-4, f"{name} is invariant to {kind}: declare it"


def test_symmetry_as_declared():
    for name, spec in MEASURES.items():
        x, y = _inputs(spec)
        gap = abs(_call(name, x, y) - _call(name, y, x))
        assert (gap < 1e-9) == spec.symmetric, (name, gap)


def test_closed_forms():
    x, _ = _data(n=200, d1=6)
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert measure("procrustes", x, 2 * x @ q + 1) == pytest.approx(1.0, abs=1e-12)
    for name in ("mean_cca", "pwcca", "linreg_r2"):
        assert measure(name, x, x @ a + 3) == pytest.approx(1.0, abs=1e-9), name
    assert measure("svcca", x, x @ q) == pytest.approx(1.0, abs=1e-9)
    logits = torch.randn(50, 4, generator=g, dtype=torch.float64)
    assert measure("agreement", logits, logits) == 1.0
    assert measure("cohens_kappa", logits, logits) == pytest.approx(1.0)
    assert measure("js_divergence", logits, logits) == pytest.approx(0.0, abs=1e-12)
    big = torch.tensor([[50.0, -50.0]] * 3 + [[-50.0, 50.0]] * 3)
    assert measure("js_divergence", big, -big) == pytest.approx(np.log(2), abs=1e-9)


def test_knn_and_kappa_against_hand_computed_values():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    y = torch.tensor([[0.0], [2.0], [2.5], [9.0]])
    # euclidean 1-NN: x -> [1, 0, 1, 2]; y -> [1, 2, 1, 2]: shared for examples 0, 2 and 3
    assert measure("knn_jaccard", x, y, k=1) == pytest.approx(0.75)
    pa = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2])).double()
    pb = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).double()
    # p_o = 4/6; p_e = (2*1 + 2*3 + 2*2)/36 = 1/3; kappa = (2/3 - 1/3)/(2/3) = 0.5
    assert measure("cohens_kappa", pa, pb) == pytest.approx(0.5)


def test_rsa_matches_rsatoolbox():
    rsatoolbox = pytest.importorskip("rsatoolbox")
    from rsatoolbox.rdm import calc_rdm, compare

    x, y = _data(n=60)
    want = compare(calc_rdm(rsatoolbox.data.Dataset(x.numpy()), method="euclidean"),
                   calc_rdm(rsatoolbox.data.Dataset(y.numpy()), method="euclidean"),
                   method="spearman")  # fmt: skip
    assert measure("rsa", x, y) == pytest.approx(float(want[0, 0]), abs=1e-10)


def test_mutual_knn_blockwise_equals_one_block():
    from invsim.similarity.neighbors import knn

    x, y = _data(n=500)
    for metric in ("cosine", "euclidean"):
        assert torch.equal(knn(x, 7, metric=metric, block=64), knn(x, 7, metric=metric))


def test_bad_input_is_named():
    x, y = _data(n=20)
    with pytest.raises(ValueError, match=r"unknown measure 'procrustez'.*'procrustes'"):
        measure("procrustez", x, y)
    with pytest.raises(ValueError, match="k=20 nearest neighbours need 1 <= k < n; got n=20"):
        measure("mutual_knn", x, y, k=20)
    with pytest.raises(ValueError, match="examples"):
        measure("procrustes", x, y[:10])
    with pytest.raises(ValueError, match="shapes"):
        measure("agreement", x, y)


def test_cca_warns_where_its_correlations_are_forced_to_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 20, generator=g, dtype=torch.float64)
    y = torch.randn(30, 12, generator=g, dtype=torch.float64)  # unrelated: ranks 20 + 12 >= 29
    with pytest.warns(UserWarning, match="ranks 20 and 12.*CCA overfits"):
        value = measure("mean_cca", x, y)
    assert value > 0.5  # high for unrelated data: what the warning is about
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough examples: no warning
        measure("mean_cca", torch.randn(200, 5, generator=g), torch.randn(200, 4, generator=g))
