"""The run as named stages, each a small function usable alone and resumable from its
cached outputs under ``cfg.out``:

    load_data -> load_models -> invert_models -> compute_matrices -> summarise
              -> write_outputs                            (run_experiment chains them)

Trained models (``models/``), finished inversion shards (``inverted/``) and
representations (``cache/``) are reused, so an interrupted run started again picks up
where it stopped and a finished run recomputes nothing. The confound experiment is a
config of this same pipeline (:func:`confound_config`), run into ``out/confound``.
Under torchrun rank 0 trains and writes; inversion and extraction are split by rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import invsim
from invsim._io import atomic_write
from invsim.config import ExperimentConfig, InversionConfig, ModelConfig, validate
from invsim.data import load_dataset
from invsim.distributed import barrier, init_from_env, is_main
from invsim.experiment.matrices import (
    RepresentationCache,
    inverted_similarity,
    natural_similarity,
    stir_similarity,
)
from invsim.experiment.summary import (
    claim_statistics,
    confound_headline,
    inversion_diagnostics,
    panel_summary,
    robustness_summary,
    summarize,
    warnings_of,
    write_matrix_csv,
)
from invsim.models import load_model
from invsim.similarity import SimilarityMatrix
from invsim.store import InvertedDataset, invert_dataset
from invsim.train import train_model

__all__ = [
    "Zoo",
    "compute_matrices",
    "confound_config",
    "invert_models",
    "load_data",
    "load_models",
    "run_experiment",
    "summarise",
    "write_outputs",
]


def log(msg: str, *, quiet: bool = False) -> None:
    if not quiet and is_main():
        print(f"[invsim] {msg}", file=sys.stderr, flush=True)


@dataclass
class Zoo:
    """The run's models with what the summaries need: robustness eps and architecture."""

    models: dict[str, nn.Module]
    eps: dict[str, float]
    arch: dict[str, str]


def load_data(cfg: ExperimentConfig, split: str | None = None) -> Dataset:
    """The run's data set, the evaluation split unless ``split`` says otherwise."""
    d = cfg.data
    size = {k: getattr(d, k) for k in ("size", "crop") if getattr(d, k)}
    return load_dataset(d.dataset, split=split or d.eval_split, **size, **d.options)


def train_once(path: Path, train: Callable[[], None], *, device: str | None = None) -> nn.Module:
    """Train into ``path`` unless it exists, then load it. Under torchrun only rank 0
    trains; the others wait at a barrier and load its file."""
    if is_main() and not path.exists():
        train()
    barrier()
    model = load_model(str(path))
    return model.to(device) if device else model


def layers_of(cfg: ExperimentConfig) -> dict[str, str]:
    """Each model's layer: its own ``layer`` when set, else the run's
    (``inversion.layer``). A row model is inverted at its layer, and every column is
    read at its own."""
    return {m.name: m.layer or cfg.inversion.layer for m in cfg.models}


def _shape_kwargs(m: ModelConfig) -> dict[str, Any]:
    keys = ("num_classes", "in_channels", "image_size", "mean", "std")
    return {**m.arch_kwargs, **{k: getattr(m, k) for k in keys if getattr(m, k) is not None}}


def _trainer(cfg: ExperimentConfig, m: ModelConfig, eval_ds: Dataset, path: Path, quiet: bool):
    recipe = m.train
    assert recipe is not None

    def train() -> None:
        if recipe.dataset or recipe.data_options:
            ds = load_dataset(
                recipe.dataset or cfg.data.dataset,
                split=cfg.data.train_split,
                **recipe.data_options,
            )
        else:
            ds = load_data(cfg, cfg.data.train_split)
        log(
            f"model {m.name}: training {m.spec} {recipe.model_dump(exclude_none=True)}", quiet=quiet
        )
        adv = recipe.adversarial.model_dump() if recipe.adversarial else None
        width = {"width": recipe.width} if recipe.width else {}
        _, metrics = train_model(
            m.spec,
            ds,
            epochs=recipe.epochs,
            adversarial=adv,
            lr=recipe.lr,
            batch_size=recipe.batch_size,
            test_dataset=eval_ds,
            out=path,
            device=cfg.device,
            seed=cfg.seed if recipe.seed is None else recipe.seed,
            **width,
            **_shape_kwargs(m),
        )
        robust = metrics.get("robust_acc")
        extra = "" if robust is None else f", robust acc {robust:.3f}"
        log(
            f"model {m.name}: clean acc {metrics.get('clean_acc', float('nan')):.3f}{extra}",
            quiet=quiet,
        )

    return train


