"""Diagnostics travel with the inverted data: kept in dataset.json, a property of the
set, each example's stopping reason, and a warning plus a flag wherever an unconverged
row produces numbers."""

from __future__ import annotations

import json

import pytest
import torch

from invsim.data import TensorImageDataset
from invsim.experiment import inverted_similarity
from invsim.models import load_model
from invsim.store import InvertedDataset, invert_dataset
from invsim.store.diagnostics import CONVERGED_LOSS, InversionWarning, inversion_diagnostics


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("diag")
    ds = TensorImageDataset(torch.rand(40, 1, 28, 28), torch.arange(40) % 4, id="rand40")
    models = {"a": load_model("mlp"), "b": load_model("lenet")}
    kw = {"shard_size": 8, "progress": False}
    # 2 iterations cannot reach a random target: an unconverged row
    sets = {k: invert_dataset(m, ds, 12, root / k, iterations=2, **kw) for k, m in models.items()}
    return models, sets, root


def test_diagnostics_are_kept_in_dataset_json_and_read_back(stores):
    models, sets, root = stores
    on_disk = json.loads((root / "a" / "dataset.json").read_text())["diagnostics"]
    assert on_disk == sets["a"].diagnostics == InvertedDataset(root / "a").diagnostics
    again = inversion_diagnostics(models["a"], sets["a"])  # what the model says now
    assert again["stop_reasons"] == on_disk["stop_reasons"]
    for k in ("median_loss", "p90_loss", "fraction_converged", "target_accuracy"):
        assert again[k] == pytest.approx(on_disk[k], abs=1e-12), k
    assert on_disk["criterion"] == CONVERGED_LOSS and not on_disk["converged"]
    assert sum(on_disk["stop_reasons"].values()) == 12
    assert sets["a"].stop_reasons == ["cap"] * 12  # the paper's schedule ran to its cap


def test_a_store_written_before_diagnostics_were_kept_still_opens(stores, tmp_path):
    import shutil

    _, sets, root = stores
    old = tmp_path / "old"
    shutil.copytree(root / "a", old)
    cfg = json.loads((old / "dataset.json").read_text())
    del cfg["diagnostics"]
    (old / "dataset.json").write_text(json.dumps(cfg))
    inv = InvertedDataset(old)
    d = inv.diagnostics  # computed on first use, from the losses
    assert d["median_loss"] == pytest.approx(sets["a"].diagnostics["median_loss"])
    assert "target_accuracy" not in d


def test_inverted_similarity_warns_and_flags_an_unconverged_row(stores):
    models, sets, _ = stores
    with pytest.warns(InversionWarning) as caught:
        (m,) = inverted_similarity(models, sets).values()
    text = " ".join(str(w.message) for w in caught)
    median = sets["a"].diagnostics["median_loss"]
    assert "'a'" in text or "a's" in text
    assert f"{median:.3f}" in text and str(CONVERGED_LOSS) in text
    assert m.flags["not_converged"] == ["a", "b"]
    assert m.to_dict()["flags"] == {"not_converged": ["a", "b"]}
