"""The inversion path: each example's first iterate at or below each loss level, kept by
the loop for every rule, stored with the data set, and rows compared at matched loss."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from invsim.config import ConfigError, InversionConfig
from invsim.data.pairs import sample_pairs
from invsim.inversion import inversion_record, invert_images
from invsim.models import load_model

LEVELS = [0.5, 0.2, 0.1]


def _lenet(dtype=torch.float64):
    torch.manual_seed(0)
    return load_model("lenet").to(dtype)


@pytest.fixture(scope="module")
def pairs(mnist_test):
    s, t = sample_pairs(mnist_test.labels, 6, rng_seed=2)
    return mnist_test.images[s].double(), mnist_test.images[t].double()


def test_the_path_holds_the_first_iterate_at_or_below_each_level(pairs):
    model = _lenet()
    seeds, targets = pairs
    feats = nn.Sequential(*list(model.model.children())[:-1])

    def rep(x):
        return feats((x - model.mean) / model.std)

    seen: dict[int, torch.Tensor] = {}

    def keep(t: int, x: torch.Tensor) -> None:
        seen[t] = x.clone()

    kw = {"iterations": 60, "batch_size": 6, "progress": False, "snapshot_losses": LEVELS}
    r = invert_images(model, seeds, targets, callback=keep, **kw)
    with torch.no_grad():
        t_rep = rep(targets)
        losses = torch.stack(
            [(rep(seen[t]) - t_rep).norm(dim=1) / t_rep.norm(dim=1) for t in range(60)]
        )  # (iterations, examples): the loss of every iterate the steps started from
    for j, level in enumerate(LEVELS):
        for i in range(6):
            below = (losses[:, i] <= level).nonzero()
            if not len(below):  # not before the last step: the path says so, or the end
                assert int(r.path.passes[i, j]) in (-1, 60)
                continue
            first = int(below[0])
            assert int(r.path.passes[i, j]) == first
            assert torch.equal(r.path.images[i, j], seen[first][i].float())
            assert float(r.path.loss[i, j]) == pytest.approx(float(losses[first, i]), abs=1e-6)
    assert bool((r.path.passes[:, 0] >= 0).all())  # every example passed 0.5 here


@pytest.mark.parametrize("rule", [{}, {"schedule": "converge", "horizon": 10, "stop_tol": 0.2}])
def test_the_path_does_not_depend_on_the_batch(pairs, rule):
    model = _lenet()
    seeds, targets = pairs
    kw = {"iterations": 60, "progress": False, "snapshot_losses": LEVELS, **rule}
    whole = invert_images(model, seeds, targets, batch_size=6, **kw)
    for b in (1, 4):
        other = invert_images(model, seeds, targets, batch_size=b, **kw)
        assert torch.equal(other.path.passes, whole.path.passes)
        assert torch.allclose(other.path.images, whole.path.images, atol=1e-6, equal_nan=True)


def test_snapshot_losses_are_checked_and_recorded_only_when_on():
    cfg = InversionConfig(snapshot_losses=[0.1, 0.5])
    assert cfg.snapshot_losses == [0.5, 0.1]  # descending
    assert inversion_record(cfg)["snapshot_losses"] == [0.5, 0.1]
    assert "snapshot_losses" not in inversion_record(InversionConfig())  # the paper's record
    with pytest.raises(ConfigError, match="distinct positive losses"):
        InversionConfig.checked({"snapshot_losses": [0.1, -1.0]})


@pytest.fixture(scope="module")
def path_stores(tmp_path_factory, mnist_test):
    """Two untrained models' inverted sets with a path at 0.5 (reached) and 1e-4 (not)."""
    from invsim.data import TensorImageDataset
    from invsim.store import invert_dataset

    root = tmp_path_factory.mktemp("path-stores")
    torch.manual_seed(0)
    models = {"lenet": load_model("lenet"), "mlp": load_model("mlp")}
    data = TensorImageDataset(mnist_test.images[:300], mnist_test.labels[:300], id="m300")
    kw = {"iterations": 40, "rng_seed": 1, "shard_size": 8, "progress": False}
    inverted = {
        name: invert_dataset(model, data, 24, root / name, snapshot_losses=[0.5, 1e-4], **kw)
        for name, model in models.items()
    }
    return models, inverted, root