def load_models(cfg: ExperimentConfig, eval_ds: Dataset, *, quiet: bool = False) -> Zoo:
    """Load each model's checkpoint, or train it into ``out/models`` (once)."""
    zoo = Zoo({}, {}, {})
    for m in cfg.models:
        if m.checkpoint:
            model = load_model(
                m.spec,
                checkpoint=m.checkpoint,
                trust_checkpoint=m.trust_checkpoint,
                **_shape_kwargs(m),
            )
        else:
            path = Path(cfg.out) / "models" / f"{m.name}.safetensors"
            model = train_once(path, _trainer(cfg, m, eval_ds, path, quiet), device=cfg.device)
        meta = model.invsim_meta
        zoo.models[m.name] = model
        zoo.eps[m.name] = float(m.eps if m.eps is not None else meta.get("eps") or 0)
        zoo.arch[m.name] = m.arch or meta.get("arch") or m.spec
    return zoo


def invert_models(
    cfg: ExperimentConfig, zoo: Zoo, eval_ds: Dataset, *, quiet: bool = False
) -> dict[str, InvertedDataset]:
    """Each row model's inverted data set, stored under ``out/inverted/<name>``."""
    if "inverted" not in cfg.regimes:
        return {}
    inverted = {}
    for m in cfg.models:
        if not m.invert:
            continue
        log(
            f"inverting {cfg.data.pairs} pairs through {m.name} "
            f"({cfg.inversion.iterations} iterations)",
            quiet=quiet,
        )
        inv = invert_dataset(
            zoo.models[m.name],
            eval_ds,
            cfg.data.pairs,
            Path(cfg.out) / "inverted" / m.name,
            inversion=cfg.inversion.settings().replace(layer=layers_of(cfg)[m.name]),
            seed=cfg.seed,
            shard_size=cfg.inversion.shard_size,
            device=cfg.device,
        )
        assert inv is not None
        inverted[m.name] = inv
    return inverted


def compute_matrices(
    cfg: ExperimentConfig,
    zoo: Zoo,
    eval_ds: Dataset,
    inverted: Mapping[str, InvertedDataset],
    *,
    cache: RepresentationCache,
    quiet: bool = False,
) -> dict[str, dict[str, SimilarityMatrix]]:
    """regime -> measure -> matrix, for the regimes and measures the config asks for."""
    kw = {
        "measures": cfg.measures,
        "layer": layers_of(cfg),
        "cache": cache,
        "device": cfg.device,
        "calibration": cfg.calibration,
    }
    out: dict[str, dict[str, SimilarityMatrix]] = {}
    if "natural" in cfg.regimes:
        log("natural similarity", quiet=quiet)
        out["natural"] = natural_similarity(
            zoo.models, eval_ds, n=cfg.data.natural_n, seed=cfg.seed, **kw
        )
    if inverted:
        log("inverted similarity", quiet=quiet)
        out["inverted"] = inverted_similarity(zoo.models, inverted, seed=cfg.seed, **kw)
    if "stir" in cfg.regimes:
        log("STIR", quiet=quiet)
        st, settings = cfg.stir, cfg.inversion.settings()
        if st.iterations is not None:
            settings = settings.replace(iterations=st.iterations)
        out["stir"], _ = stir_similarity(
            zoo.models,
            eval_ds,
            Path(cfg.out) / "stir",
            n=st.n,
            seed=cfg.seed,
            seed_images=st.seed_images or "data",
            inversion=settings,
            shard_size=cfg.inversion.shard_size,
            **kw,
        )
    return out


DRIFT_THRESHOLD = 0.02


