"""The regimes' similarity matrices between models: natural, inverted (Jones et al.), STIR,
under any registered measure (:data:`invsim.similarity.MEASURES`).

- natural: the measure on the same held-out natural images for every pair (symmetric for
  a symmetric measure);
- inverted: entry (r, c) = measure(Rep_r(X_r), Rep_c(X_r)), X_r = row model r's inverted
  data set; asymmetric;
- STIR(m2 | m1) = measure(Rep_m2(X), Rep_m2(X')), X' inverted through m1 from noise seeds
  to match Rep_m1(X) (Nanda et al. 2022); entry (row m1, column m2).

For an asymmetric measure, entry (r, c) is ``measure(Rep_r, Rep_c)``. The three regimes'
functions share one signature (``n``, ``measures``, ``rng_seed``, ``layer``, ``cache``,
``batch_size``, ``device``, ``calibration``) and one return type: a dict measure name ->
:class:`~invsim.similarity.SimilarityMatrix`, whether ``measures`` is one name or a
list. Each model's representation (and, for functional measures, its logits) of
each data set is computed once and, with a cache directory, stored on disk keyed by
(model fingerprint, data set id, layer), so a second run, or a run with one model added,
computes only what is new. All streaming measures come from one pass of cross-moments
per data set (:class:`~invsim.StreamingPanel`); the others are computed pairwise.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from invsim._io import atomic_write
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
from invsim.store.diagnostics import InversionWarning, warn_unconverged

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
    rng_seed: int = 0,
    inputs: torch.Tensor | None = None,
) -> dict[str, SimilarityMatrix]:
    """Every measure between the representations ``reps`` (name -> (n, d), the same
    examples), for the ``rows`` asked (default: all) against every column. Functional
    measures read ``logits`` (name -> (n, classes)) instead; a deconfounding measure
    (``dcka``) reads ``inputs``, the examples' images. With ``calibration``, the
    measures it names get per-cell ``ci_low``, ``ci_high``, ``null_mean``, ``p_value``."""
    names, rows = list(reps), list(rows or reps)
    found = {m.name: m for m in map(get_measure, measures)}
    for name, spec in found.items():
        if spec.deconfounds:
            if inputs is None:
                raise ValueError(
                    f"measure {name!r} deconfounds against the examples' inputs, which this "
                    "computation does not have (STIR compares two different image sets); "
                    f"leave {name!r} out here."
                )
            found[name] = spec.against(inputs)
    out: dict[str, SimilarityMatrix] = {}
    streaming = [m for m, spec in found.items() if spec.streams]
    scatter: dict[str, torch.Tensor] = {}  # each view's centred X^T X, from the pass
    if streaming:
        acc = StreamingPanel(names)
        n = len(next(iter(reps.values())))
        for start in range(0, n, chunk):
            acc.update({k: v[start : start + chunk] for k, v in reps.items()})
        centred = acc.moments.compute()
        out.update(acc.compute([found[m] for m in streaming], rows=rows, centred=centred))
        scatter = {k: centred.cov(i, i) for i, k in enumerate(names)}
    for name, spec in found.items():
        if spec.streams:
            continue
        data = reps if spec.inputs == "representation" else (logits or {})
        values = each_cell(
            rows, names, lambda r, c, f=spec.fn, d=data: f(d[r], d[c]), symmetric=spec.symmetric
        )
        out[name] = SimilarityMatrix(rows, names, np.array(values, dtype=float))
    if calibration is not None:
        for name in [m for m in calibration.measures if m in out]:
            data = reps if found[name].inputs == "representation" else (logits or {})
            out[name].stats, out[name].interval = _calibrated(
                data, out[name], found[name], calibration, rng_seed, scatter
            )
    for name, spec in found.items():
        out[name].measure, out[name].options = name, dict(spec.options)
    return {m: out[m] for m in found}


def _calibrated(
    data: Mapping[str, torch.Tensor],
    matrix: SimilarityMatrix,
    spec: Measure,
    cal: CalibrationConfig,
    rng_seed: int,
    scatter: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict, dict]:
    """Per-cell interval and null (:mod:`invsim.similarity.calibration`), and what the
    interval is (``ci_method``, ``ci_target``, ``ci_centre``, ``ci_reason``). A measure
    with the CKA jackknife and the exact null goes through the Gram matrices once for the
    whole matrix (:func:`cka_calibration`, given each view's centred X^T X, ``scatter``,
    when a streamed pass has them); other measures cell by cell, reusing a symmetric
    measure's mirrored cells."""
    values, rows, cols = matrix.values, matrix.rows, matrix.cols
    n = len(next(iter(data.values())))
    widths = max(int(np.prod(v.shape[1:])) for v in data.values())
    method, reason = interval_method(spec, n, (widths, widths))
    centre = CI_CENTRE.get(spec.interval)
    about = {"ci_method": method, "ci_target": CI_TARGET, "ci_reason": reason, "ci_centre": centre}
    if spec.exact_null and n <= GRAM_LIMIT:
        moments = cal.null == "moments" and cal.n_perm > 0
        stats = cka_calibration(data, values, rows, cols, ci=cal.ci, null=moments, scatter=scatter)
        if cal.null == "permutation" and cal.n_perm:
            null = cka_null_matrix(data, rows, cols, cal.n_perm, rng_seed)  # (rows, cols, n_perm)
            stats["null_mean"] = null.mean(axis=2)
            stats["p_value"] = (1 + (null >= values[:, :, None]).sum(axis=2)) / (1 + cal.n_perm)
    else:
        cells = each_cell(
            rows,
            cols,
            lambda r, c: calibrate(
                data[r],
                data[c],
                measure=spec,
                n_perm=cal.n_perm,
                ci=cal.ci,
                rng_seed=rng_seed,
                null=cal.null,
            ),
            symmetric=spec.symmetric,
        )
        stats = {
            k: np.array(
                [[np.nan if getattr(x, k) is None else getattr(x, k) for x in row] for row in cells]
            )
            for k in SimilarityMatrix.STATS
        }
    if method is None:  # no interval can be trusted here: none is reported (about says why)
        for k in ("ci_low", "ci_high", "ci_centre"):
            stats[k] = np.full(np.shape(values), np.nan)
    if cal.n_perm == 0:
        stats.pop("null_mean", None), stats.pop("p_value", None)
    return stats, about


