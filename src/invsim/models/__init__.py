"""Any classifier in: built-in small architectures, torchvision, timm, your own module.

Every model returned by :func:`load_model` is in eval mode, takes images in [0, 1] and
normalises inside an :class:`InvsimModel` wrapper (the wrapped network is ``.model``, so its
layer names gain a ``model.`` prefix; :func:`invsim.representation.resolve_layer`
accepts either form).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invsim._io import atomic_write
from invsim.catalog import IMAGENET_MEAN, IMAGENET_STD, ModelSource, list_models, source_of
from invsim.models.checkpoints import (
    META_KEY,
    CheckpointError,
    LoadedCheckpoint,
    load_into,
    read_checkpoint,
    sha256_file,
)

__all__ = [
    "CheckpointError",
    "InvsimModel",
    "list_models",
    "load_model",
    "read_checkpoint",
    "save_model",
]


class InvsimModel(nn.Module):
    """A network as invsim holds it: ``model((x - mean) / std)``, so that it takes images
    in [0, 1], with its provenance in ``invsim_meta`` (spec, architecture, eps, checkpoint
    hash, training record), which :func:`save_model` writes beside the weights."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.invsim_meta: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> Any:
        return self.model((x - self.mean) / self.std)


def _build_spec(
    source: ModelSource,
    spec: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    arch_kwargs: dict,
) -> tuple[nn.Module, list[float], list[float]]:
    """The network ``spec`` names in its ``source`` (:mod:`invsim.catalog`), with the
    source's default mean and std."""
    if source.build is None:
        raise ValueError(f"{spec!r} is a {source.name} spec; load_model reads it directly.")
    net = source.build(
        source.name_in(spec),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        **arch_kwargs,
    )
    mean, std = source.normalisation(net, in_channels)
    return net, mean, std


def load_model(
    spec: str | Path | nn.Module,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    checkpoint: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    trust_checkpoint: bool = False,
    image_size: int | None = None,
    strict: bool = True,
    **arch_kwargs: Any,
) -> InvsimModel:
    """Build or load a classifier that takes [0, 1] images, in eval mode.

    ``spec``: a built-in name (``list_models()["builtin"]``), ``"tv:NAME"``,
    ``"timm:NAME"``, a path to a model saved by :func:`save_model` (everything travels
    with it), or your own ``nn.Module``. ``mean``/``std`` come from the arguments, else the
    checkpoint (robustness-library normaliser, RobustBench ``normalize.*``, invsim
    metadata), else the spec's defaults. The checkpoint's sha256 and the spec are kept in
    ``model.invsim_meta``.

    Examples:
        >>> import torch
        >>> from invsim.models import load_model
        >>> m = load_model("lenet", num_classes=10, in_channels=1)
        >>> m(torch.rand(2, 1, 28, 28)).shape, m.training
        (torch.Size([2, 10]), False)
    """
    ckpt: LoadedCheckpoint | None = None
    if isinstance(spec, Path) or (
        isinstance(spec, str) and Path(spec).suffix and Path(spec).exists()
    ):
        ckpt = read_checkpoint(spec, trust_checkpoint=trust_checkpoint)
        if "arch" not in ckpt.meta:
            raise CheckpointError(
                f"{str(spec)!r} is not a model saved by invsim (no architecture metadata); "
                "pass the architecture as spec and the file as checkpoint=."
            )
        m = ckpt.meta
        spec = m["arch"]
        num_classes = num_classes or m["num_classes"]
        in_channels = in_channels or m["in_channels"]
        image_size = image_size or m.get("image_size")
        arch_kwargs = {**m.get("arch_kwargs", {}), **arch_kwargs}
    elif checkpoint is not None:
        ckpt = read_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    net, shape, (dmean, dstd) = _network(spec, num_classes, in_channels, image_size, arch_kwargs)
    if ckpt is not None:
        load_into(net, ckpt, strict=strict)
    use_mean = mean if mean is not None else (ckpt.mean if ckpt and ckpt.mean else dmean)
    use_std = std if std is not None else (ckpt.std if ckpt and ckpt.std else dstd)
    if len(use_mean) != len(use_std):
        raise ValueError(f"mean {list(use_mean)} and std {list(use_std)} differ in length.")
    model = InvsimModel(net, use_mean, use_std)
    model.invsim_meta = {
        **(ckpt.meta if ckpt else {}),
        **shape,
        "arch_kwargs": dict(arch_kwargs),
        "mean": [float(v) for v in use_mean],
        "std": [float(v) for v in use_std],
        "checkpoint": ckpt.path if ckpt else None,
        "sha256": ckpt.sha256 if ckpt else None,
        "layout": ckpt.layout if ckpt else None,
    }
    return model.eval()


def _network(spec, num_classes, in_channels, image_size, arch_kwargs) -> tuple:
    """(network, its shape metadata, default (mean, std)) for a spec or a module."""
    if isinstance(spec, nn.Module):
        net = spec.model if isinstance(spec, InvsimModel) else spec
        stats = (
            ([0.5] * in_channels, [0.5] * in_channels)
            if in_channels
            else (list(IMAGENET_MEAN), list(IMAGENET_STD))
        )
        name = f"custom:{type(net).__name__}"
        shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        return net, {"spec": name, "arch": name, **shape}, stats
    source = source_of(str(spec))  # resolved once: a file source checks the disk
    d = source.defaults(in_channels)
    d = {
        "num_classes": num_classes or d["num_classes"],
        "in_channels": d["in_channels"],
        "image_size": image_size or d["image_size"],
    }
    net, dmean, dstd = _build_spec(
        source, str(spec), d["num_classes"], d["in_channels"], d["image_size"], arch_kwargs
    )
    return net, {"spec": str(spec), "arch": str(spec), **d}, (dmean, dstd)


def save_model(model: InvsimModel, path: str | Path, **meta: Any) -> str:
    """Save a model as safetensors plus JSON metadata; ``load_model(path)`` restores it.

    The metadata carries architecture, classes, channels, image size, mean/std and any
    ``meta`` given (e.g. training data set, eps, accuracies). Returns the file's sha256.
    The file is written under a temporary name and renamed, so it is never half-written.
    """
    from safetensors.torch import save

    if not isinstance(model, InvsimModel):
        raise TypeError("save_model expects a model returned by load_model (an InvsimModel).")
    info = {k: v for k, v in model.invsim_meta.items() if k not in ("checkpoint", "sha256")}
    if str(info.get("arch", "")).startswith("custom:"):
        raise ValueError(
            "a custom nn.Module cannot be rebuilt from a file alone; save its state_dict and "
            "load it with load_model(your_module, checkpoint=path)."
        )
    info.update(meta)
    info["mean"] = model.mean.flatten().tolist()
    info["std"] = model.std.flatten().tolist()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.model.state_dict().items()}
    atomic_write(path, save(state, metadata={META_KEY: json.dumps(info)}))
    model.invsim_meta.update(meta)
    digest = sha256_file(path)
    model.invsim_meta.update(checkpoint=str(path), sha256=digest)
    return digest
