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

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from invsim._io import atomic_write, json_bytes
from invsim.config import InversionConfig
from invsim.data.pairs import check_pairs, sample_pairs
from invsim.distributed import barrier, init_from_env
from invsim.inversion import acting_settings, invert_images
from invsim.models.checkpoints import sha256_file

__all__ = [
    "InvertedDataset",
    "StoreError",
    "export_image_folder",
    "invert_dataset",
    "merge_manifest",
    "model_fingerprint",
]

FORMAT = "invsim-inverted/1"
# provenance that does not change the data: recorded, but not part of the config hash
_NOT_HASHED = ("versions", "checkpoint", "passes")


class StoreError(ValueError):
    """An inverted data set on disk is inconsistent, incomplete or corrupt."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's weights and buffers (normalisation included).

    It identifies what the model computes, whatever file it came from: two runs that
    train the same weights share inverted data and cached representations even though
    their checkpoint files (which carry timings) differ. The checkpoint file's own
    sha256 is recorded separately as provenance.
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return "weights:" + h.hexdigest()


def dataset_labels(dataset: Dataset) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def dataset_images(dataset: Dataset, index: Sequence[int]) -> torch.Tensor:
    if hasattr(dataset, "images") and isinstance(dataset.images, torch.Tensor):
        return dataset.images[torch.as_tensor(np.asarray(index), dtype=torch.long)]
    return torch.stack([dataset[int(i)][0] for i in index])


def _config(model, dataset, n_pairs, seed, shard_size, inversion: dict[str, Any]) -> dict:
    meta = getattr(model, "invsim_meta", {}) or {}
    import invsim

    cfg = {
        "format": FORMAT,
        "model": {
            "spec": meta.get("spec", f"custom:{type(model).__name__}"),
            "fingerprint": model_fingerprint(model),
        },
        "checkpoint": {"path": meta.get("checkpoint"), "sha256": meta.get("sha256")},
        "dataset": {"id": getattr(dataset, "id", type(dataset).__name__), "size": len(dataset)},
        "pairs": {"n_pairs": n_pairs, "seed": seed},
        "shard_size": shard_size,
        "inversion": inversion,
        "versions": {"invsim": invsim.__version__, "torch": torch.__version__},
    }
    hashed = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    cfg["config_hash"] = hashlib.sha256(json_bytes(hashed)).hexdigest()[:16]
    return cfg


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k in _NOT_HASHED or k == "config_hash":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def invert_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    n_pairs: int,
    out_dir: str | Path,
    *,
    inversion: InversionConfig | None = None,
    seed: int = 0,
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
    ``iterations=50`` replace its fields (an unknown name is an error).
    ``seed_images="noise"`` starts from noise (STIR). Under torchrun the shards are
    split over the process group and every rank returns the assembled data set.
    ``part=(i, k)`` does only the shards s with s % k == i (job arrays without a process
    group); the data set is returned once every shard exists, else ``None``.

    Example:
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
    cfg = inversion or InversionConfig()
    if settings:
        cfg = cfg.replace(**settings)
    if seed_images not in ("data", "noise"):
        raise ValueError(f"seed_images must be 'data' or 'noise'; got {seed_images!r}.")
    job = _Job(model, dataset, n_pairs, Path(out_dir), cfg, seed, shard_size, seed_images)
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise ValueError(f"part=(index, count) needs 0 <= index < count; got {part}.")
        job.open()
        job.run(part, device, progress)
        return merge_manifest(job.out)
    rank, world = init_from_env(device)
    if world == 1:
        job.open()
        job.run((0, 1), device, progress)
        return merge_manifest(job.out)
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
        merge_manifest(job.out)
    barrier()
    return InvertedDataset(job.out)


@dataclass
class _Job:
    """One inverted data set to build: what to invert, where, with which settings."""

    model: torch.nn.Module
    dataset: Dataset
    n_pairs: int
    out: Path
    inversion: InversionConfig
    seed: int
    shard_size: int
    seed_images: str

    def record(self) -> dict[str, Any]:
        """The ``inversion`` block of dataset.json: settings that act only (``patience``
        with ``tol``; the decay settings with ``schedule="converge"``), so a store made
        before a setting existed keeps its configuration hash."""
        return acting_settings(self.inversion) | {"seed_images": self.seed_images}

    def open(self) -> None:
        """Write dataset.json, or check that the one there has the same configuration."""
        cfg = _config(
            self.model, self.dataset, self.n_pairs, self.seed, self.shard_size, self.record()
        )
        self.config_hash = cfg["config_hash"]
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        existing = self.out / "dataset.json"
        if not existing.exists():
            atomic_write(existing, json_bytes(cfg))
            return
        old = json.loads(existing.read_text())
        if old.get("config_hash") != cfg["config_hash"]:
            diffs = _diff(old, cfg)
            raise StoreError(
                f"{str(self.out)!r} already holds an inverted data set made with different "
                f"arguments ({'; '.join(diffs) or 'config hash differs'}). Use another out_dir, "
                "or delete this one to start over; invsim never mixes two configurations."
            )

    def run(self, part: tuple[int, int], device: Any, progress: bool | None) -> None:
        """Invert and write the shards of ``part`` that are not finished yet."""
        labels = dataset_labels(self.dataset)
        seed_idx, target_idx = sample_pairs(labels, self.n_pairs, seed=self.seed)
        noise = self.seed_images == "noise"
        if not noise:
            check_pairs(labels[seed_idx], labels[target_idx])
        n_shards = -(-self.n_pairs // self.shard_size)
        for s in range(part[0], n_shards, part[1]):
            if _shard_done(self.out, s, self.config_hash):
                continue
            sl = slice(s * self.shard_size, min(self.n_pairs, (s + 1) * self.shard_size))
            targets = dataset_images(self.dataset, target_idx[sl])
            seeds = "noise" if noise else dataset_images(self.dataset, seed_idx[sl])
            half = self.inversion.iterations // 2
            result = invert_images(
                self.model,
                seeds,
                targets,
                **self.inversion.model_dump(),
                device=device,
                progress=progress,
                noise_seed=self.seed * 1_000_003 + s,
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
            _write_shard(self.out, s, tensors, self.config_hash, result.passes)


def _write_shard(
    out: Path, s: int, tensors: dict[str, torch.Tensor], config_hash: str, passes: int
) -> None:
    from safetensors.torch import save

    data = save(tensors, metadata={"invsim": json.dumps({"shard": s, "config_hash": config_hash})})
    name = _shard_name(s)
    atomic_write(out / "shards" / f"{name}.safetensors", data)
    record = {
        "shard": s,
        "file": f"shards/{name}.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "n": int(tensors["images"].shape[0]),
        "passes": int(passes),
        "config_hash": config_hash,
    }
    atomic_write(out / "shards" / f"{name}.json", json_bytes(record))


def _shard_done(out: Path, s: int, config_hash: str) -> bool:
    rec_path = out / "shards" / f"{_shard_name(s)}.json"
    if not rec_path.exists():
        return False
    rec = json.loads(rec_path.read_text())
    file = out / rec["file"]
    return (
        rec.get("config_hash") == config_hash
        and file.exists()
        and sha256_file(file) == rec["sha256"]
    )


def merge_manifest(out_dir: str | Path) -> InvertedDataset | None:
    """Write ``manifest.json`` once every shard's record exists; return the data set.

    Returns ``None`` (and writes nothing) while shards are missing, e.g. while other
    processes or array jobs are still working.
    """
    out = Path(out_dir)
    cfg = json.loads((out / "dataset.json").read_text())
    n_pairs, shard_size = cfg["pairs"]["n_pairs"], cfg["shard_size"]
    n_shards = -(-n_pairs // shard_size)
    records = []
    for s in range(n_shards):
        rec_path = out / "shards" / f"{_shard_name(s)}.json"
        if not rec_path.exists():
            return None
        records.append(json.loads(rec_path.read_text()))
    passes = sum(r.get("passes", 0) for r in records)
    manifest = {
        "config_hash": cfg["config_hash"],
        "n": n_pairs,
        "passes": passes,
        "shards": records,
    }
    path = out / "manifest.json"
    if not path.exists() or json.loads(path.read_text()) != manifest:
        atomic_write(path, json_bytes(manifest))
    if cfg.get("passes") != passes:  # the cost, beside the provenance (not hashed)
        atomic_write(out / "dataset.json", json_bytes({**cfg, "passes": passes}))
    return InvertedDataset(out)


def _read_manifest(root: Path, path: Path, cfg: dict) -> dict:
    """The manifest of a finished store, checked against ``dataset.json``: every shard
    listed once, in order, with its pair count. An unfinished store, a foreign manifest or
    a shard left out of it is an error naming it, never a silently shorter data set."""
    if not path.exists():
        done = len(list((root / "shards").glob("shard-*.json")))
        total = -(-cfg["pairs"]["n_pairs"] // cfg["shard_size"])
        raise StoreError(
            f"{str(root)!r} is incomplete: {done} of {total} shards are finished. Run "
            "invert_dataset (or `invsim invert`) again with the same arguments to resume, "
            "or `invsim invert --merge` once all parts are done."
        )
    manifest = json.loads(path.read_text())
    if manifest["config_hash"] != cfg["config_hash"]:
        raise StoreError(f"manifest.json in {str(root)!r} belongs to another config.")
    n_shards = -(-cfg["pairs"]["n_pairs"] // cfg["shard_size"])
    listed = [rec["shard"] for rec in manifest["shards"]]
    missing = sorted(set(range(n_shards)) - set(listed))
    if missing or listed != list(range(n_shards)) or manifest["n"] != cfg["pairs"]["n_pairs"]:
        names = ", ".join(f"shards/{_shard_name(s)}.safetensors" for s in missing) or "none"
        raise StoreError(
            f"manifest.json in {str(root)!r} does not list the {n_shards} shards of "
            f"{cfg['pairs']['n_pairs']} pairs (missing: {names}). Run invert_dataset (or "
            "`invsim invert`) again with the same arguments, or `invsim invert --merge`, to "
            "rebuild it from the shards."
        )
    return manifest


class InvertedDataset(Dataset):
    """A stored inverted data set: items are (inverted image, target label).

    On open it checks the manifest against ``dataset.json`` and every shard's sha256,
    naming any corrupt or missing shard. Whole tensors: ``images`` (float32),
    ``target_labels``, ``seed_labels``, ``seed_index``, ``target_index``, ``loss``,
    ``initial_loss``, ``iterations``, ``half_images`` (the images half the budget gave,
    for the drift check); ``passes`` is the image evaluations spent; ``config`` is the
    provenance and ``id`` identifies the set.
    """

    def __init__(self, out_dir: str | Path, *, verify: bool = True):
        from safetensors import SafetensorError
        from safetensors.torch import load

        self.root = Path(out_dir)
        cfg_path, man_path = self.root / "dataset.json", self.root / "manifest.json"
        if not cfg_path.exists():
            raise StoreError(f"{str(self.root)!r} is not an inverted data set (no dataset.json).")
        self.config = json.loads(cfg_path.read_text())
        manifest = _read_manifest(self.root, man_path, self.config)
        parts: dict[str, list[torch.Tensor]] = {}
        for rec in manifest["shards"]:
            path = self.root / rec["file"]
            if not path.exists():
                raise StoreError(f"shard {rec['file']} listed in the manifest is missing.")
            data = path.read_bytes()
            if verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise StoreError(
                    f"shard {rec['file']} is corrupt: its sha256 does not match the manifest. "
                    "Delete it and its .json record, then resume to recompute it."
                )
            try:
                tensors = load(data)
            except SafetensorError as e:
                raise StoreError(f"shard {rec['file']} cannot be read ({e}).") from e
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v)
        cat = {k: torch.cat(v) for k, v in parts.items()}
        self.images: torch.Tensor = cat["images"]
        if self.images.dtype != torch.float32:
            raise StoreError(f"images are {self.images.dtype}; inverted images must be float32.")
        self.target_labels: torch.Tensor = cat["target_label"]
        self.seed_labels: torch.Tensor = cat["seed_label"]
        self.seed_index: torch.Tensor = cat["seed_index"]
        self.target_index: torch.Tensor = cat["target_index"]
        self.loss: torch.Tensor = cat["loss"]
        self.initial_loss: torch.Tensor = cat["initial_loss"]
        self.iterations: torch.Tensor = cat["iterations"]
        # what half the budget returned (None for sets stored before invsim kept it)
        self.half_images: torch.Tensor | None = cat.get("half_images")
        self.passes: int = int(manifest.get("passes", 0))
        self.labels = self.target_labels
        self.id = f"inverted:{self.config['config_hash']}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.target_labels[i])

    def __repr__(self) -> str:
        return (
            f"InvertedDataset({str(self.root)!r}, n={len(self)}, model="
            f"{self.config['model']['spec']!r}, median loss={float(self.loss.median()):.3f})"
        )


def export_image_folder(
    inverted: InvertedDataset, out_dir: str | Path, classes: Sequence[str] | None = None
) -> Path:
    """Write the inverted images as PNGs, one folder per target class, for viewing only.

    PNG is 8-bit: analysis must read the float32 shards, never these files.
    """
    from torchvision.utils import save_image

    out = Path(out_dir)
    for i, (img, label) in enumerate(zip(inverted.images, inverted.target_labels, strict=True)):
        name = classes[int(label)] if classes is not None else str(int(label))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        save_image(img, folder / f"{i:06d}.png")
    return out
