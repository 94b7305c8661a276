"""invert_dataset / InvertedDataset: provenance, resume, refusal, corruption."""

from __future__ import annotations

import json

import pytest
import torch

import invsim.store.build as store_build
import invsim.store.format as store_format
from invsim.data import TensorImageDataset
from invsim.models import load_model
from invsim.store import InvertedDataset, StoreError, export_image_folder, invert_dataset


@pytest.fixture(scope="module")
def small_data(mnist_test):
    return TensorImageDataset(mnist_test.images[:200], mnist_test.labels[:200], id="mnist-200")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("lenet")


KW = {"iterations": 8, "shard_size": 4, "progress": False, "rng_seed": 1}


def test_writes_shards_provenance_and_manifest(tmp_path, model, small_data):
    ds = invert_dataset(model, small_data, 10, tmp_path, **KW)
    assert isinstance(ds, InvertedDataset) and len(ds) == 10
    assert ds.images.dtype == torch.float32 and ds.images.shape == (10, 1, 28, 28)
    assert torch.all(ds.seed_labels != ds.target_labels)
    assert torch.equal(ds.target_labels, small_data.labels[ds.target_index])
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert torch.all(ds.loss <= ds.initial_loss)
    cfg = json.loads((tmp_path / "dataset.json").read_text())
    assert cfg["dataset"] == {"id": "mnist-200", "size": 200}
    assert cfg["pairs"] == {"n_pairs": 10, "rng_seed": 1}
    assert cfg["inversion"]["step_size"] == 1 / 8 and cfg["inversion"]["iterations"] == 8
    assert cfg["inversion"]["momentum"] == 0.9 and cfg["inversion"]["eps"] == 1000.0
    assert cfg["versions"]["torch"] == torch.__version__
    assert cfg["model"]["fingerprint"] and len(cfg["config_hash"]) == 16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [r["n"] for r in manifest["shards"]] == [4, 4, 2]
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == int(ds.target_labels[3])
    assert not list(tmp_path.rglob("*.tmp"))
    # what the inversions took, per shard, outside the data and the hashed provenance
    timing = sorted((tmp_path / "shards").glob("timing-*.json"))
    assert [json.loads(p.read_text())["shard"] for p in timing] == [0, 1, 2]
    assert ds.seconds == pytest.approx(sum(json.loads(p.read_text())["seconds"] for p in timing))
    assert ds.seconds > 0
    timing[0].write_text("{not json")  # unreadable: the store still opens, time unknown
    assert InvertedDataset(tmp_path).seconds is None
    timing[1].unlink()  # a store written before invsim kept it: the same
    assert InvertedDataset(tmp_path).seconds is None


# normalised momentum with per-example decay: quick settings under which examples stop
# at different steps
CONVERGE = {
    **KW,
    "iterations": 80,
    "rule": "converging-momentum",
    "momentum": 0.9,
    "decay_patience": 3,
    "decay_tol": 0.1,
    "horizon": 10,
    "stop_tol": 0.1,
}


# L-BFGS steps, stopping at their loss_tol or by the horizon rule
LBFGS = {
    **KW,
    "iterations": 60,
    "schedule": "converge",
    "loss_tol": 0.3,
    "horizon": 10,
    "stop_tol": 0.1,
    "stall": "stop",
}


# the converging schedule as it is: a stalled example goes on with the paper's steps
HANDOVER = {
    **KW,
    "iterations": 60,
    "schedule": "converge",
    "loss_tol": 0.1,
    "horizon": 10,
    "stop_tol": 0.1,
}


