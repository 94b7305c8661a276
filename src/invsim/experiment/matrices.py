"""The regimes' similarity matrices between models: natural, inverted (Jones et al.), STIR,
under any registered measure (:data:`invsim.similarity.MEASURES`).

- natural: the measure on the same held-out natural images for every pair (symmetric for
  a symmetric measure);
- inverted: entry (r, c) = measure(Rep_r(X_r), Rep_c(X_r)), X_r = row model r's inverted
  data set; asymmetric;
- STIR(m2 | m1) = measure(Rep_m2(X), Rep_m2(X')), X' inverted through m1 from noise seeds
  to match Rep_m1(X) (Nanda et al. 2022); entry (row m1, column m2).

For an asymmetric measure, entry (r, c) is ``measure(Rep_r, Rep_c)``. ``measures`` is one
name (a :class:`~invsim.similarity.SimilarityMatrix` comes back) or a list (a dict name
-> matrix). Each model's representation (and, for functional measures, its logits) of
each data set is computed once and, with a cache directory, stored on disk keyed by
(model fingerprint, data set id, layer), so a second run, or a run with one model added,
computes only what is new. All streaming measures come from one pass of cross-moments
per data set (:class:`~invsim.StreamingPanel`); the others are computed pairwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from invsim._io import atomic_write, renamed
from invsim.config import CalibrationConfig, InversionConfig
from invsim.distributed import gather_strided, is_main, rank_world
from invsim.representation import LOGITS, PENULTIMATE, extract
from invsim.similarity import SimilarityMatrix, StreamingPanel, calibrate, get_measure
from invsim.similarity.calibration import (
    CI_CENTRE,
    CI_TARGET,
    GRAM_LIMIT,
    cka_calibration,
    cka_null_matrix,
    interval_method,
)
from invsim.similarity.matrix import each_cell
from invsim.similarity.registry import Measure, MeasureLike
from invsim.store import InvertedDataset, dataset_images, invert_dataset, model_fingerprint
from invsim.store.diagnostics import warn_unconverged

__all__ = [
    "RepresentationCache",
    "panel",
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


def panel(
    reps: Mapping[str, torch.Tensor],
    measures: Sequence[MeasureLike],
    *,
    logits: Mapping[str, torch.Tensor] | None = None,
    rows: Sequence[str] | None = None,
    chunk: int = 1024,
    calibration: CalibrationConfig | None = None,
    seed: int = 0,
) -> dict[str, SimilarityMatrix]:
    """Every measure between the representations ``reps`` (name -> (n, d), the same
    examples), for the ``rows`` asked (default: all) against every column. Functional
    measures read ``logits`` (name -> (n, classes)) instead. With ``calibration``, the
    measures it names get per-cell ``ci_low``, ``ci_high``, ``null_mean``, ``p_value``."""
    names, rows = list(reps), list(rows or reps)
    found = {m.name: m for m in map(get_measure, measures)}
    out: dict[str, SimilarityMatrix] = {}
    streaming = [m for m, spec in found.items() if spec.streams]
    scatter: dict[str, torch.Tensor] = {}  # each view's centred X^T X, from the pass
    if streaming:
        acc = StreamingPanel(names)
        n = len(next(iter(reps.values())))
        for start in range(0, n, chunk):
            acc.update({k: v[start : start + chunk] for k, v in reps.items()})
        centred = acc.moments.centred()
        out.update(acc.compute_measures([found[m] for m in streaming], rows=rows, centred=centred))
        scatter = {k: centred.cov(i, i) for i, k in enumerate(names)}
    for name, spec in found.items():
        if spec.streams:
            continue
        data = reps if spec.inputs == "representation" else (logits or {})
        values = each_cell(rows, names, lambda r, c, f=spec.fn, d=data: f(d[r], d[c]),
                           symmetric=spec.symmetric)  # fmt: skip
        out[name] = SimilarityMatrix(rows, names, np.array(values, dtype=float))
    if calibration is not None:
        for name in [m for m in calibration.measures if m in out]:
            data = reps if found[name].inputs == "representation" else (logits or {})
            out[name].stats, out[name].interval = _calibrated(
                data, out[name].values, rows, names, found[name], calibration, seed, scatter
            )
    for name, spec in found.items():
        out[name].measure, out[name].options = name, dict(spec.options)
    return {m: out[m] for m in found}


def _calibrated(
    data, values, rows, cols, spec: Measure, cal: CalibrationConfig, seed: int, scatter=None
) -> tuple[dict, dict]:
    """Per-cell interval and null (:mod:`invsim.similarity.calibration`), and what the
    interval is (``ci_method``, ``ci_target``, ``ci_centre``, ``ci_reason``). A measure
    with the CKA jackknife and the exact null goes through the Gram matrices once for the
    whole matrix (:func:`cka_calibration`, given each view's centred X^T X, ``scatter``,
    when a streamed pass has them); other measures cell by cell, reusing a symmetric
    measure's mirrored cells."""
    n = len(next(iter(data.values())))
    widths = max(int(np.prod(v.shape[1:])) for v in data.values())
    method, reason = interval_method(spec, n, (widths, widths))
    centre = CI_CENTRE.get(spec.interval)
    about = {"ci_method": method, "ci_target": CI_TARGET, "ci_reason": reason,
             "ci_centre": centre}  # fmt: skip
    if spec.exact_null and n <= GRAM_LIMIT:
        moments = cal.null == "moments" and cal.n_perm > 0
        stats = cka_calibration(data, values, rows, cols, ci=cal.ci, null=moments,
                                scatter=scatter)  # fmt: skip
        if cal.null == "permutation" and cal.n_perm:
            null = cka_null_matrix(data, rows, cols, cal.n_perm, seed)  # (rows, cols, n_perm)
            stats["null_mean"] = null.mean(axis=2)
            stats["p_value"] = (1 + (null >= values[:, :, None]).sum(axis=2)) / (1 + cal.n_perm)
    else:
        cells = each_cell(
            rows,
            cols,
            lambda r, c: calibrate(data[r], data[c], measure=spec, n_perm=cal.n_perm,
                                   ci=cal.ci, seed=seed, null=cal.null),
            symmetric=spec.symmetric,
        )  # fmt: skip
        stats = {
            k: np.array([[np.nan if getattr(x, k) is None else getattr(x, k) for x in row]
                         for row in cells])
            for k in SimilarityMatrix.STATS
        }  # fmt: skip
    if method is None:  # no interval can be trusted here: none is reported (about says why)
        for k in ("ci_low", "ci_high", "ci_centre"):
            stats[k] = np.full(np.shape(values), np.nan)
    if cal.n_perm == 0:
        stats.pop("null_mean", None), stats.pop("p_value", None)
    return stats, about