def _resolve(measures: MeasureLike | Sequence[MeasureLike]) -> list[Measure]:
    """The measures asked for (one, or a list), options bound."""
    one = isinstance(measures, (str, Mapping, Measure))
    found = [get_measure(m) for m in ([measures] if one else measures)]  # type: ignore[list-item]
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


Similarities = dict[str, SimilarityMatrix]


def natural_similarity(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    *,
    n: int | None = 1000,
    measures: MeasureLike | Sequence[MeasureLike] = "linear_cka",
    rng_seed: int = 0,
    layer: Layers = PENULTIMATE,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
) -> Similarities:
    """measure name -> matrix of every model against every other on the first ``n`` images
    of ``dataset`` (None: all of them), the same images for every pair. ``rng_seed``
    draws the calibration's permutations and groups.

    Examples:
        >>> import torch
        >>> from invsim.data import TensorImageDataset
        >>> from invsim.experiment import natural_similarity
        >>> from invsim.models import load_model
        >>> ds = TensorImageDataset(torch.rand(64, 1, 28, 28), torch.arange(64) % 4)
        >>> found = natural_similarity({"a": load_model("mlp"), "b": load_model("lenet")}, ds)
        >>> m = found["linear_cka"]
        >>> m.rows, round(m["a", "a"], 6)
        (['a', 'b'], 1.0)
    """
    cache = cache or RepresentationCache()
    images, data_id = _subset(dataset, n)
    wanted = _resolve(measures)
    kw = {"batch_size": batch_size, "device": device}
    reps = {
        k: cache.get(m, images, data_id, layer=layer_of(layer, k), **kw) for k, m in models.items()
    }
    logit = None
    if _needs_logits(wanted):
        logit = {k: cache.get(m, images, data_id, layer=LOGITS, **kw) for k, m in models.items()}
    return panel(
        reps, wanted, logits=logit, calibration=calibration, rng_seed=rng_seed, inputs=images
    )


def _first(inv: InvertedDataset, n: int | None) -> tuple[torch.Tensor, str]:
    """The first ``n`` images of an inverted set (all of them when None or fewer), and
    their id for the representation cache."""
    if n is None or n >= len(inv.images):
        return inv.images, inv.id
    return inv.images[:n], f"{inv.id}[:{n}]"


