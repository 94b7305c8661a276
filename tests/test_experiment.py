"""Matrices, caching, summaries, STIR, config validation, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import invsim.store as store
import invsim.store.format as store_format
from invsim import linear_cka
from invsim.config import ConfigError, InversionConfig, load_config, validate
from invsim.data import TensorImageDataset
from invsim.experiment import (
    RepresentationCache,
    inverted_similarity,
    natural_similarity,
    robustness_summary,
    stir_similarity,
    summarize,
)
from invsim.inversion import inversion_record
from invsim.models import load_model
from invsim.representation import extract
from invsim.results import Results
from invsim.similarity import SimilarityMatrix
from invsim.store import invert_dataset


@pytest.fixture(scope="module")
def zoo(trained_lenet):
    torch.manual_seed(1)
    return {"lenet": trained_lenet, "mlp": load_model("mlp"), "vgg": load_model("vgg")}


@pytest.fixture(scope="module")
def data(mnist_test):
    return TensorImageDataset(mnist_test.images[:120], mnist_test.labels[:120], id="m120")


def test_natural_matrix_matches_pairwise_cka_and_computes_each_rep_once(zoo, data):
    cache = RepresentationCache()
    found = natural_similarity(zoo, data, n=100, cache=cache)
    assert list(found) == ["linear_cka"]  # one name or a list: the same return type
    m = found["linear_cka"]
    assert cache.stats == {"hits": 0, "computed": 3}
    assert np.allclose(m.values, m.values.T) and np.allclose(np.diag(m.values), 1)
    reps = {k: extract(v, data.images[:100]) for k, v in zoo.items()}
    assert m["lenet", "vgg"] == pytest.approx(linear_cka(reps["lenet"], reps["vgg"]), abs=1e-6)


def test_inverted_matrix_definition_and_cache_on_disk(tmp_path, zoo, data):
    kw = {"iterations": 10, "shard_size": 8, "progress": False}
    inverted = {k: invert_dataset(zoo[k], data, 16, tmp_path / k, **kw) for k in ("lenet", "mlp")}
    cache = RepresentationCache(tmp_path / "cache")
    (m,) = inverted_similarity(zoo, inverted, cache=cache).values()
    assert m.rows == ["lenet", "mlp"] and m.cols == ["lenet", "mlp", "vgg"]
    assert cache.stats["computed"] == 6  # 3 models x 2 data sets, not once per entry
    x = inverted["mlp"].images
    want = linear_cka(extract(zoo["mlp"], x), extract(zoo["vgg"], x))
    assert m["mlp", "vgg"] == pytest.approx(want, abs=1e-6)
    assert m["mlp", "mlp"] == pytest.approx(1.0)
    again = RepresentationCache(tmp_path / "cache")
    (m2,) = inverted_similarity(zoo, inverted, cache=again).values()
    assert again.stats == {"hits": 6, "computed": 0}
    assert np.array_equal(m.values, m2.values)
    # adding one model computes only what is new
    bigger = {**zoo, "lenet2": load_model("lenet")}
    third = RepresentationCache(tmp_path / "cache")
    inverted_similarity(bigger, inverted, cache=third)
    assert third.stats == {"hits": 6, "computed": 2}


def test_summaries():
    m = SimilarityMatrix(["a", "b", "c"], ["a", "b", "c"],
                         np.array([[1, 0.2, 0.4], [0.6, 1, 0.3], [0.4, 0.5, 1.0]]))  # fmt: skip
    s = summarize(m)
    assert s["offdiag_mean"] == pytest.approx(np.mean([0.2, 0.4, 0.6, 0.3, 0.4, 0.5]))
    assert s["offdiag_median"] == pytest.approx(0.4)
    assert s["row_means"]["a"] == pytest.approx(0.3) and s["col_means"]["a"] == pytest.approx(0.5)
    assert s["asymmetry"] == pytest.approx(np.mean([0.4, 0.0, 0.2] * 2))
    r = robustness_summary(m, {"a": 0, "b": 1, "c": 3}, {"a": "x", "b": "x", "c": "y"})
    assert r["per_model"]["a"]["mean_similarity"] == pytest.approx(np.mean([0.2, 0.4, 0.6, 0.4]))
    assert -1 <= r["spearman"] <= 1


def test_stir(tmp_path, zoo, data):
    models = {k: zoo[k] for k in ("lenet", "mlp")}
    (m,) = stir_similarity(
        models, data, tmp_path, n=24, iterations=40, progress=False, shard_size=24
    ).values()
    inv = {k: store.InvertedDataset(tmp_path / k) for k in models}
    assert m.values.shape == (2, 2)
    assert (
        json.loads((tmp_path / "lenet" / "dataset.json").read_text())["inversion"]["seed_images"]
        == "noise"
    )
    assert np.all(m.values <= 1 + 1e-9)
    assert m["lenet", "lenet"] > 0.5  # inverting through a model preserves its own view
    # orientation, from the definition: entry (row m1, column m2) = STIR(m2 | m1) = CKA of
    # m2 on the natural targets X and on X' inverted through m1 (the row model)
    x = data.images[inv["lenet"].target_index]
    want = linear_cka(extract(zoo["mlp"], x), extract(zoo["mlp"], inv["lenet"].images))
    other = linear_cka(extract(zoo["lenet"], data.images[inv["mlp"].target_index]),
                       extract(zoo["lenet"], inv["mlp"].images))  # fmt: skip
    assert m["lenet", "mlp"] == pytest.approx(want, abs=1e-9)
    assert m["mlp", "lenet"] == pytest.approx(other, abs=1e-9)
    assert abs(want - other) > 1e-3  # the transposed matrix would fail the lines above


BASE = {"out": "runs/x", "data": {"dataset": "mnist5k"},
        "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}}]}  # fmt: skip


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"outt": "x"}, "unknown key 'outt'"),
        ({"data": {"dataset": "mnist5k", "pairz": 3}}, "unknown key 'data.pairz'"),
        ({"inversion": {"iterations": "many"}}, "'inversion.iterations' must be int"),
        ({"inversion": {"use_best": 1}}, "'inversion.use_best' must be bool"),
        ({"models": [{"name": "a", "spec": "mlp"}]}, "needs a 'checkpoint' or a 'train'"),
        ({"models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1, "adversarial": {}}}]},
         "adversarial.eps"),
        ({"measures": ["linear_cka", "cka"]}, "unknown measure 'cka'"),
        ({"measures": ["natural", "inverted"]}, "put them under 'regimes:'"),
        ({"regimes": ["natural", "warped"]}, "unknown regime 'warped'"),
        ({"models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1.5}}]},
         "'models\\[0\\].train.epochs' must be int"),
    ],
)  # fmt: skip
def test_config_validation_names_the_key(patch, message):
    with pytest.raises(ConfigError, match=message):
        validate({**BASE, **patch})


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("out: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "ok.yaml").write_text(json.dumps(BASE))
    assert load_config(tmp_path / "ok.yaml", out="elsewhere").out == "elsewhere"


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    assert len(EXAMPLES) >= 4
    cfg = load_config(path)
    assert cfg.models and cfg.out


def _small_config(out):
    return validate({
        "out": str(out), "rng_seed": 0,
        "data": {"dataset": "digits", "size": 28, "natural_n": 100, "pairs": 12},
        "models": [{"name": "mlp", "spec": "mlp", "train": {"epochs": 1}},
                   {"name": "mlp-r", "spec": "mlp",
                    "train": {"epochs": 1, "adversarial": {"eps": 0.5, "steps": 2}}}],
        "inversion": {"iterations": 20, "batch_size": 12, "shard_size": 4},
    })  # fmt: skip


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    from invsim.experiment import run_experiment

    whole = run_experiment(_small_config(tmp_path / "whole"), quiet=True)
    real = store_format.write_shard
    calls = {"n": 0}

    def dying(*a, **k):
        if calls["n"] == 4:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(store_format, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_small_config(tmp_path / "cut"), quiet=True)
    monkeypatch.setattr(store_format, "write_shard", real)
    resumed = run_experiment(_small_config(tmp_path / "cut"), quiet=True)
    for key in ("natural", "inverted"):
        assert np.array_equal(resumed["matrices"][key]["values"], whole["matrices"][key]["values"])
    for p in (tmp_path / "whole" / "inverted").rglob("*.safetensors"):
        q = tmp_path / "cut" / p.relative_to(tmp_path / "whole")
        assert q.read_bytes() == p.read_bytes()

    # the time: per stage, and what the run costs from scratch even when it reuses it all
    from invsim.experiment import STAGES
    from invsim.store import InvertedDataset

    before = [s.name for s in STAGES][: [s.name for s in STAGES].index("provenance")]
    assert list(whole.provenance["stage_seconds"]) == before
    again = run_experiment(_small_config(tmp_path / "whole"), quiet=True).provenance
    stores = [InvertedDataset(tmp_path / "whole" / "inverted" / m) for m in ("mlp", "mlp-r")]
    made = sum(s.seconds for s in stores) + sum(
        r["training"]["train_seconds"] + r["training"]["eval_seconds"]
        for r in whole.models.values()
    )
    assert again["stage_seconds"]["inverted"] < sum(s.seconds for s in stores)
    assert again["from_scratch_seconds"] >= made + again["stage_seconds"]["matrices"]
    assert again["seconds"] < again["from_scratch_seconds"]


def _check_orientation(out, results, cfg):
    """One off-diagonal cell of the inverted and the STIR matrices in results.json,
    recomputed by hand from the stores: which model's data, which model's representation."""
    from invsim.experiment.stages import load_data
    from invsim.store import InvertedDataset

    names = results["matrices"]["inverted"]["rows"]
    r, c = names[0], names[1]
    models = {n: load_model(str(out / "models" / f"{n}.safetensors")) for n in names}
    inv = InvertedDataset(out / "inverted" / r)
    got = SimilarityMatrix.from_dict(results["matrices"]["inverted"])
    # inverted: row r, column c = CKA(Rep_r(X_r), Rep_c(X_r)) on ROW model r's data
    want = linear_cka(extract(models[r], inv.images), extract(models[c], inv.images))
    assert got[r, c] == pytest.approx(want, abs=1e-9)
    stir = SimilarityMatrix.from_dict(results["matrices"]["stir"])
    x_inv = InvertedDataset(out / "stir" / r)
    eval_ds = load_data(cfg)
    x = eval_ds.images[x_inv.target_index]
    # STIR: row r (inverted through r), column c (c's representation)
    want = linear_cka(extract(models[c], x), extract(models[c], x_inv.images))
    assert stir[r, c] == pytest.approx(want, abs=1e-9)


def test_pipeline_with_stir_writes_every_output(tmp_path):
    from invsim.experiment import run_experiment

    cfg = _small_config(tmp_path / "run").replace(
        regimes=["natural", "inverted", "stir"],
        stir={"n": 12, "iterations": 10, "seed_images": "noise"},
        inversion={"iterations": 20, "batch_size": 12, "shard_size": 4,
                   "snapshot_losses": [0.95, 1e-6]},
    )  # fmt: skip
    results = run_experiment(cfg, quiet=True)
    # the claims at matched convergence: every level all rows reached, beside the end point
    matched = results["matched"]
    assert set(matched["levels"]) == {"0.95"} and set(matched["not_reached"]) == {"1e-06"}
    assert (
        matched["levels"]["0.95"]["statistics"].keys() == matched["end_point"]["statistics"].keys()
    )
    assert "The claims at matched convergence" in (tmp_path / "run" / "report.html").read_text()
    stir_m = np.array(results["matrices"]["stir"]["values"])
    assert stir_m.shape == (2, 2)
    _check_orientation(tmp_path / "run", results, cfg)
    assert (tmp_path / "run" / "stir.csv").exists()
    assert (tmp_path / "run" / "figures" / "stir.png").exists()
    assert "STIR" in (tmp_path / "run" / "report.html").read_text()
    assert results["robustness"]["stir"]["per_model"]["mlp-r"]["eps"] == 0.5


def test_a_measure_registered_here_reaches_results_and_report(tmp_path):
    from invsim.experiment import run_experiment
    from invsim.similarity import MEASURES, Measure, register

    def mean_abs_corr(X, Y):  # a toy measure, defined and registered only in this test
        x = torch.as_tensor(X, dtype=torch.float64)
        y = torch.as_tensor(Y, dtype=torch.float64)
        x, y = (
            (x - x.mean(0)) / x.std(0).clamp_min(1e-12),
            (y - y.mean(0)) / y.std(0).clamp_min(1e-12),
        )
        return float((x.T @ y / (len(x) - 1)).abs().mean())

    register(Measure("toy_abs_corr", mean_abs_corr, (0.0, 1.0), description="a test's own"))
    try:
        cfg = _small_config(tmp_path / "run").replace(
            measures=["linear_cka", "toy_abs_corr", "agreement"]
        )
        results = run_experiment(cfg, quiet=True)
    finally:
        del MEASURES["toy_abs_corr"]
    toy = results["measures"]["toy_abs_corr"]
    assert set(toy) == {"natural", "inverted"} and toy["inverted"]["measure"] == "toy_abs_corr"
    assert results["panel"]["toy_abs_corr"]["natural_offdiag_mean"] > 0
    assert results["matrices"]["natural"]["measure"] == "linear_cka"  # the primary measure
    agree = np.array(results["measures"]["agreement"]["natural"]["values"])
    assert np.allclose(np.diag(agree), 1.0) and (agree <= 1).all()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "toy_abs_corr" in html and "Every measure" in html
    assert (tmp_path / "run" / "figures" / "measures.png").stat().st_size > 1000
    with open(tmp_path / "run" / "inverted.csv") as f:
        assert any(",toy_abs_corr," in line for line in f)


def test_functional_measure_needs_logits():
    from invsim.data import TensorImageDataset
    from invsim.experiment import natural_similarity

    class Features(torch.nn.Module):  # no classifier output: returns a dict of features
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            self.head(h)
            return {"features": h}

    ds = TensorImageDataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 2)
    models = {"a": Features().eval(), "b": Features().eval()}
    with pytest.raises(ValueError, match="needs the model's logits.*returns dict"):
        natural_similarity(models, ds, measures=["agreement"])


@pytest.mark.parametrize("name", ["jones2022-imagenet", "klabunde2025-imagenet100"])
def test_reproduction_configs_are_ready_to_fill_in(name):
    root = Path(__file__).resolve().parents[1] / "examples" / "reproduce"
    cfg = load_config(root / f"{name}.yaml")
    text = (root / f"{name}.yaml").read_text()
    assert "Checkpoints:" in text  # each names where its checkpoints come from
    # the paper's settings, as they act (a config may pin the paper's momentum, 0.9)
    paper = inversion_record(InversionConfig(batch_size=128))
    assert inversion_record(cfg.inversion.settings()) == paper
    assert all(m.checkpoint and m.checkpoint.startswith("/path/to/") for m in cfg.models)
    eps = {m.eps for m in cfg.models}
    assert len(eps) >= 4 and 0 in eps and cfg.regimes == ["natural", "inverted"]
    archs = {m.spec for m in cfg.models}
    assert len(archs) >= (8 if name.startswith("jones") else 5)
    if name.startswith("klabunde"):
        assert eps == {0, 0.25, 0.5, 1, 3} and {"procrustes", "knn_jaccard"} <= set(cfg.measures)


def test_half_budget_drift_is_flagged(tmp_path, monkeypatch):
    from invsim.experiment import run_experiment, stages

    monkeypatch.setattr(stages, "DRIFT_THRESHOLD", 0.001)  # so that these tiny runs move
    results = run_experiment(_small_config(tmp_path / "run"), quiet=True)
    d = results["drift"]
    assert d["half_iterations"] == 10 and d["threshold"] == 0.001
    inverted = {
        k: store.InvertedDataset(tmp_path / "run" / "inverted" / k) for k in ("mlp", "mlp-r")
    }
    models = {
        k: load_model(str(tmp_path / "run" / "models" / f"{k}.safetensors")) for k in inverted
    }
    half = {
        k: type("Half", (), {"images": v.half_images, "id": f"h{k}"})() for k, v in inverted.items()
    }
    want = np.abs(inverted_similarity(models, half)["linear_cka"].values
                  - np.array(results["matrices"]["inverted"]["values"]))  # fmt: skip
    assert d["max_change"] == pytest.approx(float(want.max()), abs=1e-9)
    assert len(d["moved"]) == int((want > 0.001).sum()) > 0
    assert all(m["change"] > 0.001 for m in d["moved"])
    assert any(w["kind"] == "not_settled" for w in results["warnings"])
    assert "Not settled" in (tmp_path / "run" / "report.html").read_text()


def test_claim_statistics_properties():
    from invsim.experiment.summary import claim_statistics

    names = list("abcdefgh")
    eps = dict(zip(names, [0, 0.1, 0.2, 0.5, 1, 2, 3, 5], strict=True))
    trend = np.array([[1.0 if r == c else 0.1 * (i + j) / 14 for j, c in enumerate(names)]
                      for i, r in enumerate(names)])  # fmt: skip
    inv = SimilarityMatrix(names, names, trend)  # symmetric, similarity rising with eps
    s = claim_statistics(SimilarityMatrix(names, names, trend + 0.5 - 0.5 * np.eye(8)), inv, eps)
    rob = s["robustness_spearman"]
    assert rob["value"] == pytest.approx(1.0) and rob["p_value"] < 0.01
    assert rob["ci_low"] <= 1.0 <= rob["ci_high"] + 1e-12
    assert s["asymmetry"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    gap = s["natural_minus_inverted"]
    assert gap["value"] == pytest.approx(0.5) and gap["ci_low"] == pytest.approx(0.5)
    assert gap["p_value"] < 0.01
    same = claim_statistics(inv, inv, eps)["natural_minus_inverted"]
    assert same["value"] == 0 and same["p_value"] == 1.0


def test_robustness_within_architectures_as_the_paper_states_it():
    from invsim.experiment.summary import claim_statistics, cross_architecture_similarity

    # four architectures, each a standard and a robust model. Every robust row is closer to
    # the OTHER architectures, but each architecture's own twin is what makes the
    # all-model statistic noisy: the paper's statistic must see the trend, the old one not
    archs = ["cnn", "mlp", "lenet", "vgg"]
    names = [f"{a}-{k}" for a in archs for k in ("std", "rob")]
    eps = {n: (0.5 if n.endswith("rob") else 0.0) for n in names}
    arch = {n: n.split("-")[0] for n in names}
    level = {"cnn": 0.1, "mlp": 0.5, "lenet": 0.3, "vgg": 0.7}  # per-architecture offset
    values = np.eye(8)
    for i, r in enumerate(names):
        for j, c in enumerate(names):
            if i != j:
                own = arch[r] == arch[c]
                values[i, j] = 0.9 if own else level[arch[r]] + (0.05 if eps[r] else 0.0)
    inv = SimilarityMatrix(names, names, values)
    s = claim_statistics(None, inv, eps, arch=arch)
    within = s["robustness_within"]
    assert within["value"] == pytest.approx(1.0) and sorted(within["rising"]) == sorted(archs)
    # exact stratified null: 2^4 within-architecture swaps, two of them (all up, all
    # down) as extreme as the data
    assert within["p_value"] == pytest.approx(2 / 16)
    sim = cross_architecture_similarity(inv, arch)
    assert sim["cnn-rob"] == pytest.approx(0.15) and sim["vgg-std"] == pytest.approx(0.7)
    assert within["cross_architecture_similarity"] == sim
    # the older all-model statistic is kept beside it, and misses the trend here
    assert s["robustness_spearman"]["p_value"] > 0.2
    # a falling trend reads -1
    flipped = {n: 0.5 - e for n, e in eps.items()}
    assert claim_statistics(None, inv, flipped, arch=arch)["robustness_within"]["value"] == -1


def test_matrix_calibration_matches_calibrate(monkeypatch):
    from invsim.config import CalibrationConfig
    from invsim.experiment.matrices import panel
    from invsim.similarity import calibrate, calibration

    g = torch.Generator().manual_seed(7)
    base = torch.randn(150, 6, generator=g, dtype=torch.float64)
    reps = {"a": base, "b": base @ torch.randn(6, 9, generator=g, dtype=torch.float64),
            "c": torch.randn(150, 12, generator=g, dtype=torch.float64)}  # fmt: skip
    # the matrix sweeps its Gram matrices a few rows at a time (here 7 rows a block, a
    # partial block last); each calibrate() below takes its pair's in one block
    monkeypatch.setattr(calibration, "PAIR_BLOCK", 3 * 150 * 7)
    m = panel(reps, ["linear_cka"], calibration=CalibrationConfig(n_perm=300))
    m = m["linear_cka"]
    monkeypatch.undo()
    for r in reps:
        for c in reps:
            i, j = m.rows.index(r), m.cols.index(c)
            one = calibrate(reps[r], reps[c], n_perm=300)
            assert m.stats["ci_low"][i, j] <= m.stats["ci_high"][i, j]
            if r == c:
                assert m.stats["ci_low"][i, j] == pytest.approx(1.0)  # CKA(X, X) = 1 always
            # a cell of the matrix is calibrate() of its pair
            for k in ("ci_low", "ci_high", "null_mean", "p_value"):
                assert m.stats[k][i, j] == pytest.approx(getattr(one, k), rel=1e-5, abs=1e-12)
    assert m.stats["p_value"][0, 1] < 1e-12  # b is a linear map of a
    assert m.stats["p_value"][0, 2] > 0.01  # c is unrelated to a
    permuted = CalibrationConfig(n_perm=300, null="permutation")
    mc = panel(reps, ["linear_cka"], calibration=permuted)["linear_cka"]
    assert mc.stats["p_value"][0, 1] == pytest.approx(1 / 301)
    # the permutation null's Monte-Carlo mean agrees with the exact one
    assert np.allclose(mc.stats["null_mean"], m.stats["null_mean"], atol=0.02)


def test_invert_false_and_arch_kwargs_reach_the_run(tmp_path):
    from invsim.experiment import run_experiment

    cfg = validate({
        "out": str(tmp_path / "run"), "rng_seed": 0,
        "data": {"dataset": "digits", "size": 28, "natural_n": 60, "pairs": 8},
        "models": [{"name": "wide", "spec": "mlp", "arch_kwargs": {"width": 48},
                    "train": {"epochs": 1}},
                   {"name": "column", "spec": "mlp", "invert": False, "train": {"epochs": 1}}],
        "inversion": {"iterations": 4, "batch_size": 8},
    })  # fmt: skip
    results = run_experiment(cfg, quiet=True, report=False)
    inv = results["matrices"]["inverted"]
    assert inv["rows"] == ["wide"] and inv["cols"] == ["wide", "column"]  # a column only
    assert not (tmp_path / "run" / "inverted" / "column").exists()
    wide = load_model(str(tmp_path / "run" / "models" / "wide.safetensors"))
    assert wide.invsim_meta["arch_kwargs"] == {"width": 48}
    assert extract(wide, torch.rand(2, 1, 28, 28)).shape == (2, 24)  # width // 2 features


def test_a_models_own_layer_is_honoured(tmp_path):
    """ModelConfig.layer: that model is inverted at its layer and read at it everywhere;
    the others keep the run's layer."""
    from invsim.experiment import run_experiment
    from invsim.store import InvertedDataset

    cfg = validate({
        "out": str(tmp_path / "run"), "rng_seed": 0,
        "data": {"dataset": "digits", "size": 28, "natural_n": 60, "pairs": 8},
        "models": [{"name": "early", "spec": "mlp", "layer": "model.2", "train": {"epochs": 1}},
                   {"name": "late", "spec": "mlp", "train": {"epochs": 1}}],
        "inversion": {"iterations": 4, "batch_size": 8},
        "layers": {"select": "blocks", "n": 40, "measures": ["linear_cka", "debiased_cka"]},
    })  # fmt: skip
    results = run_experiment(cfg, quiet=True, report=False)
    out = tmp_path / "run"
    early, late = (load_model(str(out / "models" / f"{n}.safetensors")) for n in ("early", "late"))
    inv = InvertedDataset(out / "inverted" / "early")
    assert inv.config["inversion"]["layer"] == "model.2"
    assert InvertedDataset(out / "inverted" / "late").config["inversion"]["layer"] == "penultimate"
    x = inv.images
    a, b = extract(early, x, layer="model.2"), extract(late, x)
    assert a.shape[1] != b.shape[1]  # really another layer
    got = SimilarityMatrix.from_dict(results["matrices"]["inverted"])
    assert got["early", "late"] == pytest.approx(linear_cka(a, b), abs=1e-9)
    # a store made at one layer is refused for another
    with pytest.raises(ValueError, match="made at layer 'model.2'"):
        inverted_similarity({"early": early}, {"early": inv}, layer="penultimate")
    # the layer-by-layer view: early's inverted set (inverted at model.2) read at every
    # stage of both models, labelled, in results.json and the CSVs, and it round-trips
    by_depth = results.layers["inverted"]["early"].pair("early", "late", "debiased_cka")
    assert by_depth.rows == [f"model.{i}" for i in range(6)] == by_depth.cols
    want = linear_cka(extract(early, x, layer="model.2"), extract(late, x, layer="model.4"),
                      debiased=True)  # fmt: skip
    assert by_depth["model.2", "model.4"] == pytest.approx(want, abs=1e-6)
    assert results.layers["natural"].n == 40
    assert Results.read(out) == results
    head = (out / "layers-inverted-early.csv").read_text().splitlines()[:2]
    assert head[0].startswith("images,row_model,row_layer,column_model,column_layer")
    assert head[1].startswith("early,early,model.0,early,model.0,linear_cka,1,")
    assert head[0].endswith("value,ci_low,ci_high,ci_centre,null_mean")