def _one_or_many(result: dict[str, SimilarityMatrix], measures: Any):
    """One matrix when one measure was asked for (not in a list), else name -> matrix."""
    return next(iter(result.values())) if isinstance(measures, (str, Mapping, Measure)) else result


def _resolve(measures: MeasureLike | Sequence[MeasureLike], debiased: bool) -> list[Measure]:
    """The measures asked for, options bound; ``debiased=True`` asks for one measure's
    debiased twin (:attr:`Measure.debiased`)."""
    one = isinstance(measures, (str, Mapping, Measure))
    found = [get_measure(m) for m in ([measures] if one else measures)]  # type: ignore[list-item]
    if debiased:
        if not one or found[0].debiased is None:
            raise ValueError(
                f"debiased=True needs one measure with a debiased twin; got {measures!r}. "
                "Name the debiased measure instead (measures='debiased_cka')."
            )
        found = [get_measure(found[0].debiased)]
    names = [m.name for m in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"measures {repeated} are listed more than once.")
    return found


def _needs_logits(measures: Sequence[Measure]) -> bool:
    return any(m.inputs == "logits" for m in measures)


Layers = str | Mapping[str, str]


def layer_of(layer: Layers, model: str) -> str:
    """The layer of ``model`` under ``layer``: one name for every model, or a mapping
    model name -> layer (a model it leaves out gets the penultimate layer)."""
    return layer if isinstance(layer, str) else layer.get(model, PENULTIMATE)


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
    measures: str | Sequence[str] = "linear_cka",
    layer: Layers = PENULTIMATE,
    debiased: bool = False,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
    seed: int = 0,
) -> SimilarityMatrix:
    """The ``measures`` (default linear CKA; ``debiased=True``: debiased CKA) on the first
    ``n`` images of ``dataset``, the same images for every pair.

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
    names = _resolve(measures, debiased)
    kw = {"batch_size": batch_size, "device": device}
    reps = {
        k: cache.get(m, images, data_id, layer=layer_of(layer, k), **kw) for k, m in models.items()
    }
    logit = None
    if _needs_logits(names):
        logit = {k: cache.get(m, images, data_id, layer=LOGITS, **kw) for k, m in models.items()}
    result = panel(reps, names, logits=logit, calibration=calibration, seed=seed)
    return _one_or_many(result, measures)


def inverted_similarity(
    models: Mapping[str, nn.Module],
    inverted: Mapping[str, InvertedDataset],
    *,
    measures: str | Sequence[str] = "linear_cka",
    layer: Layers = PENULTIMATE,
    debiased: bool = False,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
    seed: int = 0,
) -> SimilarityMatrix | dict[str, SimilarityMatrix]:
    """Asymmetric matrix: row r, column c = measure(Rep_r(X_r), Rep_c(X_r)) on row model
    r's inverted data set X_r. Rows are the models in ``inverted``, columns all
    ``models``. A row whose inversions did not converge (its set's ``diagnostics``) is
    warned about (:class:`~invsim.store.diagnostics.InversionWarning`, naming the model,
    its median loss and the criterion) and listed in each matrix's
    ``flags["not_converged"]``."""
    cache = cache or RepresentationCache()
    cols = list(models)
    rows = [r for r in models if r in inverted]
    missing = [r for r in inverted if r not in models]
    if missing:
        raise ValueError(f"inverted data sets for unknown models {missing}; known: {cols}.")
    names = _resolve(measures, debiased)
    values = {m.name: np.empty((len(rows), len(cols))) for m in names}
    stats: dict[str, dict[str, np.ndarray]] = {}
    about: dict[str, list[dict]] = {}
    kw = {"batch_size": batch_size, "device": device}
    for i, r in enumerate(rows):
        data = inverted[r]
        _check_layer(data, r, layer_of(layer, r))
        reps = {
            c: cache.get(models[c], data.images, data.id, layer=layer_of(layer, c), **kw)
            for c in cols
        }
        logit = None
        if _needs_logits(names):
            logit = {
                c: cache.get(models[c], data.images, data.id, layer=LOGITS, **kw) for c in cols
            }
        found = panel(reps, names, logits=logit, rows=[r], calibration=calibration, seed=seed + i)
        for m, mat in found.items():
            values[m][i] = mat.values[0]
            about.setdefault(m, []).append(mat.interval)
            for k, v in mat.stats.items():
                stats.setdefault(m, {}).setdefault(k, np.empty((len(rows), len(cols))))[i] = v[0]
    result = _assemble(rows, cols, values, stats, about, names)
    _flag_unconverged(result, inverted, rows)
    return _one_or_many(result, measures)


def _flag_unconverged(result: Mapping[str, SimilarityMatrix], inverted, rows) -> None:
    """Warn about rows whose inversions did not converge and flag them on every matrix."""
    bad = warn_unconverged(inverted, rows)
    if bad:
        for m in result.values():
            m.flags["not_converged"] = list(bad)


def _check_layer(data: Any, row: str, layer: str) -> None:
    """Refuse a row whose inverted set matched another layer than the row is read at."""
    made = (getattr(data, "config", None) or {}).get("inversion", {}).get("layer")
    if made is not None and made != layer:
        raise ValueError(
            f"the inverted data set of {row!r} was made at layer {made!r}, but its row is "
            f"read at {layer!r}: pass layer={made!r} for {row!r}, or invert it again at "
            f"{layer!r}."
        )


def _assemble(rows, cols, values, stats, about, measures) -> dict[str, SimilarityMatrix]:
    """The matrices of a computation done a row or a cell at a time, per measure."""
    return {
        m.name: SimilarityMatrix(rows, cols, values[m.name], stats.get(m.name, {}),
                                 merge_interval(about.get(m.name, [])), m.name, dict(m.options))
        for m in measures
    }  # fmt: skip


def merge_interval(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One description of the intervals of matrices computed a row (or cell) at a time:
    the first's, with every distinct reason for a missing interval."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out = dict(parts[0])
    methods = {p.get("ci_method") for p in parts}
    reasons = list(dict.fromkeys(p["ci_reason"] for p in parts if p.get("ci_reason")))
    out["ci_method"] = next((m for m in methods if m), None)
    out["ci_reason"] = "; ".join(reasons) or None
    return out


def _put(values, stats, about, found: Mapping[str, SimilarityMatrix], i: int, j: int) -> None:
    """Copy STIR's (x, x_inv) entry of each measure, with its statistics and what its
    interval is, into cell (i, j)."""
    for m, mat in found.items():
        about.setdefault(m, []).append(mat.interval)
        col = mat.cols.index("x_inv")
        values[m][i, j] = mat.values[0, col]
        for k, v in mat.stats.items():
            stats.setdefault(m, {}).setdefault(k, np.empty(values[m].shape))[i, j] = v[0, col]


def _stir_pair(model, originals, inv, layer: str, measures, cache, kw) -> dict:
    """One column model's representations (and, when a measure reads them, logits) of the
    original images X and their inversions X', as ``{"rep": {"x", "x_inv"}, ...}``."""
    images, data_id = originals
    wanted = {"rep": layer, **({"logits": LOGITS} if _needs_logits(measures) else {})}
    return {
        key: {"x": cache.get(model, images, data_id, layer=at, **kw),
              "x_inv": cache.get(model, inv.images, inv.id, layer=at, **kw)}
        for key, at in wanted.items()
    }  # fmt: skip


def stir_similarity(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    out_dir: str | Path,
    *,
    n: int = 500,
    measures: str | Sequence[str] = "linear_cka",
    rng_seed: int = 0,
    seed_images: str = "noise",
    inversion: InversionConfig | None = None,
    shard_size: int = 256,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    calibration: CalibrationConfig | None = None,
    layer: Layers | None = None,
    seed: int | None = None,
    **settings: Any,
) -> tuple[SimilarityMatrix | dict[str, SimilarityMatrix], dict[str, InvertedDataset]]:
    """STIR(m2 | m1) = measure(Rep_m2(X), Rep_m2(X')), where X' is X inverted through m1 from
    noise seeds (``seed_images="data"`` for data seeds). Entry (row m1, column m2). The
    inverted sets are stored under ``out_dir/<m1>``; ``inversion`` and ``settings`` are
    as in :func:`invsim.store.invert_dataset`. ``layer`` (one name, or model -> name;
    default: the inversion's layer) is where m1 is inverted and m2 is read. ``rng_seed``
    draws the pairs, the noise and the calibration (``seed=``: its deprecated name)."""
    seed = renamed("seed", seed, "rng_seed", rng_seed)
    cache = cache or RepresentationCache()
    cfg = (inversion or InversionConfig()).replace(**settings)
    layer = cfg.layer if layer is None else layer
    names, wanted = list(models), _resolve(measures, False)
    values = {m.name: np.empty((len(names), len(names))) for m in wanted}
    stats: dict[str, dict[str, np.ndarray]] = {}
    about: dict[str, list[dict]] = {}
    stored: dict[str, InvertedDataset] = {}
    kw = {"batch_size": batch_size, "device": device}
    for i, m1 in enumerate(names):
        at = cfg.replace(layer=layer_of(layer, m1))
        inv = invert_dataset(models[m1], dataset, n, Path(out_dir) / m1, inversion=at,
                             rng_seed=seed, seed_images=seed_images, shard_size=shard_size,
                             device=device, progress=progress)  # fmt: skip
        assert inv is not None
        stored[m1] = inv
        originals = dataset_images(dataset, inv.target_index.tolist())
        original_id = f"{getattr(dataset, 'id', 'data')}@targets:{inv.id}"
        for j, m2 in enumerate(names):
            x = (originals, original_id)
            pair = _stir_pair(models[m2], x, inv, layer_of(layer, m2), wanted, cache, kw)
            found = panel(pair["rep"], wanted, logits=pair.get("logits"), rows=["x"],
                          calibration=calibration, seed=seed + i * len(names) + j)  # fmt: skip
            _put(values, stats, about, found, i, j)
    result = _assemble(names, names, values, stats, about, wanted)
    _flag_unconverged(result, stored, names)
    return _one_or_many(result, measures), stored