def drift(
    cfg: ExperimentConfig,
    zoo: Zoo,
    inverted: Mapping[str, InvertedDataset],
    full: SimilarityMatrix,
    *,
    cache: RepresentationCache,
) -> dict[str, Any] | None:
    """The inverted matrix (primary measure) at half the inversion budget, from the
    stored half-budget images (no extra inversion): the cells that moved more than
    ``DRIFT_THRESHOLD`` in the second half have not settled."""
    if not inverted or any(v.half_images is None for v in inverted.values()):
        return None
    halves = {
        k: SimpleNamespace(images=v.half_images, id=f"{v.id}:half") for k, v in inverted.items()
    }
    half = inverted_similarity(
        zoo.models,
        halves,
        measures=cfg.measures[0],
        layer=layers_of(cfg),
        cache=cache,
        device=cfg.device,
    )
    change = np.abs(full.values - half.values)
    moved = [
        {
            "row": r,
            "column": c,
            "value": float(full.values[i, j]),
            "half_budget_value": float(half.values[i, j]),
            "change": float(change[i, j]),
        }
        for i, r in enumerate(full.rows)
        for j, c in enumerate(full.cols)
        if change[i, j] > DRIFT_THRESHOLD
    ]
    return {
        "half_iterations": cfg.inversion.iterations // 2,
        "threshold": DRIFT_THRESHOLD,
        "max_change": float(change.max()),
        "moved": moved,
    }


def summarise(
    zoo: Zoo,
    panels: Mapping[str, Mapping[str, SimilarityMatrix]],
    inverted: Mapping[str, InvertedDataset],
) -> dict[str, Any]:
    """results.json's body. ``matrices[regime]`` is the primary measure's (the first
    listed); ``measures[measure][regime]`` holds every measure's; ``summary`` and
    ``robustness`` are the primary measure's, ``panel`` the per-measure table."""
    measures = list(next(iter(panels.values()))) if panels else []
    primary = {regime: by[measures[0]] for regime, by in panels.items()} if measures else {}
    results: dict[str, Any] = {
        "matrices": {k: _labelled(m, measures[0]) for k, m in primary.items()},
        "measures": {m: {k: _labelled(by[m], m) for k, by in panels.items()} for m in measures},
        "summary": {k: summarize(m) for k, m in primary.items()},
        "panel": {m: panel_summary(panels, m, zoo.eps) for m in measures},
        "diagnostics": {k: inversion_diagnostics(zoo.models[k], v) for k, v in inverted.items()},
    }
    if len(set(zoo.eps.values())) > 1:
        results["robustness"] = {
            k: robustness_summary(m, zoo.eps, zoo.arch) for k, m in primary.items()
        }
    results["models"] = {
        n: {
            "eps": zoo.eps[n],
            "arch": zoo.arch[n],
            "spec": m.invsim_meta.get("spec"),
            "sha256": m.invsim_meta.get("sha256"),
            "training": m.invsim_meta.get("training"),
        }
        for n, m in zoo.models.items()
    }
    return results


def primary_of(panels, regime: str, cfg: ExperimentConfig) -> SimilarityMatrix | None:
    """The primary measure's matrix of ``regime``, or None when it was not computed."""
    return panels[regime][cfg.measures[0]] if regime in panels else None


def _labelled(matrix: SimilarityMatrix, measure: str) -> dict[str, Any]:
    return {**matrix.to_dict(), "measure": measure}


def provenance(cfg: ExperimentConfig, cache: RepresentationCache, seconds: float) -> dict:
    """Versions, the whole config and its hash, and where the run left the paper."""
    paper, used = InversionConfig(), cfg.inversion
    reduced = {
        k: {"used": getattr(used, k), "paper": getattr(paper, k)}
        for k in ("iterations", "step_size", "momentum", "eps")
        if getattr(used, k) != getattr(paper, k)
    }
    config = cfg.model_dump(mode="json")
    return {
        "invsim": invsim.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "config": config,
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        "deviations_from_paper": reduced,
        "pairs": cfg.data.pairs,
        "cache": dict(cache.stats),
        "seconds": seconds,
    }


