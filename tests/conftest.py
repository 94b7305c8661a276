"""Shared fixtures: built-in data and small models trained in seconds."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# the built-in data cache lives in a temporary directory for the session (and for the CLI
# subprocesses, which inherit the environment); tests never touch ~/.cache
os.environ["INVSIM_CACHE"] = tempfile.mkdtemp(prefix="invsim-cache-")


@pytest.fixture(scope="session")
def mnist_train():
    from invsim.data import load_dataset

    return load_dataset("mnist5k", split="train")


@pytest.fixture(scope="session")
def mnist_test():
    from invsim.data import load_dataset

    return load_dataset("mnist5k", split="test")


@pytest.fixture(scope="session")
def trained_lenet(mnist_train, mnist_test):
    """A LeNet trained on MNIST-5k for a few epochs (~2 s on 2 cores)."""
    from invsim.train import train_model

    model, metrics = train_model(
        "lenet", mnist_train, epochs=6, test_dataset=mnist_test, progress=False, rng_seed=0
    )
    assert metrics["clean_acc"] > 0.93, metrics
    return model


@pytest.fixture(scope="session")
def store_files():
    """``files(root)``: {relative path: bytes} for every file of an inverted store, its
    shards' timing aside (how long a shard took is not data), for byte-identity checks."""

    def files(root):
        kept = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("timing-"))
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in kept}

    return files