def inverted_similarity(
    models: Mapping[str, nn.Module],
    inverted: Mapping[str, InvertedDataset],
    *,
    n: int | None = 1000,
    measures: MeasureLike | Sequence[MeasureLike] = "linear_cka",
    rng_seed: int = 0,
    layer: Layers = PENULTIMATE,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
    at_loss: float | None = None,
) -> Similarities:
    """measure name -> asymmetric matrix: row r, column c = measure(Rep_r(X_r),
    Rep_c(X_r)) on the first ``n`` images (None: all) of row model r's inverted data set
    X_r. Rows are the models in ``inverted``, columns all ``models``. The same ``n`` as
    the natural matrix's keeps the two comparable (CKA's small-sample bias depends on n).
    A row whose inversions did not converge (its set's ``diagnostics``) is warned about
    (:class:`~invsim.store.diagnostics.InversionWarning`, naming the model, its median
    loss and the criterion) and listed in each matrix's ``flags["not_converged"]``.

    ``at_loss`` (one of the sets' ``snapshot_losses``) computes each row on its
    examples' first iterates at or below that loss instead of their end points: the rows
    at matched convergence. Examples that never reached it are left out; each matrix's
    ``flags["at_loss"]`` holds the level, and per row the examples used and left out. A
    row with fewer than :data:`MIN_AT_LOSS` examples there is not computed (NaN), with a
    warning, and listed in ``flags["at_loss"]["not_reached"]``."""
    cache = cache or RepresentationCache()
    cols = list(models)
    rows = [r for r in models if r in inverted]
    missing = [r for r in inverted if r not in models]
    if missing:
        raise ValueError(f"inverted data sets for unknown models {missing}; known: {cols}.")
    wanted = _resolve(measures)
    cells = _Cells.empty(wanted, (len(rows), len(cols)))
    kw = {"batch_size": batch_size, "device": device}
    path = _PathRows(at_loss)
    for i, r in enumerate(rows):
        _check_layer(inverted[r], r, layer_of(layer, r))
        images, data_id = path.images(r, inverted[r], n)
        if images is None:
            continue
        reps = {
            c: cache.get(models[c], images, data_id, layer=layer_of(layer, c), **kw) for c in cols
        }
        logit = None
        if _needs_logits(wanted):
            logit = {c: cache.get(models[c], images, data_id, layer=LOGITS, **kw) for c in cols}
        found = panel(
            reps,
            wanted,
            logits=logit,
            rows=[r],
            calibration=calibration,
            rng_seed=rng_seed + i,
            inputs=images,
        )
        cells.put(found, i, slice(None), slice(None))
    result = cells.matrices(rows, cols, wanted)
    _flag_unconverged(result, inverted, rows)
    path.flag(result)
    return result


# the fewest examples a row at matched loss is computed on
MIN_AT_LOSS = 10


@dataclass
class _PathRows:
    """The rows' images at a loss level of their inversion paths (``at_loss``), or their
    end points (None), and what was used and left out per row."""

    at_loss: float | None
    used: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    not_reached: dict[str, int] = field(default_factory=dict)

    def images(self, row: str, inv: Any, n: int | None) -> tuple[torch.Tensor | None, str]:
        if self.at_loss is None:
            return _first(inv, n)
        if getattr(inv, "path", None) is None:
            raise ValueError(
                f"the inverted data set of {row!r} kept no inversion path; invert it with "
                f"snapshot_losses including {self.at_loss} to compare rows at that loss."
            )
        images, _ = inv.path.at(self.at_loss)
        self.left_out[row] = len(inv) - len(images)
        if len(images) < MIN_AT_LOSS:
            self.not_reached[row] = len(images)
            warnings.warn(
                f"{row}: only {len(images)} of {len(inv)} inversions reached loss "
                f"{self.at_loss} (at least {MIN_AT_LOSS} are needed); its row at that loss "
                "is not computed.",
                InversionWarning,
                stacklevel=3,
            )
            return None, ""
        data_id = f"{inv.id}@loss={self.at_loss}"
        if n is not None and n < len(images):
            images, data_id = images[:n], f"{data_id}[:{n}]"
        self.used[row] = len(images)
        return images, data_id

    def flag(self, result: Mapping[str, SimilarityMatrix]) -> None:
        if self.at_loss is None:
            return
        about = {
            "level": self.at_loss,
            "examples": self.used,
            "left_out": self.left_out,
            "not_reached": self.not_reached,
        }
        for m in result.values():
            m.flags["at_loss"] = about


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


