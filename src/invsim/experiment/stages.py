"""The run as declared stages over a typed run context.

Each stage is a small function of the :class:`Run` that returns its artefact; the run
keeps it under the stage's name, and later stages read earlier artefacts from it
(``run["models"]``). :data:`STAGES` lists them in order, in one place::

    data -> models -> inverted -> matrices -> results -> drift -> statistics
         -> warnings -> confound -> provenance -> outputs

:func:`run_experiment` walks that list. :func:`add_stage` inserts another (before
``outputs`` unless told otherwise); its artefact lands in ``results.json`` under the
stage's name and in the report, with no other change.

Trained models (``models/``), finished inversion shards (``inverted/``) and
representations (``cache/``) are kept on disk, so an interrupted run started again picks
up where it stopped and a finished run recomputes nothing. The confound experiment is a
config of this same pipeline (:func:`confound_config`), run into ``out/confound``.
Under torchrun rank 0 trains and writes; inversion and extraction are split by rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import invsim
from invsim.config import ExperimentConfig, InversionConfig, ModelConfig, validate
from invsim.data import load_dataset
from invsim.data.datasets import load_configured
from invsim.distributed import barrier, init_from_env, is_main
from invsim.experiment.matched import claims_at_matched_loss
from invsim.experiment.matrices import (
    RepresentationCache,
    inverted_similarity,
    natural_similarity,
    stir_similarity,
)
from invsim.experiment.summary import (
    CONFOUND_MEASURES,
    claim_statistics,
    confound_headline,
    confound_verdict,
    panel_summary,
    robustness_summary,
    summarize,
    warnings_of,
)
from invsim.inversion import inversion_record
from invsim.models import load_model
from invsim.report import write_outputs
from invsim.results import Results
from invsim.similarity import SimilarityMatrix, get_measure
from invsim.store import InvertedDataset, invert_dataset
from invsim.store.format import store_seconds
from invsim.train import train_model

__all__ = [
    "STAGES",
    "Run",
    "Stage",
    "Zoo",
    "add_stage",
    "confound_config",
    "layers_of",
    "load_data",
    "run_experiment",
]

Panels = dict[str, dict[str, SimilarityMatrix]]  # regime -> measure -> matrix


def log(msg: str, *, quiet: bool = False) -> None:
    if not quiet and is_main():
        print(f"[invsim] {msg}", file=sys.stderr, flush=True)


@dataclass
class Zoo:
    """The run's models with what the summaries need: robustness eps and architecture."""

    models: dict[str, nn.Module]
    eps: dict[str, float]
    arch: dict[str, str]


@dataclass
class Run:
    """A run in progress: its config, how it reports, and each finished stage's artefact
    (``run["matrices"]``). ``cache`` holds the representations on disk under
    ``out/cache``."""

    cfg: ExperimentConfig
    quiet: bool = False
    report: bool = True
    stages: list[Stage] = field(default_factory=list)
    artefacts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    # each finished stage's time in this run, and, for the stages that can reuse stored
    # work (trained models, inverted and STIR sets, the confound run), what it took to make
    stage_seconds: dict[str, float] = field(default_factory=dict)
    made_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = RepresentationCache(self.out / "cache")

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def __getitem__(self, stage: str) -> Any:
        if stage not in self.artefacts:
            raise KeyError(
                f"stage {stage!r} has not run yet; finished: {list(self.artefacts)}. A stage "
                "reads only the artefacts of stages listed before it in STAGES."
            )
        return self.artefacts[stage]

    def log(self, msg: str) -> None:
        log(msg, quiet=self.quiet)


@dataclass(frozen=True)
class Stage:
    """One step of the run: ``run(Run) -> artefact``. With ``in_results``, the artefact
    goes into ``results.json`` (and the report) under ``name``."""

    name: str
    run: Callable[[Run], Any]
    description: str = ""
    in_results: bool = False


def load_data(cfg: ExperimentConfig, split: str | None = None) -> Dataset:
    """The run's data set, the evaluation split unless ``split`` says otherwise."""
    return load_configured(cfg.data, split)