def write_outputs(out: Path, results: Mapping[str, Any], *, report: bool = True) -> None:
    """results.json, one CSV per regime and (with ``report``) the report; rank 0 only."""
    if is_main():
        atomic_write(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
        for regime in results["matrices"]:
            by_measure = {
                m: SimilarityMatrix.from_dict(r[regime]) for m, r in results["measures"].items()
            }
            write_matrix_csv(by_measure, out / f"{regime}.csv")
        if report:
            from invsim.report import write_report

            write_report(out, results=dict(results))
    barrier()


def confound_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The confound experiment of ``cfg.confound`` as a config of this pipeline: an
    only-A model (two seeds) and an only-B model, tested on ``both`` images; the two
    inverted rows are only_a and only_b."""
    c, seed = cfg.confound, cfg.seed
    assert c is not None

    def model(name: str, variant: str, s: int, invert: bool = True) -> dict[str, Any]:
        data = {"variant": variant, "seed": seed}
        train = {"epochs": c.epochs, "seed": s, "dataset": "confound", "data_options": data}
        return {"name": name, "spec": c.arch, "arch": c.arch, "invert": invert, "train": train}

    return validate(
        {
            "name": f"{cfg.name}-confound",
            "out": str(Path(cfg.out) / "confound"),
            "seed": seed,
            "device": cfg.device,
            "regimes": ["natural", "inverted"],
            "data": {
                "dataset": "confound",
                "options": {"variant": "both", "seed": seed},
                "natural_n": None,
                "pairs": c.pairs,
            },
            "models": [
                model("only_a", "only_a", seed),
                model("only_a_seed2", "only_a", seed + 1, invert=False),
                model("only_b", "only_b", seed),
            ],
            "inversion": {"iterations": c.iterations, "batch_size": 256},
        }
    )


def _confound(cfg: ExperimentConfig, quiet: bool) -> dict[str, Any]:
    log("confound experiment", quiet=quiet)
    r = run_experiment(confound_config(cfg), quiet=True, report=False)
    natural, inverted = (
        SimilarityMatrix.from_dict(r["matrices"][k]) for k in ("natural", "inverted")
    )
    return {
        "natural": r["matrices"]["natural"],
        "inverted": r["matrices"]["inverted"],
        "headline": confound_headline(natural, inverted),
        "inversion_loss": {k: v["median_loss"] for k, v in r["diagnostics"].items()},
        "settings": cfg.confound.model_dump() if cfg.confound else {},
    }


def run_experiment(
    cfg: ExperimentConfig | Mapping[str, Any], *, quiet: bool = False, report: bool = True
) -> dict[str, Any]:
    """Run a config (an :class:`~invsim.config.ExperimentConfig`, or a mapping that is
    validated into one) stage by stage and write every output in ``cfg.out``:
    results.json, natural.csv, inverted.csv (stir.csv), figures and report.html.
    Returns the results dictionary."""
    cfg = cfg if isinstance(cfg, ExperimentConfig) else validate(dict(cfg))
    t0 = time.perf_counter()
    init_from_env(cfg.device)  # under torchrun: join the group; else nothing
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    eval_ds = load_data(cfg)
    zoo = load_models(cfg, eval_ds, quiet=quiet)
    inverted = invert_models(cfg, zoo, eval_ds, quiet=quiet)
    cache = RepresentationCache(out / "cache")
    matrices = compute_matrices(cfg, zoo, eval_ds, inverted, cache=cache, quiet=quiet)
    results = summarise(zoo, matrices, inverted)
    if "inverted" in matrices:
        moved = drift(cfg, zoo, inverted, matrices["inverted"][cfg.measures[0]], cache=cache)
        if moved is not None:
            results["drift"] = moved
    results["statistics"] = claim_statistics(
        primary_of(matrices, "natural", cfg),
        primary_of(matrices, "inverted", cfg),
        zoo.eps,
        arch=zoo.arch,
        seed=cfg.seed,
    )
    results["warnings"] = warnings_of(results)
    for w in results["warnings"]:
        log(w["message"], quiet=quiet)
    if cfg.confound is not None:
        results["confound"] = _confound(cfg, quiet)
    results["provenance"] = provenance(cfg, cache, time.perf_counter() - t0)
    write_outputs(out, results, report=report)
    log(f"done in {time.perf_counter() - t0:.0f} s: {out / 'report.html'}", quiet=quiet)
    return results