@dataclass
class _Cells:
    """The values, per-cell statistics and interval descriptions of matrices computed a
    row or a cell at a time, per measure."""

    values: dict[str, np.ndarray]
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    about: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def empty(cls, measures: Sequence[Measure], shape: tuple[int, int]) -> _Cells:
        return cls({m.name: np.full(shape, np.nan) for m in measures})

    def put(self, found: Mapping[str, SimilarityMatrix], i: int, j: Any, col: Any) -> None:
        """Copy row 0, column(s) ``col`` of each found matrix into row ``i``, column(s)
        ``j``, with its statistics and what its interval is."""
        for m, mat in found.items():
            self.about.setdefault(m, []).append(mat.interval)
            self.values[m][i, j] = mat.values[0, col]
            for k, v in mat.stats.items():
                shape = self.values[m].shape
                store = self.stats.setdefault(m, {}).setdefault(k, np.full(shape, np.nan))
                store[i, j] = v[0, col]

    def matrices(
        self, rows: list[str], cols: list[str], measures: Sequence[Measure]
    ) -> Similarities:
        return {
            m.name: SimilarityMatrix(
                rows,
                cols,
                self.values[m.name],
                self.stats.get(m.name, {}),
                merge_interval(self.about.get(m.name, [])),
                m.name,
                dict(m.options),
            )
            for m in measures
        }


def stir_similarity(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    out_dir: str | Path,
    *,
    n: int | None = 1000,
    measures: MeasureLike | Sequence[MeasureLike] = "linear_cka",
    rng_seed: int = 0,
    layer: Layers | None = None,
    cache: RepresentationCache | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
    seed_images: str = "noise",
    inversion: InversionConfig | None = None,
    shard_size: int = 256,
    progress: bool | None = None,
    **settings: Any,
) -> Similarities:
    """measure name -> matrix of STIR(m2 | m1) = measure(Rep_m2(X), Rep_m2(X')), where X
    is ``n`` images of ``dataset`` (None: all) and X' is X inverted through m1 from noise
    seed images (``seed_images="data"``: data seed images). Entry (row m1, column m2).
    The inverted sets are stored under ``out_dir/<m1>`` (reopen one with
    ``InvertedDataset(out_dir / m1)``); ``inversion`` and ``settings`` are as in
    :func:`invsim.store.invert_dataset`. ``layer`` (one name, or model -> name;
    default: the inversion's layer) is where m1 is inverted and m2 is read. ``rng_seed``
    draws the pairs, the noise and the calibration."""
    cache = cache or RepresentationCache()
    cfg = InversionConfig.merged(inversion, settings, where="stir_similarity")
    layer = cfg.layer if layer is None else layer
    names, wanted = list(models), _resolve(measures)
    refused = [m.name for m in wanted if m.deconfounds]
    if refused:
        raise ValueError(
            f"STIR compares a model on two different image sets (X and X'), so there are no "
            f"common inputs for {refused} to deconfound against; leave them out of STIR."
        )
    keys = {"rep": None, **({"logits": LOGITS} if _needs_logits(wanted) else {})}
    cells = _Cells.empty(wanted, (len(names), len(names)))
    stored: dict[str, InvertedDataset] = {}
    kw = {"batch_size": batch_size, "device": device}
    for i, m1 in enumerate(names):
        at = cfg.replace(layer=layer_of(layer, m1))
        inv = invert_dataset(
            models[m1],
            dataset,
            len(dataset) if n is None else n,
            Path(out_dir) / m1,  # type: ignore[arg-type]
            inversion=at,
            rng_seed=rng_seed,
            seed_images=seed_images,
            shard_size=shard_size,
            device=device,
            progress=progress,
        )
        assert inv is not None
        stored[m1] = inv
        x = dataset_images(dataset, inv.target_index.tolist())
        x_id = f"{getattr(dataset, 'id', 'data')}@targets:{inv.id}"
        for j, m2 in enumerate(names):
            read = {k: fixed or layer_of(layer, m2) for k, fixed in keys.items()}
            pair = {
                k: {
                    "x": cache.get(models[m2], x, x_id, layer=where, **kw),
                    "x_inv": cache.get(models[m2], inv.images, inv.id, layer=where, **kw),
                }
                for k, where in read.items()
            }
            found = panel(
                pair["rep"],
                wanted,
                logits=pair.get("logits"),
                rows=["x"],
                calibration=calibration,
                rng_seed=rng_seed + i * len(names) + j,
            )
            cells.put(found, i, j, 1)  # column 1: x_inv
    result = cells.matrices(names, names, wanted)
    _flag_unconverged(result, stored, names)
    return result
