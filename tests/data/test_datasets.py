"""Every data source loads with the right shapes, ranges and labels; bad files raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invsim.data import load_dataset


def _check(ds, n, shape, n_classes):
    assert len(ds) == n
    x, y = ds[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == shape
    assert isinstance(y, int) and 0 <= y < n_classes
    assert len(ds.classes) == n_classes and ds.id


def test_mnist5k_stratified_split():
    train, test = load_dataset("mnist5k", split="train"), load_dataset("mnist5k", split="test")
    _check(train, 4000, (1, 28, 28), 10)
    _check(test, 1000, (1, 28, 28), 10)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert float(train.images.max()) == 1.0
    assert load_dataset("mnist5k", split="test").id == test.id == "mnist5k:test"
    assert torch.equal(load_dataset("mnist5k", split="test").images, test.images)
    # disjoint: no test image is also a train image
    tr = {hash(x.numpy().tobytes()) for x in train.images}
    assert not any(hash(x.numpy().tobytes()) in tr for x in test.images)


def test_digits_and_resize():
    d = load_dataset("digits", split="all")
    _check(d, 1797, (1, 8, 8), 10)
    big = load_dataset("digits", split="test", size=28)
    assert big[0][0].shape == (1, 28, 28) and float(big.images.max()) <= 1.0
    assert big.id != load_dataset("digits", split="test").id


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 12, 12), dtype=np.uint8)
    y = np.arange(50) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", split="all")
    _check(ds, 50, (1, 12, 12), 5)
    assert torch.allclose(ds.images[3, 0], torch.from_numpy(x[3] / 255.0).float())
    xf = rng.random((20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=xf, y=np.arange(20) % 2)
    _check(load_dataset(str(tmp_path / "f.npz"), split="all"), 20, (3, 8, 8), 2)
    assert len(load_dataset(str(tmp_path / "f.npz"), split="test")) == 4


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((5, 4), np.uint8), np.zeros(5, int), "must be \\(N, H, W\\)"),
        (np.zeros((5, 4, 4, 3), np.uint8), np.zeros(5, int), "channels-last"),
        (np.zeros((5, 4, 4), np.uint8), np.array([0.5] * 5), "must be integers"),
        (np.full((5, 4, 4), 2.0, np.float32), np.zeros(5, int), "must lie in \\[0, 1\\]"),
        (np.zeros((5, 4, 4), np.uint8), np.zeros(4, int), "vector of 5 labels"),
    ],
)
def test_bad_npz_files(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "bad.npz", split="all")


def test_npz_missing_keys_and_corrupt(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"lacks array\(s\) \['x', 'y'\]"):
        load_dataset(tmp_path / "k.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_dataset(tmp_path / "c.npz")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = load_dataset(tmp_path / "imgs", size=16, crop=16)
    _check(ds, 6, (3, 16, 16), 2)
    assert ds.classes == ["cat", "dog"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an image folder"):
        load_dataset(tmp_path / "empty")


def test_torchvision_sets_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset(f"tv:CIFAR10:{tmp_path}")
    with pytest.raises(ValueError, match="no data set 'NotASet'"):
        load_dataset(f"tv:NotASet:{tmp_path}")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'.*mnist5k.*digits.*confound"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("mnist5k", split="val")


def _idx(path, array):
    """An MNIST idx file: magic (dtype 0x08, ndim), big-endian sizes, the bytes."""
    import struct

    head = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(head + array.astype("uint8").tobytes())


def test_a_torchvision_data_set_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    sets = {"train": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)),
            "t10k": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7))}  # fmt: skip
    for prefix, (images, labels) in sets.items():
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = load_dataset(f"tv:MNIST:{tmp_path}", split="test")
    assert len(ds) == 7 and ds.id == "tv:MNIST:test"
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == int(sets["t10k"][1][3])
    assert torch.allclose(x[0], torch.from_numpy(sets["t10k"][0][3] / 255.0).float())
    assert len(load_dataset(f"tv:MNIST:{tmp_path}", split="train")) == 12
    with pytest.raises(FileNotFoundError, match="invsim never downloads"):
        load_dataset(f"tv:MNIST:{tmp_path / 'nowhere'}", split="test")
