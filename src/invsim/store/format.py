"""The on-disk format of an inverted data set: dataset.json, shards, records, manifest,
hashes, and the reader (:class:`InvertedDataset`). Nothing here inverts anything; see
:mod:`invsim.store.build` for making a store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from invsim._io import atomic_write, json_bytes
from invsim.inversion.loop import InversionPath
from invsim.models.checkpoints import model_fingerprint, sha256_file

__all__ = [
    "FORMAT",
    "ImageSet",
    "InvertedDataset",
    "StoreError",
    "config_record",
    "config_diff",
    "export_image_folder",
    "merge_manifest",
    "shard_done",
    "write_shard",
]

FORMAT = "invsim-inverted/1"
# provenance that does not change the data: recorded, but not part of the config hash
_NOT_HASHED = ("versions", "checkpoint", "passes", "diagnostics")


class StoreError(ValueError):
    """An inverted data set on disk is inconsistent, incomplete or corrupt."""


def config_record(
    model: torch.nn.Module,
    dataset: Dataset,
    n_pairs: int,
    rng_seed: int,
    shard_size: int,
    inversion: dict[str, Any],
) -> dict:
    """dataset.json: what the store was made from and with, and the hash of it."""
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
        "pairs": {"n_pairs": n_pairs, "rng_seed": rng_seed},
        "shard_size": shard_size,
        "inversion": inversion,
        "versions": {"invsim": invsim.__version__, "torch": torch.__version__},
    }
    hashed = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    cfg["config_hash"] = hashlib.sha256(json_bytes(hashed)).hexdigest()[:16]
    return cfg


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The hashed settings that differ between two dataset.json records, one per line."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in _NOT_HASHED or k == "config_hash":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _timing_path(out: Path, i: int) -> Path:
    return out / "shards" / f"timing-{i:05d}.json"


def write_shard(
    out: Path,
    s: int,
    tensors: dict[str, torch.Tensor],
    config_hash: str,
    passes: int,
    seconds: float | None = None,
) -> None:
    """Shard ``s`` and then its record, each written atomically. ``seconds``, the time
    its inversion took, goes in a file of its own (``shards/timing-NNNNN.json``): not
    part of the data, so a resumed store stays byte-identical to an uninterrupted one
    apart from it, and a resumed run can still say what the store cost to make."""
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
    if seconds is not None:
        timing = {"shard": s, "seconds": round(float(seconds), 3)}
        atomic_write(_timing_path(out, s), json_bytes(timing))
    atomic_write(out / "shards" / f"{name}.json", json_bytes(record))


def store_seconds(root: str | Path) -> float | None:
    """What a finished store's inversions took (:func:`shard_seconds`), read from its
    manifest and the shards' records without opening the shards."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    return shard_seconds(root, len(manifest["shards"]))


def shard_seconds(out: Path, n_shards: int) -> float | None:
    """The inversions' time summed over the shards, or None when a shard did not record
    it (stores written before invsim kept it) or its record is unreadable: the time is
    not data, so it never stops a store from opening."""
    total = 0.0
    for s in range(n_shards):
        try:
            total += float(json.loads(_timing_path(out, s).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def shard_done(out: Path, s: int, config_hash: str) -> bool:
    """Whether shard ``s`` is finished for this config: record, file and sha256 agree."""
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
    # every shard and its record is written (a record comes last), so a temporary file
    # left in shards/ is a killed writer's: remove it (a resumed store equals a whole one)
    for stale in (out / "shards").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
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


@dataclass(frozen=True)
class ImageSet:
    """Images to compare models on, with the ``id`` that keys their cached
    representations and the ``config`` they were made with (an inverted set's
    dataset.json, or empty)."""

    images: torch.Tensor
    id: str
    config: dict[str, Any] = field(default_factory=dict)


class InvertedDataset(Dataset):
    """A stored inverted data set: items are (inverted image, target label).

    On open it checks the manifest against ``dataset.json`` and every shard's sha256,
    naming any corrupt or missing shard. Whole tensors: ``images`` (float32),
    ``target_labels``, ``seed_labels``, ``seed_index``, ``target_index``, ``loss``,
    ``initial_loss``, ``iterations``, ``half_images`` (the images half the budget gave,
    for the drift check), ``path`` (each example's first iterate at or below each of the
    inversion's ``snapshot_losses``, an :class:`~invsim.inversion.InversionPath`; None
    without them); ``passes`` is the image evaluations spent and ``seconds`` the
    time they took (None for older stores); ``config`` is the
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
        # the inversion path, where the inversion kept one (snapshot_losses)
        self.path: InversionPath | None = None
        if "path_images" in cat:
            levels = list(self.config["inversion"]["snapshot_losses"])
            paths = (cat["path_images"], cat["path_loss"], cat["path_passes"])
            self.path = InversionPath(levels, *paths)
        self.passes: int = int(manifest.get("passes", 0))
        self.seconds: float | None = shard_seconds(self.root, len(manifest["shards"]))
        self.labels = self.target_labels
        self.id = f"inverted:{self.config['config_hash']}"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """How far to trust this set (:mod:`invsim.store.diagnostics`): kept in
        dataset.json when the store was written; for an older store, computed from its
        losses on first use (without the target accuracy, which needs the model)."""
        if "diagnostics" not in self.config:
            from invsim.store.diagnostics import loss_diagnostics

            self.config["diagnostics"] = loss_diagnostics(self)
        return self.config["diagnostics"]

    @property
    def stop_reasons(self) -> list[str]:
        """Each example's stopping reason: ``reached`` (the loss criterion), ``at_rest``
        (stopped above it before the cap) or ``cap``."""
        from invsim.store.diagnostics import stop_reasons

        cap = int(self.config["inversion"]["iterations"])
        return stop_reasons(self.loss, self.iterations, cap=cap)

    def diagnostics_with(self, model: torch.nn.Module) -> dict[str, Any]:
        """:attr:`diagnostics` with the target accuracy, which needs ``model`` (the one
        it was inverted through): the stored ones when they have it, else computed and
        recorded now."""
        d = self.diagnostics
        return d if "target_accuracy" in d else self.record_diagnostics(model)

    def record_diagnostics(self, model: torch.nn.Module) -> dict[str, Any]:
        """Compute this set's diagnostics with ``model`` (the one it was inverted
        through) and keep them in dataset.json (not part of the config hash)."""
        from invsim.store.diagnostics import inversion_diagnostics

        self.config["diagnostics"] = inversion_diagnostics(model, self)
        atomic_write(self.root / "dataset.json", json_bytes(self.config))
        return self.config["diagnostics"]

    def at_half_budget(self) -> ImageSet | None:
        """The images that half the iteration budget returned (the drift check), or None
        for a store written before invsim kept them."""
        if self.half_images is None:
            return None
        return ImageSet(self.half_images, f"{self.id}:half", self.config)

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