def layers_of(cfg: ExperimentConfig) -> dict[str, str]:
    """Each model's layer: its own ``layer`` when set, else the run's
    (``inversion.layer``). A row model is inverted at its layer, and every column is
    read at its own."""
    return {m.name: m.layer or cfg.inversion.layer for m in cfg.models}


def train_once(path: Path, train: Callable[[], None], *, device: str | None = None) -> nn.Module:
    """Train into ``path`` unless it exists, then load it. Under torchrun only rank 0
    trains; the others wait at a barrier and load its file."""
    if is_main() and not path.exists():
        train()
    barrier()
    model = load_model(str(path))
    return model.to(device) if device else model


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
        seeded = recipe.replace(
            rng_seed=cfg.rng_seed if recipe.rng_seed is None else recipe.rng_seed
        )
        _, metrics = train_model(
            m.spec,
            ds,
            seeded,
            test_dataset=eval_ds,
            out=path,
            device=cfg.device,
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


# --- the stages -------------------------------------------------------------------------


def data_stage(run: Run) -> Dataset:
    """The evaluation data set (seeds, targets and natural images come from it)."""
    run.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.cfg.rng_seed)
    return load_data(run.cfg)


def models_stage(run: Run) -> Zoo:
    zoo = load_models(run.cfg, run["data"], quiet=run.quiet)
    trained = (m.name for m in run.cfg.models if m.train is not None)
    meta = (getattr(zoo.models[n], "invsim_meta", {}).get("training") or {} for n in trained)
    # what training took, its accuracies included (older checkpoints: training alone)
    run.made_seconds["models"] = sum(
        t.get("train_seconds", 0.0) + t.get("eval_seconds", 0.0) for t in meta
    )
    return zoo


def _stored_seconds(stores: Mapping[str, InvertedDataset]) -> float:
    """What the stored inversions took to make (a store too old to say counts 0)."""
    return sum(inv.seconds or 0.0 for inv in stores.values())


def inverted_stage(run: Run) -> dict[str, InvertedDataset]:
    """Each row model's inverted data set, stored under ``out/inverted/<name>``, at the
    model's own layer."""
    cfg, zoo = run.cfg, run["models"]
    if "inverted" not in cfg.regimes:
        return {}
    inverted, layers = {}, layers_of(cfg)
    for m in (m for m in cfg.models if m.invert):
        run.log(
            f"inverting {cfg.data.pairs} pairs through {m.name} "
            f"({cfg.inversion.iterations} iterations)"
        )
        inv = invert_dataset(
            zoo.models[m.name],
            run["data"],
            cfg.data.pairs,
            run.out / "inverted" / m.name,
            inversion=cfg.inversion.settings().replace(layer=layers[m.name]),
            rng_seed=cfg.rng_seed,
            shard_size=cfg.inversion.shard_size,
            device=cfg.device,
        )
        assert inv is not None
        inverted[m.name] = inv
    run.made_seconds["inverted"] = _stored_seconds(inverted)
    return inverted


def matrices_stage(run: Run) -> Panels:
    """regime -> measure -> matrix, for the regimes and measures the config asks for."""
    cfg, zoo, data = run.cfg, run["models"], run["data"]
    kw = {
        "measures": cfg.measures,
        "layer": layers_of(cfg),
        "cache": run.cache,
        "device": cfg.device,
        "calibration": cfg.calibration,
    }
    out: Panels = {}
    if "natural" in cfg.regimes:
        run.log("natural similarity")
        out["natural"] = natural_similarity(
            zoo.models, data, n=cfg.data.natural_n, rng_seed=cfg.rng_seed, **kw
        )
    if run["inverted"]:
        run.log("inverted similarity")
        out["inverted"] = inverted_similarity(
            zoo.models, run["inverted"], n=None, rng_seed=cfg.rng_seed, **kw
        )
    if "stir" in cfg.regimes:
        run.log("STIR")
        st, settings = cfg.stir, cfg.inversion.settings()
        if st.iterations is not None:
            settings = settings.replace(iterations=st.iterations)
        stir_kw = {**kw, "measures": [m for m in cfg.measures if not get_measure(m).deconfounds]}
        out["stir"] = stir_similarity(
            zoo.models,
            data,
            run.out / "stir",
            n=st.n,
            rng_seed=cfg.rng_seed,
            seed_images=st.seed_images,
            inversion=settings,
            shard_size=cfg.inversion.shard_size,
            **stir_kw,
        )
        # what STIR's inversions took, from the stores' records (no shard read again)
        made = (store_seconds(run.out / "stir" / m) for m in zoo.models)
        run.made_seconds["matrices"] = sum(s or 0.0 for s in made)
    return out


