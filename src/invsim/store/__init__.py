"""Inverted data sets on disk: float32 safetensors shards, provenance, atomic writes, resume.

Layout of ``out_dir``::

    dataset.json                 provenance: model, data, pairs, every hyperparameter, hash
    shards/shard-00000.safetensors   images, seed/target index and label, loss (float32)
    shards/shard-00000.json          the shard's record (sha256, count), written after it
    manifest.json                all shard records; written once every shard is finished

Every file is written under a temporary name and renamed, so a killed run leaves only
finished shards; running again with the same arguments skips them and produces
byte-identical files (on CPU). A different configuration on the same directory is
refused. Shards can be split across processes (``part=(i, k)``: shards s with
s % k == i): under torchrun ``invert_dataset`` does this by itself, one rank a part, and
job arrays pass ``part``.
"""

from invsim.data.base import dataset_images, dataset_labels
from invsim.models.checkpoints import model_fingerprint
from invsim.store.build import invert_dataset
from invsim.store.format import (
    ImageSet,
    InvertedDataset,
    StoreError,
    export_image_folder,
    merge_manifest,
)

__all__ = [
    "ImageSet",
    "InvertedDataset",
    "StoreError",
    "dataset_images",
    "dataset_labels",
    "export_image_folder",
    "invert_dataset",
    "merge_manifest",
    "model_fingerprint",
]
