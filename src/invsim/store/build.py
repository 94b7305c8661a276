"""Building an inverted data set: sample the pairs, invert them shard by shard (split over
torchrun ranks or job-array parts), and write them in the format of
:mod:`invsim.store.format`. A killed run resumes; a different configuration is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from invsim._io import atomic_write, json_bytes
from invsim.config import InversionConfig
from invsim.data.base import dataset_images, dataset_labels
from invsim.data.pairs import check_pairs, sample_pairs
from invsim.distributed import barrier, init_from_env
from invsim.inversion import inversion_record, invert_images
from invsim.store import format as fmt
from invsim.store.format import InvertedDataset, StoreError, merge_manifest

__all__ = ["invert_dataset"]


def invert_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    n_pairs: int,
    out_dir: str | Path,
    *,
    inversion: InversionConfig | None = None,
    rng_seed: int = 0,
    shard_size: int = 256,
    seed_images: str = "data",
    part: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> InvertedDataset | None:
    """Sample ``n_pairs`` seed/target pairs from ``dataset``, invert them through ``model``
    and store the result in ``out_dir``. Resumes a killed run; refuses a different one.

    ``inversion`` holds the settings (default: the paper's); keyword ``settings`` such as
    ``iterations=50`` or ``schedule="converge"`` are applied to it, as in
    :func:`~invsim.inversion.invert_images` (an unknown name is an error).
    ``rng_seed`` draws the pairs and the noise (a *seed* is the image an inversion
    starts from). ``seed_images="noise"`` starts from
    noise (STIR). Under torchrun the shards are
    split over the process group and every rank returns the assembled data set.
    ``part=(i, k)`` does only the shards s with s % k == i (job arrays without a process
    group); the data set is returned once every shard exists, else ``None``.

    Examples:
        >>> import tempfile, torch
        >>> from invsim.data import TensorImageDataset
        >>> from invsim.models import load_model
        >>> from invsim.store import invert_dataset
        >>> ds = TensorImageDataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 2)
        >>> out = invert_dataset(load_model("mlp"), ds, 6, tempfile.mkdtemp(), shard_size=4,
        ...                      iterations=5, progress=False)
        >>> len(out), out.images.dtype
        (6, torch.float32)
    """
    cfg = InversionConfig.merged(inversion, settings, where="invert_dataset")
    if seed_images not in ("data", "noise"):
        raise ValueError(f"seed_images must be 'data' or 'noise'; got {seed_images!r}.")
    job = _Job(model, dataset, n_pairs, Path(out_dir), cfg, rng_seed, shard_size, seed_images)
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise ValueError(f"part=(index, count) needs 0 <= index < count; got {part}.")
        job.open()
        job.run(part, device, progress)
        return _diagnosed(merge_manifest(job.out), model)
    rank, world = init_from_env(device)
    if world == 1:
        job.open()
        job.run((0, 1), device, progress)
        return _diagnosed(merge_manifest(job.out), model)
    if device is not None and str(device).startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    if rank == 0:  # rank 0 writes dataset.json first; the others then check against it
        job.open()
    barrier()
    if rank != 0:
        job.open()
    job.run((rank, world), device, progress if rank == 0 else False)
    barrier()
    if rank == 0:
        _diagnosed(merge_manifest(job.out), model)
    barrier()
    return InvertedDataset(job.out)


def _diagnosed(inv: InvertedDataset | None, model: torch.nn.Module) -> InvertedDataset | None:
    """The finished set with its diagnostics in dataset.json (computed once)."""
    if inv is not None:
        inv.diagnostics_with(model)
    return inv


@dataclass
class _Job:
    """One inverted data set to build: what to invert, where, with which settings."""

    model: torch.nn.Module
    dataset: Dataset
    n_pairs: int
    out: Path
    inversion: InversionConfig
    rng_seed: int
    shard_size: int
    seed_images: str

    def record(self) -> dict[str, Any]:
        """The ``inversion`` block of dataset.json (:func:`~invsim.inversion.inversion_record`)
        and where the inversions start."""
        return inversion_record(self.inversion) | {"seed_images": self.seed_images}

    def open(self) -> None:
        """Write dataset.json, or check that the one there has the same configuration."""
        cfg = fmt.config_record(
            self.model, self.dataset, self.n_pairs, self.rng_seed, self.shard_size, self.record()
        )
        self.config_hash = cfg["config_hash"]
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        existing = self.out / "dataset.json"
        if not existing.exists():
            atomic_write(existing, json_bytes(cfg))
            return
        old = json.loads(existing.read_text())
        if old.get("config_hash") != cfg["config_hash"]:
            diffs = fmt.config_diff(old, cfg)
            raise StoreError(
                f"{str(self.out)!r} already holds an inverted data set made with different "
                f"arguments ({'; '.join(diffs) or 'config hash differs'}). Use another out_dir, "
                "or delete this one to start over; invsim never mixes two configurations."
            )

    def run(self, part: tuple[int, int], device: Any, progress: bool | None) -> None:
        """Invert and write the shards of ``part`` that are not finished yet."""
        labels = dataset_labels(self.dataset)
        seed_idx, target_idx = sample_pairs(labels, self.n_pairs, rng_seed=self.rng_seed)
        noise = self.seed_images == "noise"
        if not noise:
            check_pairs(labels[seed_idx], labels[target_idx])
        n_shards = -(-self.n_pairs // self.shard_size)
        for s in range(part[0], n_shards, part[1]):
            if fmt.shard_done(self.out, s, self.config_hash):
                continue
            sl = slice(s * self.shard_size, min(self.n_pairs, (s + 1) * self.shard_size))
            targets = dataset_images(self.dataset, target_idx[sl])
            seeds = "noise" if noise else dataset_images(self.dataset, seed_idx[sl])
            half = self.inversion.iterations // 2
            started = time.perf_counter()
            result = invert_images(
                self.model,
                seeds,
                targets,
                self.inversion,
                device=device,
                progress=progress,
                noise_seed=self.rng_seed * 1_000_003 + s,
                snapshots=(half,),
            )
            tensors = {
                "images": result.images.float().contiguous(),
                "seed_index": torch.from_numpy(seed_idx[sl].copy()),
                "target_index": torch.from_numpy(target_idx[sl].copy()),
                "seed_label": torch.from_numpy(labels[seed_idx[sl]].astype(np.int64)),
                "target_label": torch.from_numpy(labels[target_idx[sl]].astype(np.int64)),
                "loss": result.loss.float().contiguous(),
                "initial_loss": result.initial_loss.float().contiguous(),
                "iterations": result.iterations.contiguous(),
                # the images a run with half the budget returns: the drift check
                "half_images": result.snapshots[half][0].float().contiguous(),
            }
            if result.path is not None:  # the inversion path at the snapshot losses
                tensors |= {
                    "path_images": result.path.images.contiguous(),
                    "path_loss": result.path.loss.contiguous(),
                    "path_passes": result.path.passes.contiguous(),
                }
            seconds = time.perf_counter() - started
            fmt.write_shard(self.out, s, tensors, self.config_hash, result.passes, seconds)
