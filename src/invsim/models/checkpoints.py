"""Reading checkpoints: plain state dicts, safetensors, robustness-library and RobustBench
layouts; hashing; invsim's own self-describing format (safetensors + JSON metadata)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "model_fingerprint",
    "read_checkpoint",
    "sha256_file",
]

META_KEY = "invsim"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: str
    mean: list[float] | None = None
    std: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    layout: str = "plain"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _vector(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().flatten().tolist()]


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def normalise_layout(
    raw: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], list[float] | None, list[float] | None, str]:
    """Turn any supported checkpoint layout into (state_dict, mean, std, layout name)."""
    obj: Any = raw
    layout = "plain"
    for key in ("model", "state_dict", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            layout = f"{{'{key}': state_dict}}"
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(
            "the checkpoint holds no tensors; expected a state dict, {'model': state_dict} "
            "(robustness library) or {'state_dict': ...}."
        )
    for prefix in ("module.", "_orig_mod."):
        while all(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
    mean = std = None
    if any(k.startswith("normalizer.") or k.startswith("attacker.") for k in sd):
        layout = "robustness"
        if "normalizer.new_mean" in sd:
            mean, std = _vector(sd["normalizer.new_mean"]), _vector(sd["normalizer.new_std"])
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    elif any(k.startswith("normalize.") for k in sd) and any(k.startswith("model.") for k in sd):
        layout = "robustbench"
        for m_key, s_key in (
            ("normalize.mean", "normalize.std"),
            ("normalize.mu", "normalize.sigma"),
        ):
            if m_key in sd:
                mean, std = _vector(sd[m_key]), _vector(sd[s_key])
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    for prefix in ("module.", "_orig_mod."):
        while sd and all(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
    return sd, mean, std, layout


def read_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint file of any supported layout, without building a model.

    ``.safetensors`` files are read directly (their JSON metadata, when written by
    invsim, carries architecture and training information). ``.pt``/``.pth``/``.ckpt``
    files are loaded with ``weights_only=True``; a file holding pickled objects beyond
    tensors is refused unless ``trust_checkpoint=True`` (only for files you trust:
    unpickling can run arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist.")
    digest = sha256_file(path)
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            raw: Mapping[str, Any] = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt or truncated (safetensors: {e})."
            ) from e
        if META_KEY in header:
            meta = json.loads(header[META_KEY])
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} contains pickled objects beyond tensors, which "
                "weights_only loading refuses. If you trust this file, pass "
                "trust_checkpoint=True (--trust-checkpoint); unpickling can run arbitrary code. "
                f"Detail: {str(e).splitlines()[0]}"
            ) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read ({e})."
            ) from e
        if not isinstance(raw, Mapping):
            if isinstance(raw, torch.nn.Module):
                raw = raw.state_dict()
            else:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict."
                )
    sd, mean, std, layout = normalise_layout(raw)
    if meta.get("mean") is not None and mean is None:
        mean, std = meta["mean"], meta["std"]
    return LoadedCheckpoint(sd, digest, str(path), mean, std, meta, layout)


def load_into(model: torch.nn.Module, ckpt: LoadedCheckpoint, *, strict: bool = True) -> None:
    """Load a checkpoint's weights into ``model``, with a clear error on a mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(own))
    shape = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in ckpt.state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    if strict and (missing or unexpected or shape):

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shape:
            parts.append(f"shape mismatches: {show(shape)}")
        raise CheckpointError(
            f"checkpoint {ckpt.path!r} (layout {ckpt.layout}) does not fit the model: "
            + "; ".join(parts)
            + ". Check the architecture, num_classes and in_channels, or that this is the "
            "right file."
        )
    model.load_state_dict(ckpt.state_dict, strict=strict)


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
