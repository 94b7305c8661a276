"""Layer-by-layer similarity: exact against per-layer extract + linear_cka, any budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from invsim import LayerSimilarity, MinibatchCKA, layer_similarity, linear_cka
from invsim.experiment.layers import plan_passes
from invsim.models import load_model
from invsim.representation import capture_layers, extract, select_layers
from invsim.results import depth_profile
from invsim.similarity.layerwise import GramTiles


def _exact_reference(models, x, layers, batch_size):
    """Every cell by the one-layer path: extract (same batches) then linear_cka."""
    reps = {
        k: {name: extract(m, x, layer=name, batch_size=batch_size).double() for name in layers[k]}
        for k, m in models.items()
    }
    return {
        (a, b, deb): np.array(
            [
                [linear_cka(reps[a][la], reps[b][lb], debiased=deb) for lb in layers[b]]
                for la in layers[a]
            ]
        )  # fmt: skip
        for a in models
        for b in models
        for deb in (False, True)
    }


def _check(res: LayerSimilarity, want) -> None:
    for (a, b, deb), values in want.items():
        got = res.pair(a, b, "debiased_cka" if deb else "linear_cka").values
        assert np.abs(got - values).max() < 1e-10, (a, b, deb)


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    a = load_model("tv:resnet18", num_classes=10, image_size=32)
    torch.manual_seed(1)
    b = load_model("tv:resnet18", num_classes=10, image_size=32)
    return {"a": a, "b": b}


def test_layer_matrix_equals_per_layer_cka_for_resnets_in_one_pass_and_in_many(resnets):
    # 40 images, layers up to 16,384 wide (far wider than n), mean-shifted inputs
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    kw = {"layers": "blocks", "measures": ["linear_cka", "debiased_cka"], "batch_size": 8}
    one = layer_similarity(resnets, x, rng_seed=None, **kw)  # the data's order: extract's batches
    assert one.schedule["passes"] == 1 and max(one.dims["a"]) > 40 * 100
    want = _exact_reference(resnets, x, one.layers, 8)
    _check(one, want)
    # a budget too small for one block: several passes, the same numbers
    many = layer_similarity(resnets, x, rng_seed=None, block=8, **kw)
    assert many.schedule["passes"] == 5
    _check(many, want)
    assert one.pair("a", "a")["model.layer1", "model.layer1"] == pytest.approx(1.0, abs=1e-12)
    # a random example order (the jackknife's groups) changes no value beyond float32
    # forward noise, and every cell has its interval and (linear CKA) its null mean
    shuffled = layer_similarity(resnets, x, **kw)
    assert np.abs(shuffled.values["linear_cka"] - one.values["linear_cka"]).max() < 1e-6
    cell = shuffled.pair("a", "b", "linear_cka")
    assert (cell.stats["ci_low"] <= cell.stats["ci_centre"]).all()
    assert (cell.stats["ci_centre"] <= cell.stats["ci_high"]).all()
    assert np.allclose(cell.stats["ci_centre"], shuffled.pair("a", "b", "debiased_cka").values)
    assert (
        shuffled.about["ci_centre"] == "debiased_cka" and "jackknife" in shuffled.about["ci_method"]
    )
    # a round trip through JSON keeps every value and the labels
    back = LayerSimilarity.from_dict(one.to_dict())
    assert back.pair("a", "b").rows == one.layers["a"]
    assert np.allclose(back.values["linear_cka"], one.values["linear_cka"], atol=0, rtol=0)


def test_layer_matrix_equals_per_layer_cka_for_a_timm_vit():
    pytest.importorskip("timm")
    torch.manual_seed(3)
    vit = load_model("timm:vit_tiny_patch16_224", num_classes=10, image_size=32, patch_size=8,
                     depth=3)  # fmt: skip
    lenet = load_model("lenet", in_channels=3, image_size=32)
    models = {"vit": vit, "lenet": lenet}
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    layers = {"vit": ["patch_embed", "blocks.*", "penultimate"], "lenet": "blocks"}
    res = layer_similarity(models, x, layers=layers, measures=["linear_cka", "debiased_cka"],
                           batch_size=6, block=12, rng_seed=None)  # fmt: skip
    assert res.layers["vit"][1:4] == [f"model.blocks.{i}" for i in range(3)]
    assert max(res.dims["vit"]) > 24 and res.schedule["passes"] > 1
    _check(res, _exact_reference(models, x, res.layers, 6))


def test_hooks_keep_bn1s_own_output_before_the_in_place_relu(resnets):
    m = resnets["a"]
    x = torch.rand(4, 3, 32, 32)
    with (
        torch.inference_mode(),
        capture_layers(m, ["model.bn1", "model.relu"], example_input=x) as read,
    ):
        got = read(x)
    assert (got["model.bn1"] < 0).any()  # bn1's own output, not overwritten by the ReLU
    assert torch.equal(got["model.relu"], got["model.bn1"].clamp(min=0))
    # and the hooks are gone afterwards: a plain forward runs no capture
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_a_module_run_twice_per_forward_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(self.block(x.flatten(1))))

    x = torch.rand(5, 1, 2, 2)
    with (
        pytest.raises(ValueError, match="'block'.*runs 2 times"),
        capture_layers(Twice(), ["block"], example_input=x),
    ):
        pass


def test_the_schedule_fits_the_budget_and_says_when_it_cannot():
    s = plan_passes([200_704, 512], 10_000, batch_size=100, budget=4e9, reserved=1e9)
    assert s.bytes <= 4e9 and s.passes == -(-10_000 // s.block) and s.block % 100 == 0
    assert plan_passes([200_704, 512], 10_000, batch_size=100, budget=4e9).block > s.block
    assert s.forwarded == sum(10_000 - p * s.block for p in range(s.passes))
    assert plan_passes([64, 32], 500, batch_size=100, budget=4e9).passes == 1
    with pytest.raises(ValueError, match="0.1 GB cannot hold one batch.*Raise memory_gb"):
        plan_passes([200_704], 10_000, batch_size=100, budget=1e8)
    assert plan_passes([64], 500, batch_size=100, budget=4e9, block=250).block == 200


def test_gram_tiles_equal_full_data_cka_for_any_tiling():
    g = torch.Generator().manual_seed(5)
    x = 30 + torch.randn(37, 50, generator=g, dtype=torch.float64).relu() * 0.1  # mean >> sd
    y = torch.cat([x[:, :5] ** 2, torch.randn(37, 3, generator=g, dtype=torch.float64)], 1)
    for block, batch in ((37, 37), (12, 4), (8, 8), (10, 5)):
        acc = GramTiles(37, shifts=[x[:batch].mean(0), y[:batch].mean(0)])
        for i0 in range(0, 37, block):
            held = [x[i0 : i0 + block], y[i0 : i0 + block]]
            for j0 in range(i0, 37, batch):
                stop = min(j0 + batch, 37)
                if j0 < i0 + block and stop > i0 + block:  # split a straddling batch
                    acc.update(held, i0, [x[j0 : i0 + block], y[j0 : i0 + block]], j0)
                    acc.update(held, i0, [x[i0 + block : stop], y[i0 + block : stop]],
                                 i0 + block)  # fmt: skip
                else:
                    acc.update(held, i0, [x[j0:stop], y[j0:stop]], j0)
        for deb in (False, True):
            assert float(acc.compute(debiased=deb)[0, 1]) == pytest.approx(
                linear_cka(x, y, debiased=deb), abs=1e-10)  # fmt: skip


def test_minibatch_estimator_is_named_and_equals_minibatch_cka():
    torch.manual_seed(6)
    models = {"a": load_model("lenet"), "b": load_model("mlp")}
    x = torch.rand(48, 1, 28, 28)
    res = layer_similarity(
        models, x, layers="penultimate", estimator="minibatch", batch_size=16, rng_seed=None
    )
    acc = MinibatchCKA()
    ra, rb = extract(models["a"], x, batch_size=16), extract(models["b"], x, batch_size=16)
    for xa, xb in zip(ra.split(16), rb.split(16), strict=True):
        acc.update(xa, xb)
    m = res.pair("a", "b")
    assert m.flags == {"estimator": "minibatch"}
    assert m["penultimate", "penultimate"] == pytest.approx(acc.compute(), abs=1e-10)


def test_bad_requests_name_the_value_and_the_fix():
    models = {"a": load_model("lenet")}
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(ValueError, match="'procrustes'.*natural_similarity"):
        layer_similarity(models, x, layers="penultimate", measures=["procrustes"])
    with pytest.raises(ValueError, match="unknown layer 'nosuch'"):
        layer_similarity(models, x, layers=["nosuch"])
    with pytest.raises(ValueError, match="n=9 asked for.*8 images"):
        layer_similarity(models, x, layers="penultimate", n=9)


def test_depth_profile_reads_the_diagonal_of_same_relative_depth():
    layers = {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2", "b3", "b4"]}
    v = np.arange(64, dtype=float).reshape(8, 8)
    res = LayerSimilarity(["a", "b"], layers, {"a": [1] * 3, "b": [1] * 5},
                          {"linear_cka": v}, n=10, row="a")  # fmt: skip
    got = [p["mean"] for p in depth_profile(res)]
    # a's layer i at depth i/2 meets b's layer round(i/2 * 4) = 0, 2, 4 (columns 3, 5, 7)
    assert got == [v[0, 3], v[1, 5], v[2, 7]]


TINY_VIT = {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}  # fmt: skip


def test_hugging_face_models_are_one_more_source_with_named_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from invsim.models import save_model

    torch.manual_seed(7)
    vit = load_model("hf:vit", num_classes=10, in_channels=3, image_size=32, **TINY_VIT)
    assert isinstance(vit.model, transformers.ViTForImageClassification)
    assert select_layers(vit, "blocks") == ["model.vit.layers.0", "model.vit.layers.1"]
    # a local directory (save_pretrained) and an invsim checkpoint load the same network
    vit.model.save_pretrained(tmp_path / "vit")
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    same = load_model(f"hf:{tmp_path / 'vit'}")
    save_model(vit, tmp_path / "vit.safetensors")
    again = load_model(str(tmp_path / "vit.safetensors"))
    with torch.inference_mode():
        want = vit(x).logits
        assert torch.allclose(same(x).logits, want) and torch.allclose(again(x).logits, want)
    models = {"vit": vit, "lenet": load_model("lenet", in_channels=3, image_size=32)}
    layers = {"vit": ["blocks", "penultimate"], "lenet": ["model.3", "penultimate"]}
    res = layer_similarity(models, x, layers=layers, measures=["linear_cka", "debiased_cka"],
                           batch_size=5, rng_seed=None)  # fmt: skip
    _check(res, _exact_reference(models, x, res.layers, 5))
    with pytest.raises(ValueError, match="unknown Hugging Face model type 'nosuch'"):
        load_model("hf:nosuch")


def _tiles(x, y, groups, block=16, batch=8):
    n = len(x)
    acc = GramTiles(n, shifts=[x[:batch].mean(0), y[:batch].mean(0)], groups=groups)
    for i0 in range(0, n, block):
        held = [x[i0 : i0 + block], y[i0 : i0 + block]]
        for j0 in range(i0, n, batch):
            acc.update(held, i0, [x[j0 : j0 + batch], y[j0 : j0 + batch]], j0)
    return acc


def test_grouped_jackknife_and_null_mean_equal_their_definitions():
    from invsim.similarity import calibrate

    g = torch.Generator().manual_seed(9)
    x = 3 + torch.randn(48, 20, generator=g, dtype=torch.float64).relu()
    y = x[:, :6] @ torch.randn(6, 9, generator=g, dtype=torch.float64)
    y = y + torch.randn(48, 9, generator=g, dtype=torch.float64)
    acc = _tiles(x, y, groups=5)  # groups of 9-10 examples; tiles cut across them
    est, se = acc.jackknife(debiased=True)
    b = acc.bounds
    loo = []
    for k in range(5):
        keep = [i for i in range(48) if not b[k] <= i < b[k + 1]]
        loo.append(linear_cka(x[keep], y[keep], debiased=True))
    want = (4 / 5 * sum((v - np.mean(loo)) ** 2 for v in loo)) ** 0.5
    assert float(se[0, 1]) == pytest.approx(want, abs=1e-10)
    assert float(est[0, 1]) == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-10)
    # the exact permutation-null mean, as the one-layer calibration computes it
    c = calibrate(x, y, n_perm=1)
    assert float(acc.null_mean()[0, 1]) == pytest.approx(c.null_mean, abs=1e-10)


def test_layer_intervals_cover_the_population_cka_where_n_is_below_the_width():
    # the regime of inverted sets: n at or below the widths; 100 draws per population
    from scipy.stats import t as student_t

    from invsim.similarity.populations import Population

    q = float(student_t.ppf(0.975, 19))
    for n, widths, kw in ((64, (256, 256), {"shared": 0.5, "noise": 0.5}),
                          (48, (128, 384), {"kind": "readout", "noise": 0.3})):  # fmt: skip
        pop = Population(widths=widths, rng_seed=0, **kw)
        gen, hits = torch.Generator().manual_seed(10), 0
        for _ in range(100):
            x, y = (v.double() for v in pop.draw(n, gen))
            est, se = _tiles(x, y, groups=20, block=n, batch=n).jackknife(debiased=True)
            hits += abs(float(est[0, 1]) - pop.cka) <= q * float(se[0, 1])
        assert 88 <= hits <= 100, (n, widths, hits)