def test_rows_at_matched_loss_use_each_examples_snapshot(path_stores):
    from invsim.experiment import RepresentationCache, inverted_similarity
    from invsim.representation import extract
    from invsim.similarity import linear_cka
    from invsim.store import InvertedDataset

    models, inverted, root = path_stores
    reopened = InvertedDataset(root / "lenet")  # the path is stored with the data set
    assert reopened.path.levels == [0.5, 1e-4]
    assert torch.equal(reopened.path.passes, inverted["lenet"].path.passes)
    cache = RepresentationCache()
    end = inverted_similarity(models, inverted, n=None, cache=cache)["linear_cka"]
    mat = inverted_similarity(models, inverted, n=None, at_loss=0.5, cache=cache)["linear_cka"]
    for i, r in enumerate(mat.rows):
        images, index = inverted[r].path.at(0.5)
        reps = {c: extract(models[c], images) for c in mat.cols}
        for j, c in enumerate(mat.cols):
            assert mat.values[i, j] == pytest.approx(linear_cka(reps[r], reps[c]), abs=1e-9)
        assert mat.flags["at_loss"]["examples"][r] == len(index) >= 10
        assert mat.flags["at_loss"]["left_out"][r] == 24 - len(index)
    assert not (mat.values == end.values).all()  # the path's images, not the end points
    # a level no example reached: the row says so instead of computing on nothing
    with pytest.warns(UserWarning, match="reached loss 0.0001"):
        low = inverted_similarity(models, inverted, n=None, at_loss=1e-4, cache=cache)
    low = low["linear_cka"]
    assert sorted(low.flags["at_loss"]["not_reached"]) == ["lenet", "mlp"]
    assert bool(torch.isnan(torch.as_tensor(low.values)).all())
    with pytest.raises(ValueError, match="no snapshots at loss 0.3"):
        inverted_similarity(models, inverted, n=None, at_loss=0.3, cache=cache)


def test_the_claims_at_matched_loss_and_where_they_disagree(path_stores, tmp_path):
    from invsim.experiment import RepresentationCache, inverted_similarity
    from invsim.experiment.matched import claims_at_matched_loss, disagreements
    from invsim.report.figures import matched_plot

    models, inverted, _ = path_stores
    cache = RepresentationCache()
    end = inverted_similarity(models, inverted, n=None, cache=cache)["linear_cka"]
    eps, arch = {"lenet": 0.0, "mlp": 1.0}, {"lenet": "lenet", "mlp": "mlp"}
    with warnings.catch_warnings():  # the untrained rows did not converge: warned about
        warnings.simplefilter("ignore")
        found = claims_at_matched_loss(
            models, inverted, end, eps, arch, measure="linear_cka", cache=cache
        )
    assert list(found["levels"]) == ["0.5"] and set(found["not_reached"]["0.0001"]) == set(models)
    at = found["levels"]["0.5"]
    n = min(at["examples_reached"].values())
    assert at["n"] == n  # the same number of examples in every row
    mat = inverted_similarity(models, inverted, n=n, at_loss=0.5, cache=cache)["linear_cka"]
    assert at["similarity"]["lenet"] == pytest.approx(mat["lenet", "mlp"])
    assert set(at["statistics"]) == set(found["end_point"]["statistics"]) == {"robustness_spearman"}
    assert matched_plot(found, eps, tmp_path / "m.png").exists()
    # a claim whose sign flips at a level is reported, with both values
    flipped = {
        "end_point": {"statistics": {"robustness_within": {"value": 0.5, "p_value": 0.01}}},
        "levels": {"0.1": {"statistics": {"robustness_within": {"value": -0.2, "p_value": 0.4}}}},
    }
    (d,) = disagreements(flipped)
    assert d["claim"] == "robustness_within" and d["level"] == 0.1 and "sign" in d["message"]
    same = {**flipped, "levels": {"0.1": {"statistics": flipped["end_point"]["statistics"]}}}
    assert disagreements(same) == []


def test_the_headline_shows_the_within_architecture_claim_at_matched_loss():
    from invsim.experiment import headline
    from invsim.results import Results

    within = {"value": 0.5, "ci_low": -0.5, "ci_high": 1.0, "p_value": 0.3}
    matched = {
        "levels": {
            "0.1": {"n": 40, "statistics": {"robustness_within": within}},
            "0.02": {"n": 30, "statistics": {"robustness_within": {**within, "value": -0.25}}},
        },
        "disagreements": [{"claim": "robustness_within", "level": 0.02}],
    }
    text = headline(Results(extra={"matched": matched}))
    assert "at matched inversion loss 0.02 (30 examples per row): mean Spearman -0.25" in text
    assert "differs from the end point" in text
    assert "matched" not in headline(Results())
