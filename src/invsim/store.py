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
s % k == i), which is how torchrun and job arrays share the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from invsim.data.pairs import check_pairs, sample_pairs
from invsim.inversion import PAPER_DEFAULTS, invert_images
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
_NOT_HASHED = ("versions", "checkpoint")


class StoreError(ValueError):
    """An inverted data set on disk is inconsistent, incomplete or corrupt."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


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
    cfg["config_hash"] = hashlib.sha256(_json_bytes(hashed)).hexdigest()[:16]
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
    seed: int = 0,
    shard_size: int = 256,
    part: tuple[int, int] = (0, 1),
    device: str | torch.device | None = None,
    progress: bool | None = None,
    **inversion_kwargs: Any,
) -> InvertedDataset | None:
    """Sample ``n_pairs`` seed/target pairs from ``dataset``, invert them through ``model``
    and store the result in ``out_dir``. Resumes a killed run; refuses a different one.

    ``inversion_kwargs`` go to :func:`invsim.inversion.invert_images` (paper defaults
    otherwise); ``seed_images="noise"`` gives STIR-style noise seeds. ``part=(i, k)``
    does only the shards s with s % k == i (other processes do the rest); the data set
    is returned once every shard exists, else ``None``.

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
    out = Path(out_dir)
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part=(index, count) needs 0 <= index < count; got {part}.")
    noise = inversion_kwargs.get("seed_images") == "noise"
    inversion = {**PAPER_DEFAULTS, "layer": "penultimate", **inversion_kwargs}
    inversion.setdefault("tol", None)
    inversion.setdefault("fake_relu", False)
    inversion.setdefault("amp", False)
    inversion["seed_images"] = "noise" if noise else "data"
    cfg = _config(model, dataset, n_pairs, seed, shard_size, inversion)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    existing = out / "dataset.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if old.get("config_hash") != cfg["config_hash"]:
            diffs = _diff(old, cfg)
            raise StoreError(
                f"{str(out)!r} already holds an inverted data set made with different arguments "
                f"({'; '.join(diffs) or 'config hash differs'}). Use another out_dir, or delete "
                "this one to start over; invsim never mixes data from two configurations."
            )
    else:
        _atomic_write(existing, _json_bytes(cfg))

    labels = dataset_labels(dataset)
    seed_idx, target_idx = sample_pairs(labels, n_pairs, seed=seed)
    if not noise:
        check_pairs(labels[seed_idx], labels[target_idx])
    n_shards = -(-n_pairs // shard_size)
    kwargs = {k: v for k, v in inversion_kwargs.items() if k != "seed_images"}
    for s in range(index, n_shards, count):
        if _shard_done(out, s, cfg["config_hash"]):
            continue
        sl = slice(s * shard_size, min(n_pairs, (s + 1) * shard_size))
        targets = dataset_images(dataset, target_idx[sl])
        seeds: torch.Tensor | str = "noise" if noise else dataset_images(dataset, seed_idx[sl])
        result = invert_images(
            model,
            seeds,
            targets,
            device=device,
            progress=progress,
            noise_seed=seed * 1_000_003 + s,
            **kwargs,
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
        }
        _write_shard(out, s, tensors, cfg["config_hash"])
    return merge_manifest(out)


def _write_shard(out: Path, s: int, tensors: dict[str, torch.Tensor], config_hash: str) -> None:
    from safetensors.torch import save

    data = save(tensors, metadata={"invsim": json.dumps({"shard": s, "config_hash": config_hash})})
    name = _shard_name(s)
    _atomic_write(out / "shards" / f"{name}.safetensors", data)
    record = {
        "shard": s,
        "file": f"shards/{name}.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "n": int(tensors["images"].shape[0]),
        "config_hash": config_hash,
    }
    _atomic_write(out / "shards" / f"{name}.json", _json_bytes(record))


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
    manifest = {"config_hash": cfg["config_hash"], "n": n_pairs, "shards": records}
    path = out / "manifest.json"
    if not path.exists() or json.loads(path.read_text()) != manifest:
        _atomic_write(path, _json_bytes(manifest))
    return InvertedDataset(out)


class InvertedDataset(Dataset):
    """A stored inverted data set: items are (inverted image, target label).

    On open it checks the manifest against ``dataset.json`` and every shard's sha256,
    naming any corrupt or missing shard. Whole tensors: ``images`` (float32),
    ``target_labels``, ``seed_labels``, ``seed_index``, ``target_index``, ``loss``,
    ``initial_loss``; ``config`` is the provenance and ``id`` identifies the set.
    """

    def __init__(self, out_dir: str | Path, *, verify: bool = True):
        from safetensors import SafetensorError
        from safetensors.torch import load

        self.root = Path(out_dir)
        cfg_path, man_path = self.root / "dataset.json", self.root / "manifest.json"
        if not cfg_path.exists():
            raise StoreError(f"{str(self.root)!r} is not an inverted data set (no dataset.json).")
        self.config = json.loads(cfg_path.read_text())
        if not man_path.exists():
            done = len(list((self.root / "shards").glob("shard-*.json")))
            total = -(-self.config["pairs"]["n_pairs"] // self.config["shard_size"])
            raise StoreError(
                f"{str(self.root)!r} is incomplete: {done} of {total} shards are finished. Run "
                "invert_dataset (or `invsim invert`) again with the same arguments to resume, "
                "or `invsim invert --merge` once all parts are done."
            )
        manifest = json.loads(man_path.read_text())
        if manifest["config_hash"] != self.config["config_hash"]:
            raise StoreError(f"manifest.json in {str(self.root)!r} belongs to another config.")
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