def _primary(run: Run, regime: str) -> SimilarityMatrix | None:
    """The primary (first listed) measure's matrix of ``regime``, if it was computed."""
    found = run["matrices"].get(regime)
    return next(iter(found.values())) if found else None


def results_stage(run: Run) -> Results:
    """The typed results, assembled from the stages' artefacts (no stage writes into
    them): every matrix, the primary measure's summaries and robustness trend, the
    per-measure panel, each row's inversion diagnostics, the models, the layer view,
    drift, statistics, the confound experiment, provenance, the added stages'
    artefacts, and the warnings read from all of them (logged)."""
    zoo, panels, inverted = run["models"], run["matrices"], run["inverted"]
    r = Results(matrices={k: dict(v) for k, v in panels.items()})
    primary = {regime: r.matrix(regime) for regime in r.regimes}
    r.summary = {k: summarize(m) for k, m in primary.items()}
    r.panel = {m: panel_summary(panels, m, zoo.eps) for m in r.measures}
    r.diagnostics = {k: v.diagnostics_with(zoo.models[k]) for k, v in inverted.items()}
    if len(set(zoo.eps.values())) > 1:
        r.robustness = {k: robustness_summary(m, zoo.eps, zoo.arch) for k, m in primary.items()}
    r.models = _models(zoo)
    for key in ("layers", "drift", "statistics", "confound", "provenance"):
        if run.artefacts.get(key) is not None:
            setattr(r, key, run.artefacts[key])
    r.extra = {
        s.name: run.artefacts[s.name]
        for s in run.stages
        if s.in_results and run.artefacts.get(s.name) is not None
    }
    r.warnings = warnings_of(r)
    for w in r.warnings:
        run.log(w["message"])
    return r


def _models(zoo: Zoo) -> dict[str, Any]:
    """Each model's robustness, architecture, spec, checksum and training record."""
    return {
        n: {
            "eps": zoo.eps[n],
            "arch": zoo.arch[n],
            "spec": m.invsim_meta.get("spec"),
            "sha256": m.invsim_meta.get("sha256"),
            "training": m.invsim_meta.get("training"),
        }
        for n, m in zoo.models.items()
    }


def layers_stage(run: Run) -> dict[str, Any] | None:
    """The layer-by-layer view (config ``layers:``)."""
    if run.cfg.layers is None:
        return None
    from invsim.experiment.layers import run_layers

    run.log("layer-by-layer similarity")
    return run_layers(run.cfg, run["models"].models, run["data"], run["inverted"])


DRIFT_THRESHOLD = 0.02


def drift_stage(run: Run) -> dict[str, Any] | None:
    """The inverted matrix (primary measure) at half the inversion budget, from the
    stored half-budget images (no extra inversion): the cells that moved more than
    ``DRIFT_THRESHOLD`` in the second half have not settled."""
    halves = {k: v.at_half_budget() for k, v in run["inverted"].items()}
    full = _primary(run, "inverted")
    if full is None or not halves or any(h is None for h in halves.values()):
        return None
    cfg = run.cfg
    (half,) = inverted_similarity(
        run["models"].models,
        halves,
        n=None,
        measures=cfg.measures[0],
        layer=layers_of(cfg),
        cache=run.cache,
        device=cfg.device,
    ).values()
    change = np.abs(full.values - half.values)
    moved = [
        {
            "row": row,
            "column": c,
            "value": float(full.values[i, j]),
            "half_budget_value": float(half.values[i, j]),
            "change": float(change[i, j]),
        }
        for i, row in enumerate(full.rows)
        for j, c in enumerate(full.cols)
        if change[i, j] > DRIFT_THRESHOLD
    ]
    return {
        "half_iterations": cfg.inversion.iterations // 2,
        "threshold": DRIFT_THRESHOLD,
        "max_change": float(change.max()),
        "moved": moved,
    }


