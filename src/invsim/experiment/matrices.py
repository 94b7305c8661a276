"""The regimes' similarity matrices between models: natural, inverted (Jones et al.), STIR.

- natural: linear CKA on the same held-out natural images for every pair; symmetric.
- inverted: entry (r, c) = CKA(Rep_r(X_r), Rep_c(X_r)), X_r = row model r's inverted
  data set; asymmetric.
- STIR(m2 | m1) = CKA(Rep_m2(X), Rep_m2(X')), X' inverted through m1 from noise seeds to
  match Rep_m1(X) (Nanda et al. 2022); entry (row m1, column m2).

Each model's representation of each data set is computed once (M models x D data sets
forward passes) and, with a ``cache_dir``, stored on disk keyed by (model fingerprint,
data set id, layer), so a second run, or a run with one model added, computes only what
is new. Representations then stream into one :class:`~invsim.LinearCKAMatrix` per data
set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from invsim._io import atomic_write
from invsim.config import InversionConfig
from invsim.distributed import gather_strided, is_main, rank_world
from invsim.representation import PENULTIMATE, extract
from invsim.similarity import LinearCKAMatrix, SimilarityMatrix
from invsim.store import InvertedDataset, dataset_images, invert_dataset, model_fingerprint

__all__ = [
    "RepresentationCache",
    "inverted_similarity",
    "natural_similarity",
    "stir_similarity",
]


class RepresentationCache:
    """Representations on disk, keyed by (model fingerprint, data set id, layer).

    ``stats`` counts hits and computations (the tests use it to check that a second run
    recomputes nothing). Without a directory it caches in memory only.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.stats = {"hits": 0, "computed": 0}

    @staticmethod
    def key(model: nn.Module, dataset_id: str, layer: str) -> str:
        raw = f"{model_fingerprint(model)}|{dataset_id}|{layer}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def get(
        self,
        model: nn.Module,
        data: Dataset | torch.Tensor,
        dataset_id: str,
        *,
        layer: str = PENULTIMATE,
        batch_size: int = 256,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        from safetensors.torch import load_file, save

        k = self.key(model, dataset_id, layer)
        if k in self.memory:
            self.stats["hits"] += 1
            return self.memory[k]
        path = self.root / f"{k}.safetensors" if self.root else None
        if path is not None and path.exists():
            try:
                rep = load_file(str(path))["representation"]
                self.stats["hits"] += 1
                self.memory[k] = rep
                return rep
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                path.unlink()
        rep = _extract(model, data, layer=layer, batch_size=batch_size, device=device)
        self.stats["computed"] += 1
        if path is not None and is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save({"representation": rep.contiguous()}))
        self.memory[k] = rep
        return rep


