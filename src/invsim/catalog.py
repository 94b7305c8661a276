"""The registry of model sources: where :func:`invsim.models.load_model` gets a network.

A source is one :class:`ModelSource` entry that knows how to build a network from a name,
list its names and describe itself, and carries its defaults (classes, channels, input
size, mean and std). Specs name a source by prefix (``tv:resnet18``, ``timm:vit_tiny``,
``toy:NAME`` for a source a user registers); a bare name is a built-in architecture. A
path to a checkpoint saved by invsim, and an ``nn.Module`` instance, are the two entries
without a prefix. This module is importable without torch; listing torchvision's
classifiers imports torchvision (its own ``list_models``), and timm is only looked up,
not imported.

Adding a source is one :func:`register_model_source` call:

Examples:
    >>> from invsim.catalog import MODEL_SOURCES, list_models, source_of
    >>> found = list_models()
    >>> "resnet" in found["builtin"], "tv:resnet18" in found["torchvision"]
    (True, True)
    >>> source_of("tv:resnet18").name, source_of("lenet").name
    ('torchvision', 'builtin')
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_SOURCES",
    "ModelSource",
    "list_models",
    "register_model_source",
    "source_of",
    "hf_available",
    "timm_available",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the built-in architectures: name -> "module:callable" (imported only when built)
BUILTIN = {
    "mlp": "invsim.models.zoo:_mlp",
    "lenet": "invsim.models.zoo:_lenet",
    "vgg": "invsim.models.zoo:VGG",
    "resnet": "invsim.models.zoo:ResNet18",
    "densenet": "invsim.models.zoo:DenseNet",
    "mobilenet": "invsim.models.zoo:MobileNetV2",
    "vit": "invsim.models.zoo:ViT",
}
BUILTIN_ARCHITECTURES = tuple(sorted(BUILTIN))


@dataclass(frozen=True)
class ModelSource:
    """One place networks come from.

    ``build(name, num_classes=, in_channels=, image_size=, **arch_kwargs)`` returns the
    network for ``name`` (the spec without its prefix), untrained. ``names()`` lists what
    it can build (without importing torch where possible). ``stats(net)`` may read a
    network's own mean and std (timm's ``pretrained_cfg``); else ``mean``/``std`` (None:
    0.5 per channel). ``prefix`` is how a spec names it (``"tv"`` for ``tv:NAME``); a
    source without one is matched by ``matches(spec)``.
    """

    name: str
    build: Callable[..., Any] | None
    names: Callable[[], list[str]]
    description: str
    prefix: str | None = None
    matches: Callable[[str], bool] | None = None
    num_classes: int = 10
    in_channels: int = 1
    image_size: int | None = None  # None: 28 for one channel, 32 for more
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stats: Callable[[Any], tuple[list[float], list[float]]] | None = None

    def defaults(self, in_channels: int | None = None) -> dict[str, Any]:
        """The shape this source assumes when a spec gives none: classes, channels, size."""
        ch = in_channels or self.in_channels
        size = self.image_size or (28 if ch == 1 else 32)
        return {"num_classes": self.num_classes, "in_channels": ch, "image_size": size}

    def normalisation(self, net: Any, in_channels: int) -> tuple[list[float], list[float]]:
        """(mean, std) for a network from this source."""
        if self.stats is not None:
            return self.stats(net)
        if self.mean is not None and self.std is not None:
            return list(self.mean), list(self.std)
        return [0.5] * in_channels, [0.5] * in_channels

    def name_in(self, spec: str) -> str:
        """The name part of a spec of this source (``tv:resnet18`` -> ``resnet18``)."""
        return spec.split(":", 1)[1] if self.prefix else spec

    def describe(self) -> str:
        how = f"{self.prefix}:NAME" if self.prefix else self.name
        return f"{how}: {self.description}"


MODEL_SOURCES: dict[str, ModelSource] = {}


def register_model_source(source: ModelSource, *, replace: bool = False) -> ModelSource:
    """Add ``source`` to :data:`MODEL_SOURCES` (``replace=True`` to overwrite a name)."""
    taken = {s.prefix for s in MODEL_SOURCES.values() if s.prefix and s.name != source.name}
    if (source.name in MODEL_SOURCES and not replace) or source.prefix in taken:
        raise ValueError(f"a model source named {source.name!r} is already registered.")
    MODEL_SOURCES[source.name] = source
    return source


def source_of(spec: str) -> ModelSource:
    """The source a spec string names; an unknown spec is an error listing the sources
    and, for a bare name, the close built-in names."""
    prefix, sep, _ = spec.partition(":")
    for s in MODEL_SOURCES.values():
        if sep and s.prefix == prefix:
            return s
    for s in MODEL_SOURCES.values():
        if s.matches is not None and s.matches(spec):
            return s
    close = difflib.get_close_matches(spec, BUILTIN_ARCHITECTURES, n=3)
    hint = f" Did you mean {close}?" if close else ""
    known = "; ".join(s.describe() for s in MODEL_SOURCES.values())
    raise ValueError(f"unknown model spec {spec!r}.{hint} Model sources: {known}.")


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models, from its own registry
    (``torchvision.models.list_models``; torchvision is imported only here)."""
    if importlib.util.find_spec("torchvision") is None:
        return []
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _builtin(name: str, *, num_classes: int, in_channels: int, image_size: int, **kw: Any):
    module, _, attr = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)(
        num_classes, in_channels, image_size, **kw
    )


