"""The in-memory data set every stage understands, and the split rules (torch only).

Examples:
    >>> import torch
    >>> from invsim.data.base import TensorImageDataset
    >>> ds = TensorImageDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    >>> len(ds), ds.classes
    (4, ['0', '1'])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SPLITS",
    "TensorImageDataset",
    "check_split",
    "content_id",
    "dataset_images",
    "dataset_labels",
    "stratified_split",
]

SPLITS = ("train", "test", "all")


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) float32 in [0, 1] and integer labels, held in memory.

    ``.images`` and ``.labels`` give the whole tensors; ``.id`` identifies the content.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: Sequence[str] | None = None,
        id: str | None = None,  # noqa: A002
    ):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W); got {tuple(images.shape)}.")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.int64)
        n_cls = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        self.id = id or content_id(self.images, self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(id={self.id!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, classes={len(self.classes)})"
        )


def content_id(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def stratified_split(labels: np.ndarray, test_fraction: float, rng_seed: int = 0) -> np.ndarray:
    """Boolean mask of test examples: ``test_fraction`` of each class, deterministic."""
    rng = np.random.default_rng(rng_seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = round(len(idx) * test_fraction)
        test[rng.permutation(idx)[:k]] = True
    return test


def check_split(split: str) -> None:
    """Raise a ValueError naming ``split`` unless it is train, test or all."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every label of ``dataset``: its ``labels`` or ``targets``, else read item by item."""
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def dataset_images(dataset: Dataset, index: Sequence[int]) -> torch.Tensor:
    """The images at ``index``, stacked (one indexing of ``images`` when it is a tensor)."""
    if hasattr(dataset, "images") and isinstance(dataset.images, torch.Tensor):
        return dataset.images[torch.as_tensor(np.asarray(index), dtype=torch.long)]
    return torch.stack([dataset[int(i)][0] for i in index])
