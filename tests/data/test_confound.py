"""The confound set: ground truth, and the effect it exists to show."""

from __future__ import annotations

import pytest
import torch

from invsim import linear_cka
from invsim.data import load_dataset
from invsim.data.confound import glyphs, make_confound
from invsim.representation import extract
from invsim.train import accuracy, train_model


def test_variants_follow_their_definition():
    both = make_confound("both", n=300, split="test")
    only_a = make_confound("only_a", n=300, split="test")
    only_b = make_confound("only_b", n=300, split="test")
    assert torch.equal(both.feature_a, both.labels) and torch.equal(both.feature_b, both.labels)
    assert torch.equal(only_a.feature_a, only_a.labels)
    assert torch.equal(only_b.feature_b, only_b.labels)
    # the other feature is a uniformly random class: agrees with the label ~1/10 of the time
    assert 0.03 < float((only_a.feature_b == only_a.labels).float().mean()) < 0.2
    assert float(both.images.min()) >= 0.0 and float(both.images.max()) <= 1.0


def test_seedable_and_splits_differ():
    a = make_confound("both", n=20, split="train", rng_seed=3)
    b = make_confound("both", n=20, split="train", rng_seed=3)
    c = make_confound("both", n=20, split="test", rng_seed=3)
    assert torch.equal(a.images, b.images) and a.id == b.id
    assert not torch.equal(a.images, c.images) and a.id != c.id


def test_parameters_and_errors():
    ds = load_dataset(
        "confound",
        split="test",
        variant="only_b",
        n=30,
        image_size=32,
        channels=3,
        num_classes=4,
        agree=0.5,
    )
    assert ds.images.shape == (30, 3, 32, 32) and len(ds.classes) == 4
    with pytest.raises(ValueError, match="unknown confound variant"):
        make_confound("neither")
    with pytest.raises(ValueError, match="too small"):
        make_confound(image_size=16)


def test_glyphs_are_equidistant():
    g = glyphs(10, 8, salt=0).reshape(10, -1)
    d = torch.cdist(torch.from_numpy(g), torch.from_numpy(g), p=1)
    off = d[~torch.eye(10, dtype=torch.bool)]
    assert torch.all(off == off[0]) and off[0] > 0


@pytest.fixture(scope="module")
def confound_models():
    kw = {"epochs": 4, "progress": False}
    only_a = make_confound("only_a", split="train")
    only_b = make_confound("only_b", split="train")
    return {
        "A": train_model("mlp", only_a, rng_seed=0, **kw)[0],
        "A2": train_model("mlp", only_a, rng_seed=1, **kw)[0],
        "B": train_model("mlp", only_b, rng_seed=0, **kw)[0],
    }


def test_models_use_only_their_feature(confound_models):
    test = {v: make_confound(v, split="test") for v in ("both", "only_a", "only_b")}
    a, b = confound_models["A"], confound_models["B"]
    assert accuracy(a, test["both"]) > 0.95 and accuracy(b, test["both"]) > 0.95
    assert accuracy(a, test["only_b"]) < 0.25 and accuracy(b, test["only_a"]) < 0.25
    assert accuracy(a, test["only_a"]) > 0.95 and accuracy(b, test["only_b"]) > 0.95


def test_natural_cka_calls_them_similar(confound_models):
    x = make_confound("both", split="test").images
    reps = {k: extract(m, x) for k, m in confound_models.items()}
    assert linear_cka(reps["A"], reps["B"]) >= 0.6
    assert linear_cka(reps["A"], reps["A2"]) >= 0.7