def _extract(model: nn.Module, data: Dataset | torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """:func:`extract`; a tensor of images is split over torchrun ranks when there are
    any (strided slices, reassembled in order on every rank)."""
    if not isinstance(data, torch.Tensor):
        return extract(model, data, **kwargs)
    rank, world = rank_world()
    if rank != 0:
        kwargs["progress"] = False
    return gather_strided(extract(model, data[rank::world], **kwargs), len(data))


def _cka_over(reps: Mapping[str, torch.Tensor], *, debiased: bool, chunk: int = 1024):
    acc = LinearCKAMatrix(list(reps), debiased=debiased)
    n = len(next(iter(reps.values())))
    for start in range(0, n, chunk):
        acc.update({k: v[start : start + chunk] for k, v in reps.items()})
    return acc.compute()


def _subset(dataset: Dataset, n: int | None) -> tuple[torch.Tensor, str]:
    total = len(dataset)  # type: ignore[arg-type]
    n = total if n is None else min(n, total)
    images = dataset_images(dataset, range(n))
    return images, f"{getattr(dataset, 'id', type(dataset).__name__)}[:{n}]"


def natural_similarity(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    *,
    n: int | None = 1000,
    layer: str = PENULTIMATE,
    debiased: bool = False,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> SimilarityMatrix:
    """Symmetric linear-CKA matrix on the first ``n`` images of ``dataset`` (the same
    images for every pair).

    Example:
        >>> import torch
        >>> from invsim.data import TensorImageDataset
        >>> from invsim.experiment import natural_similarity
        >>> from invsim.models import load_model
        >>> ds = TensorImageDataset(torch.rand(64, 1, 28, 28), torch.arange(64) % 4)
        >>> m = natural_similarity({"a": load_model("mlp"), "b": load_model("lenet")}, ds)
        >>> m.rows, round(m["a", "a"], 6)
        (['a', 'b'], 1.0)
    """
    cache = cache or RepresentationCache()
    images, data_id = _subset(dataset, n)
    reps = {
        k: cache.get(m, images, data_id, layer=layer, batch_size=batch_size, device=device)
        for k, m in models.items()
    }
    return _cka_over(reps, debiased=debiased)


def inverted_similarity(
    models: Mapping[str, nn.Module],
    inverted: Mapping[str, InvertedDataset],
    *,
    layer: str = PENULTIMATE,
    debiased: bool = False,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> SimilarityMatrix:
    """Asymmetric matrix: row r, column c = CKA(Rep_r(X_r), Rep_c(X_r)) on row model r's
    inverted data set X_r. Rows are the models in ``inverted``, columns all ``models``."""
    cache = cache or RepresentationCache()
    cols = list(models)
    rows = [r for r in models if r in inverted]
    missing = [r for r in inverted if r not in models]
    if missing:
        raise ValueError(f"inverted data sets for unknown models {missing}; known: {cols}.")
    values = np.empty((len(rows), len(cols)))
    for i, r in enumerate(rows):
        data = inverted[r]
        reps = {
            c: cache.get(
                models[c], data.images, data.id, layer=layer, batch_size=batch_size, device=device
            )
            for c in cols
        }
        values[i] = _cka_over(reps, debiased=debiased).values[cols.index(r)]
    return SimilarityMatrix(rows, cols, values)


def stir_similarity(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    out_dir: str | Path,
    *,
    n: int = 500,
    seed: int = 0,
    seed_images: str = "noise",
    inversion: InversionConfig | None = None,
    shard_size: int = 256,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> tuple[SimilarityMatrix, dict[str, InvertedDataset]]:
    """STIR(m2 | m1) = CKA(Rep_m2(X), Rep_m2(X')), where X' is X inverted through m1 from
    noise seeds (``seed_images="data"`` for data seeds). Entry (row m1, column m2). The
    inverted sets are stored under ``out_dir/<m1>``; ``inversion`` and ``settings`` are
    as in :func:`invsim.store.invert_dataset`."""
    cache = cache or RepresentationCache()
    cfg = (inversion or InversionConfig()).replace(**settings)
    names = list(models)
    values = np.empty((len(names), len(names)))
    stored: dict[str, InvertedDataset] = {}
    kw = {"layer": cfg.layer, "batch_size": batch_size, "device": device}
    for i, m1 in enumerate(names):
        inv = invert_dataset(
            models[m1],
            dataset,
            n,
            Path(out_dir) / m1,
            inversion=cfg,
            seed=seed,
            seed_images=seed_images,
            shard_size=shard_size,
            device=device,
            progress=progress,
        )
        assert inv is not None
        stored[m1] = inv
        originals = dataset_images(dataset, inv.target_index.tolist())
        original_id = f"{getattr(dataset, 'id', 'data')}@targets:{inv.id}"
        for j, m2 in enumerate(names):
            a = cache.get(models[m2], originals, original_id, **kw)
            b = cache.get(models[m2], inv.images, inv.id, **kw)
            values[i, j] = _cka_over({"x": a, "x_inv": b}, debiased=False)["x", "x_inv"]
    return SimilarityMatrix(names, names, values), stored