def test_dcka_deconfounds_against_each_regimes_own_images(tmp_path, zoo, data):
    """natural: the natural images; inverted: the row model's inverted images; STIR has
    no common inputs and refuses it by name."""
    from invsim.similarity import measure

    models = {k: zoo[k] for k in ("lenet", "mlp")}
    nat = natural_similarity(models, data, n=60, measures=["linear_cka", "dcka"])["dcka"]
    x = data.images[:60]
    reps = {k: extract(m, x) for k, m in models.items()}
    want = measure("dcka", reps["lenet"], reps["mlp"], inputs=x)
    assert nat["lenet", "mlp"] == pytest.approx(want, abs=1e-9)
    assert nat.options == {}  # the images are data, not a recorded option
    inv = {"mlp": invert_dataset(models["mlp"], data, 16, tmp_path / "mlp", iterations=20,
                                 shard_size=16, progress=False)}  # fmt: skip
    got = inverted_similarity(models, inv, measures="dcka")["dcka"]
    xi = inv["mlp"].images
    want = measure("dcka", extract(models["mlp"], xi), extract(models["lenet"], xi), inputs=xi)
    assert got["mlp", "lenet"] == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="STIR compares"):
        stir_similarity(models, data, tmp_path / "stir", n=8, measures=["dcka"])