@pytest.mark.parametrize(
    "settings",
    [KW, CONVERGE, LBFGS, HANDOVER],
    ids=["paper", "converging-momentum", "lbfgs", "lbfgs-then-paper-steps"],
)
def test_resume_after_kill_is_byte_identical(
    tmp_path, model, small_data, monkeypatch, settings, store_files
):
    whole = tmp_path / "whole"
    invert_dataset(model, small_data, 10, whole, **settings)

    killed = tmp_path / "killed"
    real = store_format.write_shard
    calls = {"n": 0}

    def dying(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed after the first shard")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(store_format, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        invert_dataset(model, small_data, 10, killed, **settings)
    monkeypatch.setattr(store_format, "write_shard", real)
    with pytest.raises(StoreError, match="incomplete: 1 of 3 shards"):
        InvertedDataset(killed)

    inverted = []
    real_invert = store_build.invert_images

    def counting(*args, **kwargs):
        inverted.append(1)
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(store_build, "invert_images", counting)
    resumed = invert_dataset(model, small_data, 10, killed, **settings)
    assert len(inverted) == 2  # the finished shard was skipped
    assert store_files(killed) == store_files(whole)
    assert resumed.seconds > 0  # the killed run's shard kept its time
    if settings is not KW:  # examples stopped at different passes, some before the cap
        cap = settings["iterations"]
        assert len(set(resumed.iterations.tolist())) > 1 and int(resumed.iterations.min()) < cap
    # the cost is recorded: one evaluation per step plus the last iterate, per pair
    assert resumed.passes == int(resumed.iterations.sum()) + 10
    assert json.loads((killed / "dataset.json").read_text())["passes"] == resumed.passes
    assert resumed.half_images is not None and resumed.half_images.shape == resumed.images.shape


def test_different_arguments_are_refused(tmp_path, model, small_data):
    invert_dataset(model, small_data, 6, tmp_path, **KW)
    with pytest.raises(StoreError, match=r"different arguments .*iterations: 8 -> 9"):
        invert_dataset(model, small_data, 6, tmp_path, **{**KW, "iterations": 9})
    other = load_model("lenet")  # different weights
    with pytest.raises(StoreError, match="model.fingerprint"):
        invert_dataset(other, small_data, 6, tmp_path, **KW)


def test_corrupt_shard_is_named(tmp_path, model, small_data):
    invert_dataset(model, small_data, 6, tmp_path, **KW)
    shard = tmp_path / "shards" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard shards/shard-00001.safetensors is corrupt"):
        InvertedDataset(tmp_path)


def test_faults_met_on_resume_recover_or_name_the_file(tmp_path, model, small_data, store_files):
    whole = tmp_path / "whole"
    invert_dataset(model, small_data, 10, whole, **KW)
    reference = store_files(whole)
    # 1. a kill mid-write leaves a truncated temporary file and no shard 1: resume writes
    #    shard 1 in full beside it, and the data set is the uninterrupted one
    cut = tmp_path / "cut"
    invert_dataset(model, small_data, 10, cut, **KW)
    shard = cut / "shards" / "shard-00001.safetensors"
    (cut / "shards" / ".shard-00001.safetensors.99999.tmp").write_bytes(shard.read_bytes()[:50])
    shard.unlink()
    (cut / "shards" / "shard-00001.json").unlink()
    (cut / "manifest.json").unlink()
    with pytest.raises(StoreError, match="incomplete: 2 of 3 shards"):
        InvertedDataset(cut)
    invert_dataset(model, small_data, 10, cut, **KW)
    got = {k: v for k, v in store_files(cut).items() if not k.endswith(".tmp")}
    assert got == reference
    # 2. a shard whose bytes no longer match its record (truncated on disk): resume
    #    recomputes it; opening without resuming names it
    bad = tmp_path / "bad"
    invert_dataset(model, small_data, 10, bad, **KW)
    shard = bad / "shards" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match="shard shards/shard-00002.safetensors is corrupt"):
        InvertedDataset(bad)
    invert_dataset(model, small_data, 10, bad, **KW)
    assert store_files(bad) == reference
    # 3. a shard present but missing from the manifest: an error naming it, not a shorter
    #    data set; resuming rebuilds the manifest
    short = tmp_path / "short"
    invert_dataset(model, small_data, 10, short, **KW)
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1] + manifest["shards"][2:]
    (short / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"missing: shards/shard-00001.safetensors"):
        InvertedDataset(short)
    assert len(invert_dataset(model, small_data, 10, short, **KW)) == 10
    assert store_files(short) == reference


def test_same_label_and_single_class_data_raise(tmp_path, model):
    one = TensorImageDataset(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="single class"):
        invert_dataset(model, one, 4, tmp_path, **KW)


def test_parts_partition_the_work(tmp_path, model, small_data, store_files):
    single = tmp_path / "single"
    invert_dataset(model, small_data, 10, single, **KW)
    split = tmp_path / "split"
    assert invert_dataset(model, small_data, 10, split, part=(1, 2), **KW) is None
    done = invert_dataset(model, small_data, 10, split, part=(0, 2), **KW)
    assert done is not None and len(done) == 10
    assert store_files(split) == store_files(single)


def test_noise_seeds_and_export(tmp_path, model, small_data):
    ds = invert_dataset(model, small_data, 5, tmp_path / "d", seed_images="noise", **KW)
    assert (
        json.loads((tmp_path / "d" / "dataset.json").read_text())["inversion"]["seed_images"]
        == "noise"
    )
    out = export_image_folder(ds, tmp_path / "png")
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 5
    assert {p.parent.name for p in pngs} == {str(int(v)) for v in ds.target_labels}