def statistics_stage(run: Run) -> dict[str, Any]:
    """The claims' statistics under every measure (measure -> claim -> value, interval,
    p-value): the asymmetry, natural minus inverted and the robustness trends."""
    zoo, panels = run["models"], run["matrices"]
    natural, inverted = panels.get("natural", {}), panels.get("inverted", {})
    return {
        m: claim_statistics(
            natural.get(m), inverted.get(m), zoo.eps, arch=zoo.arch, rng_seed=run.cfg.rng_seed
        )
        for m in dict.fromkeys([*natural, *inverted])
    }


def matched_stage(run: Run) -> dict[str, Any] | None:
    """The robustness claims at matched convergence (:mod:`invsim.experiment.matched`),
    when the inversion keeps a path (``inversion.snapshot_losses``)."""
    full, cfg = _primary(run, "inverted"), run.cfg
    if full is None or not cfg.inversion.snapshot_losses:
        return None
    zoo = run["models"]
    run.log("the claims at matched convergence")
    found = claims_at_matched_loss(
        zoo.models,
        run["inverted"],
        full,
        zoo.eps,
        zoo.arch,
        measure=cfg.measures[0],
        rng_seed=cfg.rng_seed,
        layer=layers_of(cfg),
        cache=run.cache,
        device=cfg.device,
    )
    for d in (found or {}).get("disagreements", []):
        run.log(d["message"])
    return found


def confound_stage(run: Run) -> dict[str, Any] | None:
    """The confound experiment (only-A, only-B models), when the config asks for it."""
    cfg = run.cfg
    if cfg.confound is None:
        return None
    run.log("confound experiment")
    c = run_experiment(confound_config(cfg), quiet=True, report=False)
    run.made_seconds["confound"] = c.provenance.get("from_scratch_seconds", 0.0)
    labelled = c.to_dict()["matrices"]
    headline = confound_headline(c.matrices)
    return {
        "natural": labelled["natural"],
        "inverted": labelled["inverted"],
        "headline": headline,
        "removes_confound": confound_verdict(headline),
        "inversion_loss": {k: v["median_loss"] for k, v in c.diagnostics.items()},
        "settings": cfg.confound.model_dump(),
    }


def _result_settings(cfg: InversionConfig) -> dict[str, Any]:
    """The inversion settings that change its results: the record, with the rule named,
    less the batch size and the layouts."""
    record = {"rule": cfg.steps.rule} | inversion_record(cfg)
    return {k: v for k, v in record.items() if k not in ("batch_size", "channels_last", "fold_bn")}


def provenance_stage(run: Run) -> dict[str, Any]:
    """Versions, the whole config and its hash, and where the run left the paper."""
    cfg = run.cfg
    paper, used = _result_settings(InversionConfig()), _result_settings(cfg.inversion)
    # the rule, and the settings both records hold that differ (a rule's own settings are
    # in the config)
    reduced = {
        k: {"used": used[k], "paper": paper[k]}
        for k in paper.keys() & used.keys()
        if used[k] != paper[k]
    }
    reduced = dict(sorted(reduced.items(), key=lambda kv: (kv[0] != "rule", kv[0])))
    config = cfg.model_dump(mode="json")
    return {
        "invsim": invsim.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "config": config,
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        "deviations_from_paper": reduced,
        "pairs": cfg.data.pairs,
        "cache": dict(run.cache.stats),
        **run_seconds(run),
    }


def run_seconds(run: Run) -> dict[str, Any]:
    """``seconds``: this run so far. ``stage_seconds``: each finished stage's.
    ``from_scratch_seconds``: an estimate of the run with nothing stored to reuse: for
    each stage that reuses stored work, the larger of its time here and what that work
    took when it was made (training, the inversions and STIR's, the confound run); a
    resumed run's
    ``seconds`` alone would say only what the resume cost."""
    seconds = time.perf_counter() - run.started
    extra = sum(
        max(0.0, made - run.stage_seconds.get(stage, 0.0))
        for stage, made in run.made_seconds.items()
    )
    return {
        "seconds": seconds,
        "stage_seconds": {k: round(v, 3) for k, v in run.stage_seconds.items()},
        "from_scratch_seconds": seconds + extra,
    }


