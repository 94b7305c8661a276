"""Similarity matrices between models: natural, inverted (Jones et al.) and STIR.

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

from invsim.distributed import extract_distributed, invert_distributed, is_main
from invsim.representation import PENULTIMATE, extract
from invsim.similarity import LinearCKAMatrix, SimilarityMatrix
from invsim.store import InvertedDataset, dataset_images, model_fingerprint

__all__ = [
    "RepresentationCache",
    "inverted_similarity",
    "natural_similarity",
    "robustness_summary",
    "stir",
    "summarize",
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
        from safetensors.torch import load_file, save_file

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
        if isinstance(data, torch.Tensor):  # split over torchrun ranks when there are any
            rep = extract_distributed(
                model, data, layer=layer, batch_size=batch_size, device=device
            )
        else:
            rep = extract(model, data, layer=layer, batch_size=batch_size, device=device)
        self.stats["computed"] += 1
        if path is not None and is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"representation": rep.contiguous()}, str(tmp))
            tmp.replace(path)
        self.memory[k] = rep
        return rep


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


def stir(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    out_dir: str | Path,
    *,
    n: int = 500,
    seed: int = 0,
    layer: str = PENULTIMATE,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    **inversion_kwargs: Any,
) -> tuple[SimilarityMatrix, dict[str, InvertedDataset]]:
    """STIR(m2 | m1) = CKA(Rep_m2(X), Rep_m2(X')), where X' is X inverted through m1 from
    noise seeds (``seed_images="noise"``; pass ``seed_images=None`` for data seeds).
    Entry (row m1, column m2). The inverted sets are stored under ``out_dir/<m1>``."""
    cache = cache or RepresentationCache()
    names = list(models)
    inversion_kwargs.setdefault("seed_images", "noise")
    if inversion_kwargs["seed_images"] is None:
        del inversion_kwargs["seed_images"]
    values = np.empty((len(names), len(names)))
    stored: dict[str, InvertedDataset] = {}
    for i, m1 in enumerate(names):
        inv = invert_distributed(
            models[m1],
            dataset,
            n,
            Path(out_dir) / m1,
            seed=seed,
            layer=layer,
            device=device,
            progress=progress,
            **inversion_kwargs,
        )
        assert inv is not None
        stored[m1] = inv
        originals = dataset_images(dataset, inv.target_index.tolist())
        original_id = f"{getattr(dataset, 'id', 'data')}@targets:{inv.id}"
        for j, m2 in enumerate(names):
            kw = {"layer": layer, "batch_size": batch_size, "device": device}
            a = cache.get(models[m2], originals, original_id, **kw)
            b = cache.get(models[m2], inv.images, inv.id, **kw)
            values[i, j] = _cka_over({"x": a, "x_inv": b}, debiased=False)["x", "x_inv"]
    return SimilarityMatrix(names, names, values), stored


def summarize(matrix: SimilarityMatrix) -> dict[str, Any]:
    """Off-diagonal mean and median, row and column means (off-diagonal), and asymmetry
    mean |S - S^T| over the entries whose transpose exists."""
    v = matrix.values
    rows, cols = matrix.rows, matrix.cols
    off = np.array([[r != c for c in cols] for r in rows], dtype=bool)
    out: dict[str, Any] = {
        "offdiag_mean": float(v[off].mean()) if off.any() else None,
        "offdiag_median": float(np.median(v[off])) if off.any() else None,
        "row_means": {r: float(v[i][off[i]].mean()) for i, r in enumerate(rows) if off[i].any()},
        "col_means": {
            c: float(v[:, j][off[:, j]].mean()) for j, c in enumerate(cols) if off[:, j].any()
        },
    }
    common = [r for r in rows if r in cols]
    if len(common) > 1:
        sq = np.array([[matrix[r, c] for c in common] for r in common])
        mask = ~np.eye(len(common), dtype=bool)
        out["asymmetry"] = float(np.abs(sq - sq.T)[mask].mean())
    return out


def robustness_summary(
    matrix: SimilarityMatrix, eps: Mapping[str, float], arch: Mapping[str, str]
) -> dict[str, Any]:
    """Each model's mean similarity to all others (row and column together) against its
    eps, per architecture, with the Spearman correlation over all models."""
    from scipy.stats import spearmanr

    per_model = {}
    for name in matrix.rows:
        vals = [matrix[name, c] for c in matrix.cols if c != name]
        vals += [matrix[r, name] for r in matrix.rows if r != name and name in matrix.cols]
        per_model[name] = {
            "eps": float(eps[name]),
            "arch": arch[name],
            "mean_similarity": float(np.mean(vals)),
        }
    xs = [v["eps"] for v in per_model.values()]
    ys = [v["mean_similarity"] for v in per_model.values()]
    rho = None
    if len(set(xs)) > 1 and len(set(ys)) > 1:
        rho = float(spearmanr(xs, ys).statistic)
    return {"per_model": per_model, "spearman": rho}