_SIZED_TV = ("vit_", "swin", "maxvit")
_SIZED_TIMM = ("vit_", "deit", "swin", "eva", "beit", "cait", "xcit")


def _torchvision(name: str, *, num_classes: int, in_channels: int, image_size: int, **kw: Any):
    import torchvision

    if image_size != 224 and name.startswith(_SIZED_TV):
        kw.setdefault("image_size", image_size)  # transformers fix their input size
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    except ValueError as e:
        raise ValueError(f"unknown torchvision model {name!r}: {e}") from e


def _timm(name: str, *, num_classes: int, in_channels: int, image_size: int, **kw: Any):
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"'timm:{name}' needs timm, an optional extra: pip install 'invsim[timm]'."
        ) from e
    if image_size != 224 and name.startswith(_SIZED_TIMM):
        kw.setdefault("img_size", image_size)  # transformers fix their input size
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw
    )


def _timm_stats(net: Any) -> tuple[list[float], list[float]]:
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    return list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))


def hf_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _hf(name: str, *, num_classes: int, in_channels: int, image_size: int, **kw: Any):
    """A Hugging Face transformers image classifier: ``hf:DIR`` (a local directory saved
    with ``save_pretrained``: its config and weights), ``hf:CONFIG.json`` (a config, random
    weights) or ``hf:MODEL_TYPE`` (``vit``, ``convnext``, ...: a fresh config from ``kw``,
    random weights). Nothing is downloaded."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"'hf:{name}' needs transformers: pip install transformers.") from e
    auto = transformers.AutoModelForImageClassification
    path = Path(name)
    if path.is_dir():
        return auto.from_pretrained(str(path), local_files_only=True, **kw)
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"no Hugging Face config at {name!r}.")
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **kw)
    else:
        try:
            config = transformers.AutoConfig.for_model(name, num_labels=num_classes, **kw)
        except ValueError as e:
            raise ValueError(
                f"unknown Hugging Face model type {name!r} (hf:DIR, hf:CONFIG.json or a "
                f"model type such as vit or convnext): {e}"
            ) from e
        if hasattr(config, "num_channels"):
            config.num_channels = in_channels
        if hasattr(config, "image_size") and "image_size" not in kw:
            config.image_size = image_size
    return auto.from_config(config)


def _hf_stats(net: Any) -> tuple[list[float], list[float]]:
    """The image processor's mean and std when the directory has one, else 0.5 (ViT's)."""
    import json

    path = Path(str(getattr(getattr(net, "config", None), "_name_or_path", "") or "."))
    proc = path / "preprocessor_config.json"
    channels = int(getattr(net.config, "num_channels", 3))
    if path.is_dir() and proc.exists():
        cfg = json.loads(proc.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return list(cfg["image_mean"]), list(cfg["image_std"])
    return [0.5] * channels, [0.5] * channels


def _is_file(spec: str) -> bool:
    return bool(Path(spec).suffix) and Path(spec).exists()


_IMAGENET = {"num_classes": 1000, "in_channels": 3, "image_size": 224}
register_model_source(
    ModelSource(
        "builtin",
        _builtin,
        lambda: list(BUILTIN_ARCHITECTURES),
        "invsim's small architectures, trained in seconds (mean and std 0.5)",
        matches=lambda spec: spec in BUILTIN,
    )
)
register_model_source(
    ModelSource(
        "torchvision",
        _torchvision,
        lambda: ["tv:" + n for n in torchvision_classifiers()],
        "a torchvision classifier, random weights (ImageNet mean and std)",
        prefix="tv",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        **_IMAGENET,
    )
)
register_model_source(
    ModelSource(
        "timm",
        _timm,
        lambda: ["timm:NAME"] if timm_available() else [],
        "any timm.list_models() name, random weights (its own mean and std)",
        prefix="timm",
        stats=_timm_stats,
        **_IMAGENET,
    )
)
register_model_source(
    ModelSource(
        "hf",
        _hf,
        lambda: ["hf:DIR", "hf:CONFIG.json", "hf:MODEL_TYPE"] if hf_available() else [],
        "a Hugging Face transformers image classifier from a local directory, a config file or "
        "a model type with its config's keywords (random weights; no download)",
        prefix="hf",
        stats=_hf_stats,
        **_IMAGENET,
    )
)
register_model_source(
    ModelSource(
        "file",
        None,
        lambda: [],
        "a model saved by invsim (.safetensors); all it needs travels with it",
        matches=_is_file,
    )
)


def list_models() -> dict[str, list[str]]:
    """Each source's names: ``builtin``, ``torchvision`` (``tv:NAME``), ``timm``
    (``["timm:NAME"]`` as a pattern when installed, else empty), and any registered."""
    return {name: s.names() for name, s in MODEL_SOURCES.items() if name != "file"}