def outputs_stage(run: Run) -> Path:
    """results.json, the CSVs and (unless ``report=False``) the report."""
    write_outputs(run.out, run["results"], report=run.report)
    return run.out / "results.json"


STAGES: list[Stage] = [
    Stage("data", data_stage, "the evaluation data set"),
    Stage("models", models_stage, "each model, loaded or trained once"),
    Stage("inverted", inverted_stage, "each row model's inverted data set"),
    Stage("matrices", matrices_stage, "every regime's matrices, every measure"),
    Stage("layers", layers_stage, "layer-by-layer matrices, natural and inverted"),
    Stage("drift", drift_stage, "entries that moved in the second half of the budget"),
    Stage("statistics", statistics_stage, "the claims' statistics"),
    Stage("matched", matched_stage, "the claims at matched convergence", in_results=True),
    Stage("confound", confound_stage, "the confound experiment"),
    Stage("provenance", provenance_stage, "versions, config and its hash"),
    Stage("results", results_stage, "the typed results, their summaries and warnings"),
    Stage("outputs", outputs_stage, "results.json, CSVs, report"),
]


def add_stage(stage: Stage, *, before: str = "results") -> Stage:
    """Insert ``stage`` into :data:`STAGES` before the stage named ``before`` (by default
    before the results are assembled, so that an ``in_results`` artefact reaches them);
    remove it with ``STAGES.remove(stage)``."""
    names = [s.name for s in STAGES]
    if stage.name in names:
        raise ValueError(f"a stage named {stage.name!r} is already in STAGES: {names}.")
    if before not in names:
        raise ValueError(f"no stage named {before!r} to insert before; stages: {names}.")
    STAGES.insert(names.index(before), stage)
    return stage


def confound_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The confound experiment of ``cfg.confound`` as a config of this pipeline: an
    only-A model (two seeds) and an only-B model, tested on ``both`` images; the two
    inverted rows are only_a and only_b."""
    c, rng_seed = cfg.confound, cfg.rng_seed
    assert c is not None

    def model(name: str, variant: str, s: int, invert: bool = True) -> dict[str, Any]:
        data = {"variant": variant, "rng_seed": rng_seed}
        train = {"epochs": c.epochs, "rng_seed": s, "dataset": "confound", "data_options": data}
        return {"name": name, "spec": c.arch, "arch": c.arch, "invert": invert, "train": train}

    return validate(
        {
            "name": f"{cfg.name}-confound",
            "out": str(Path(cfg.out) / "confound"),
            "rng_seed": rng_seed,
            "device": cfg.device,
            "regimes": ["natural", "inverted"],
            "measures": list(CONFOUND_MEASURES),
            "data": {
                "dataset": "confound",
                "options": {"variant": "both", "rng_seed": rng_seed},
                "natural_n": None,
                "pairs": c.pairs,
            },
            "models": [
                model("only_a", "only_a", rng_seed),
                model("only_a_seed2", "only_a", rng_seed + 1, invert=False),
                model("only_b", "only_b", rng_seed),
            ],
            "inversion": {"iterations": c.iterations, "batch_size": 256},
        }
    )


def run_experiment(
    cfg: ExperimentConfig | Mapping[str, Any],
    *,
    quiet: bool = False,
    report: bool = True,
    stages: Sequence[Stage] | None = None,
) -> Results:
    """Run a config (an :class:`~invsim.config.ExperimentConfig`, or a mapping that is
    validated into one) stage by stage (:data:`STAGES`, or ``stages``) and write every
    output in ``cfg.out``: results.json, natural.csv, inverted.csv (stir.csv), figures
    and report.html. Returns the :class:`~invsim.results.Results`."""
    cfg = cfg if isinstance(cfg, ExperimentConfig) else validate(dict(cfg))
    init_from_env(cfg.device)  # under torchrun: join the group; else nothing
    run = Run(cfg, quiet=quiet, report=report, stages=list(STAGES if stages is None else stages))
    for stage in run.stages:
        t0 = time.perf_counter()
        run.artefacts[stage.name] = stage.run(run)
        run.stage_seconds[stage.name] = time.perf_counter() - t0
    run.log(f"done in {time.perf_counter() - run.started:.0f} s: {run.out / 'report.html'}")
    return run["results"]
