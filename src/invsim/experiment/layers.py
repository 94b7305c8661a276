"""Similarity at every depth: layer-by-layer matrices between models, in bounded memory.

:func:`layer_similarity` hooks every requested layer of every model at once
(:func:`invsim.representation.capture_layers`, copies that survive in-place ReLUs) and
feeds :class:`invsim.similarity.layerwise.GramTiles`, which sums exact linear-HSIC
statistics over tiles of example pairs, so no layer's n x d representation, d x d
cross-moments or n x n Gram matrix is ever held. What is held is one *block* of m
examples' (shifted) features for every layer, for one pass over the examples after it:

- if the whole data set's features fit in the memory budget, m = n: one pass;
- otherwise m is the largest multiple of the batch size that fits, and pass p holds
  block p and streams examples ``[p m, n)`` past it: ``ceil(n / m)`` passes, about
  ``n * passes / 2`` images forwarded per model (:func:`plan_passes`, recorded in the
  result's ``schedule``).

Every unordered example pair is one tile of one pass, so the values are exact full-data
CKA (float64 products by default) for any budget. Under torchrun each process takes
every world-th pass and the sums are all-reduced: the same numbers as one process.
``estimator="minibatch"`` (Nguyen et al. 2021: unbiased HSIC per batch, averaged) is a
different quantity, one pass, for very large n; never chosen silently.

Examples:
    >>> import torch
    >>> from invsim import layer_similarity
    >>> from invsim.models import load_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> models = {"a": load_model("lenet"), "b": load_model("lenet")}
    >>> res = layer_similarity(models, torch.rand(64, 1, 28, 28), layers=["model.0", "penultimate"])
    >>> m = res.pair("a", "b")
    >>> m.rows, m.cols, round(res.pair("a", "a")["model.0", "model.0"], 8)
    (['model.0', 'penultimate'], ['model.0', 'penultimate'], 1.0)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from invsim._io import progress_bar
from invsim.config import PENULTIMATE
from invsim.distributed import all_reduce_accumulator
from invsim.representation import capture_layers, eval_mode, select_layers
from invsim.results import LayerSimilarity
from invsim.similarity.core import cka_ratio_matrix
from invsim.similarity.layerwise import GramTiles
from invsim.similarity.streaming import MinibatchCKA

__all__ = ["Schedule", "layer_similarity", "plan_passes", "run_layers"]

# measure -> debiased; the layer-by-layer matrices are the linear-CKA family (from Grams)
LAYER_MEASURES = {"linear_cka": False, "debiased_cka": True}
ESTIMATORS = ("exact", "minibatch")
GB = 1e9
JACKKNIFE_GROUPS = 20  # chosen by simulation (benchmarks/bench_layers.py --coverage)
CI_METHOD = "grouped (20-group) jackknife of debiased CKA, t interval"
CI_TARGET = "the population linear CKA of the two layers on the data's distribution"


@dataclass(frozen=True)
class Schedule:
    """How the work fits the budget: held block of ``block`` examples, ``passes`` over
    the data, ``forwarded`` images per model in all, ``bytes`` the estimated peak of the
    held statistics (the models' own activations come on top)."""

    n: int
    batch_size: int
    block: int
    passes: int
    forwarded: int
    bytes: int
    budget: int


def plan_passes(
    dims: Sequence[int],
    n: int,
    *,
    batch_size: int,
    budget: float,
    itemsize: int = 8,
    reserved: float = 0,
    block: int | None = None,
) -> Schedule:
    """The block size and number of passes for views of widths ``dims`` over ``n``
    examples within ``budget`` bytes, of which ``reserved`` are taken already (the
    process, the models' activations). ``block`` forces the examples held per pass
    (rounded down to a multiple of the batch size). Raises when one batch does not fit.

    Examples:
        >>> s = plan_passes([200_704, 512], 10_000, batch_size=100, budget=4e9)
        >>> s.block, s.passes
        (2300, 5)
    """
    total, views = sum(dims), len(dims)
    # one batch's float64 copy (shifted in place), its product-dtype copy when lower,
    # the row sums and diagonals
    copies = 8 + (itemsize if itemsize != 8 else 0)
    fixed = int(reserved) + batch_size * total * copies + 16 * views * n
    per_example = total * itemsize + 16 * views * batch_size  # held features, tile stacks
    room = int((budget - fixed) // per_example)
    fits = n if room >= n else (room // batch_size) * batch_size
    if block is not None:  # asked for: a multiple of the batch size, at most n
        fits = min(n, max(batch_size, (block // batch_size) * batch_size))
    block = fits
    if block < batch_size and block < n:
        need = (fixed + per_example * batch_size) / GB
        raise ValueError(
            f"a memory budget of {budget / GB:.3g} GB cannot hold one batch of {batch_size} "
            f"examples of these layers ({total:,} features in all) beside the "
            f"{reserved / GB:.3g} GB the process and the forwards take: it needs about "
            f"{need:.3g} GB. Raise memory_gb or lower batch_size."
        )
    passes = math.ceil(n / block)
    forwarded = sum(n - p * block for p in range(passes))
    return Schedule(
        n, batch_size, block, passes, forwarded, fixed + per_example * block, int(budget)
    )


def _measures(measures: str | Sequence[str], estimator: str) -> list[str]:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}.")
    names = [measures] if isinstance(measures, str) else list(measures)
    bad = [m for m in names if m not in LAYER_MEASURES]
    if bad:
        raise ValueError(
            f"layer_similarity computes {sorted(LAYER_MEASURES)} (from Gram tiles, exact at "
            f"any width); got {bad}. For other measures compare one layer at a time with "
            "natural_similarity(..., layer=NAME)."
        )
    return names


def _images(data: Any, n: int | None, rng_seed: int | None = None) -> Any:
    from invsim.data.base import dataset_images

    if isinstance(data, torch.Tensor):
        images = data
    elif isinstance(getattr(data, "images", None), torch.Tensor):
        images = data.images
    else:
        images = dataset_images(data, range(len(data)))
    if n is not None:
        if n > len(images):
            raise ValueError(f"n={n} asked for, but the data hold {len(images)} images.")
        images = images[:n]
    if len(images) < 4:
        raise ValueError(f"layer_similarity needs at least 4 images; got {len(images)}.")
    if rng_seed is None:
        return images
    # a random order, so the jackknife's groups are random subsets; a view that indexes
    # each batch, not a reordered copy of the data
    return _Ordered(
        images, torch.randperm(len(images), generator=torch.Generator().manual_seed(rng_seed))
    )


class _Ordered:
    """``images`` in the order ``order``, sliced batch by batch without a copy of all."""

    def __init__(self, images: torch.Tensor, order: torch.Tensor) -> None:
        self.images, self.order = images, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.images[self.order[index]]


def _layer_names(models: Mapping[str, nn.Module], layers: Any) -> dict[str, list[str]]:
    """Each model's layers: one selection for all, or a mapping name -> selection (a
    model it leaves out gets the penultimate layer)."""
    out = {}
    for k, m in models.items():
        spec = layers.get(k, PENULTIMATE) if isinstance(layers, Mapping) else layers
        out[k] = select_layers(m, spec)
    return out


class _Readers:
    """Every model's layers hooked for a block of passes; ``views(x)`` is one list of
    (b, d) tensors over all (model, layer) views in order."""

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        layers: dict[str, list[str]],
        example: torch.Tensor,
        device: Any,
        dtype: torch.dtype | None,
    ):
        self.stack = contextlib.ExitStack()
        self.device = device
        self.reads = []
        for k, m in models.items():
            self.stack.enter_context(eval_mode(m, what="layer_similarity"))
            if device is not None:
                m.to(device)
            dev = next((p.device for p in m.parameters()), torch.device("cpu"))
            read = self.stack.enter_context(
                capture_layers(m, layers[k], example_input=example.to(dev), dtype=dtype)
            )
            self.reads.append((read, layers[k], dev))
        self.stack.enter_context(torch.inference_mode())

    def first(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The first batch's views, kept for the first pass that starts at example 0 (which
        shifts them in place: read the shifts off them before)."""
        self.kept = self.views(x)
        return self.kept

    def at(self, j0: int, x: torch.Tensor) -> list[torch.Tensor]:
        """The views of the batch at ``j0``: the kept first batch once, else a forward."""
        kept = getattr(self, "kept", None)
        if j0 == 0 and kept is not None:
            self.kept = None
            return kept
        return self.views(x)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for read, names, dev in self.reads:
            got = read(x.to(dev))
            out += [got[k].cpu() for k in names]
        return out

    def close(self) -> None:
        self.stack.close()


def _rss() -> int:
    """The process's resident memory now (bytes; 0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _batches(images: Any, start: int, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for j in range(start, len(images), size):
        yield j, images[j : j + size]


@dataclass
class _Sweep:
    """What every pass over the images shares: the layer readers, the images, the batch
    size, the products' dtype, the progress bar and this process's place in the group."""

    readers: _Readers
    images: Any
    batch_size: int
    dtype: torch.dtype
    bar: Any
    rank: int = 0
    world: int = 1


def _exact_pass(acc: GramTiles, sweep: _Sweep, i0: int, block: int) -> None:
    """One pass: hold examples [i0, i0 + block), stream [i0, n) past them."""
    held: list[torch.Tensor] | None = None
    chunks: list[tuple[int, int]] = []
    stop = min(i0 + block, len(sweep.images))
    for j0, x in _batches(sweep.images, i0, sweep.batch_size):
        views = acc.shifted(sweep.readers.at(j0, x), inplace=True)  # the readers' own copies
        sweep.bar.update(len(x))
        if j0 < stop:
            if held is None:
                held = [torch.empty(stop - i0, v.shape[1], dtype=v.dtype) for v in views]
            for h, v in zip(held, views, strict=True):
                h[j0 - i0 : j0 - i0 + len(x)] = v
            chunks.append((j0, len(x)))
            if j0 + len(x) >= stop:  # the block is complete: its own pairs, each once
                _block_tiles(acc, held, i0, chunks)
        else:
            assert held is not None
            acc.update(held, i0, views, j0, shifted=True)
        del views  # before the next forward: one batch's copies alive at a time


def _block_tiles(
    acc: GramTiles, held: list[torch.Tensor], i0: int, chunks: list[tuple[int, int]]
) -> None:
    """The held block's own pairs as chunk x chunk tiles, each unordered pair once: a
    chunk with itself (the diagonal), and with each later chunk (standing for both
    orders), half the products of the whole block against each chunk."""
    parts = [(c0, [h[c0 - i0 : c0 - i0 + w] for h in held]) for c0, w in chunks]
    for k, (c0, first) in enumerate(parts):
        for c1, second in parts[k:]:
            acc.update(first, c0, second, c1, shifted=True)


def layer_similarity(
    models: Mapping[str, nn.Module],
    data: Any,
    *,
    layers: str | Sequence[str] | Mapping[str, Any] = "blocks",
    measures: str | Sequence[str] = ("linear_cka",),
    n: int | None = None,
    batch_size: int = 128,
    memory_gb: float = 4.0,
    block: int | None = None,
    estimator: str = "exact",
    ci: float | None = 0.95,
    groups: int = JACKKNIFE_GROUPS,
    rng_seed: int | None = 0,
    product_dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> LayerSimilarity:
    """Layer-by-layer similarity of every model with every other on the same images.

    ``data``: a tensor of images, a Dataset, an :class:`~invsim.InvertedDataset` or
    ImageSet (its images); the first ``n`` are used. ``layers``: one selection for every
    model (names, patterns, "penultimate", "logits", "blocks"; see
    :func:`invsim.representation.select_layers`) or a mapping model -> selection.
    ``measures``: ``linear_cka`` and/or ``debiased_cka``. ``memory_gb`` bounds the
    process's peak: what it holds already, the forwards' activations and the held
    statistics (see the module doc for the schedule); ``block`` forces the examples held
    per pass instead (more passes, the same values). ``ci``: the level of each cell's
    interval for the population CKA (exact estimator, n >= ``MIN_INTERVAL_N``; None: none):
    centred on debiased CKA, the grouped jackknife's standard error over ``groups``
    random groups of examples and a t quantile (docs/guides/layers.md: its coverage by
    simulation); linear CKA's cells also get the exact permutation-null mean. ``seed``
    orders the examples at random for the groups (the values do not depend on it; None:
    the data's order). ``product_dtype=torch.float32``
    computes the tiles' products in float32 on shifted features (faster, ~1e-6).
    """
    from invsim.distributed import rank_world

    names = _measures(measures, estimator)
    images = _images(data, n, rng_seed)
    count = len(images)
    chosen = _layer_names(models, layers)
    exact = estimator == "exact"  # exact sums take float64 copies; minibatch, the model's own
    readers = _Readers(models, chosen, images[:1], device, torch.float64 if exact else None)
    rank, world = rank_world()
    try:
        held_now = _rss()  # before the first batch, which the budget counts itself
        dims, shifts = _first_batch(readers, images[:batch_size], rank)
        plan = _schedule(
            dims,
            count,
            batch_size=batch_size,
            memory_gb=memory_gb,
            block=block,
            dtype=product_dtype,
            exact=exact,
            held_now=held_now,
        )
        with progress_bar(plan.forwarded, "layers", progress) as bar:
            sweep = _Sweep(readers, images, batch_size, product_dtype, bar, rank, world)
            if exact:
                tiles = _exact(sweep, plan, shifts, groups)
                hsic = {m: tiles.hsic(debiased=LAYER_MEASURES[m]) for m in names}
            else:
                summed = _minibatch(sweep, len(dims)).hsic_matrix()
                hsic = {m: summed for m in names}
        stats = _intervals(tiles, names, ci) if exact else {}
    finally:
        readers.close()
    values = {m: cka_ratio_matrix(h).numpy() for m, h in hsic.items()}
    starts = np.cumsum([0] + [len(chosen[k]) for k in models]).tolist()
    widths = {k: dims[starts[i] : starts[i + 1]] for i, k in enumerate(models)}
    return LayerSimilarity(
        list(models),
        chosen,
        widths,
        values,
        count,
        estimator,
        asdict(plan),
        images=str(getattr(data, "id", "")),
        stats=stats,
        about=_about(stats, names, ci, groups, rng_seed),
    )


def _first_batch(readers: _Readers, x: torch.Tensor, rank: int) -> tuple[list, list]:
    """Each view's width and shift (the first batch's mean). The readers keep the batch
    for rank 0's first pass, which starts at example 0; other ranks drop it."""
    first = readers.first(x)
    dims, shifts = [v.shape[1] for v in first], [v.double().mean(dim=0) for v in first]
    if rank != 0:
        readers.kept = None
    return dims, shifts


def _schedule(
    dims: list[int],
    count: int,
    *,
    batch_size: int,
    memory_gb: float,
    block: int | None,
    dtype: torch.dtype,
    exact: bool,
    held_now: int,
) -> Schedule:
    """The exact estimator's passes in the budget; the minibatch one's single pass. The
    budget leaves room for what the process holds already (the models, the images,
    torch) and the forwards' own activations (about twice one batch of the selected
    layers in float32)."""
    reserved = held_now + 2 * 4 * batch_size * sum(dims)
    if exact:
        isz = torch.empty((), dtype=dtype).element_size()
        return plan_passes(
            dims,
            count,
            batch_size=batch_size,
            budget=memory_gb * GB,
            itemsize=isz,
            reserved=reserved,
            block=block,
        )
    held = int(reserved + batch_size * sum(dims) * 16 + 8 * (batch_size * len(dims)) ** 2)
    return Schedule(count, batch_size, batch_size, 1, count, held, int(memory_gb * GB))


def _about(stats: dict, names: Sequence[str], ci: float | None, groups: int, rng_seed) -> dict:
    """What the intervals are (when computed) and the example order's seed."""
    about: dict[str, Any] = {"order_seed": rng_seed}
    if "ci_low" in stats.get(names[0], {}):
        method = CI_METHOD.replace("20", str(groups))
        about.update(
            ci=ci, ci_method=method, ci_target=CI_TARGET, groups=groups, ci_centre="debiased_cka"
        )
    return about


def _exact(sweep: _Sweep, plan: Schedule, shifts: list, groups: int) -> GramTiles:
    """The Gram tiles of every example pair, this process's passes summed with the rest."""
    acc = GramTiles(plan.n, shifts=shifts, product_dtype=sweep.dtype, groups=groups)
    for p in range(sweep.rank, plan.passes, sweep.world):
        _exact_pass(acc, sweep, p * plan.block, plan.block)
    all_reduce_accumulator(acc)
    return acc


def _intervals(acc: GramTiles, names: Sequence[str], ci: float | None) -> dict[str, dict]:
    """Per measure: each cell's interval for the population CKA (centred on debiased CKA,
    grouped-jackknife standard error, t quantile with groups - 1 degrees of freedom), and
    for linear CKA the exact permutation-null mean."""
    from scipy.stats import t as student_t

    from invsim.similarity.calibration import MIN_INTERVAL_N

    out: dict[str, dict] = {m: {} for m in names}
    if ci is not None and acc.n >= MIN_INTERVAL_N and acc.groups >= 2:
        centre, se = acc.jackknife(debiased=True)
        q = float(student_t.ppf(0.5 + ci / 2, acc.groups - 1))
        bounds = {
            "ci_low": (centre - q * se).numpy(),
            "ci_high": (centre + q * se).numpy(),
            "ci_centre": centre.numpy(),
        }
        for m in names:
            out[m].update({k: v.copy() for k, v in bounds.items()})
    if "linear_cka" in out:
        out["linear_cka"]["null_mean"] = acc.null_mean().numpy()
    return out


def _minibatch(sweep: _Sweep, views: int) -> MinibatchCKA:
    """Per-batch unbiased HSIC summed over batches (a last batch of fewer than 4 is left
    out), this process's batches summed with the rest."""
    acc = MinibatchCKA(views=views, product_dtype=sweep.dtype)
    for i, (j0, x) in enumerate(_batches(sweep.images, 0, sweep.batch_size)):
        if i % sweep.world == sweep.rank and len(x) > 3:
            acc.update_views(sweep.readers.at(j0, x))
            sweep.bar.update(len(x))
    all_reduce_accumulator(acc)
    return acc


def run_layers(
    cfg: Any, models: Mapping[str, nn.Module], data: Any, inverted: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The run's layer-by-layer view (the ``layers:`` section of the config): natural
    images (the first ``n``), and each row model's inverted set, which was inverted at
    that model's own layer (``ModelConfig.layer``) and is read here at every layer."""
    section = cfg.layers
    if section is None:
        return None
    chosen = {m.name: m.layers or section.select for m in cfg.models}
    kw = {
        "layers": chosen,
        "measures": list(section.measures),
        "batch_size": section.batch_size,
        "memory_gb": section.memory_gb,
        "estimator": section.estimator,
        "device": cfg.device,
    }
    n = section.n or cfg.data.natural_n
    total = len(data)
    out: dict[str, Any] = {
        "natural": layer_similarity(models, data, n=min(n or total, total), **kw)
    }
    if section.inverted and inverted:
        out["inverted"] = {}
        for row, inv in inverted.items():
            res = layer_similarity(models, inv, **kw)
            res.row = row
            res.images = f"{row}'s inverted set ({inv.config['inversion'].get('layer')})"
            out["inverted"][row] = res
    return out
