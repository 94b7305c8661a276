"""The ``invsim`` command line: a thin shell over the Python API.

Every command exits 0 on success and non-zero on failure (2 for bad input, with the
reason on stderr). Options that several commands share (``--data``, ``--split``,
``--size``, ``--crop``, ``--device``, ``--rng-seed``) share their names, defaults and help;
the inversion options are generated from :class:`invsim.config.InversionConfig` and the
training options from :class:`invsim.config.TrainConfig`, so their defaults cannot
drift. Only ``click`` and the torch-free config are imported until a command runs, so
``invsim --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from invsim import __version__
from invsim.config import (
    AdversarialConfig,
    DataConfig,
    InversionConfig,
    InversionSection,
    TrainConfig,
)


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _guard(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, ImportError) as e:  # ConfigError, CheckpointError
            _fail(e)

    return wrapper


def _options(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def _field_options(
    model: type, names: list[str], prefix: str = "", flags: dict[str, str] | None = None
) -> Callable:
    """click options for the fields ``names`` of a settings class: same defaults, help.
    ``flags`` renames a field's option (``{"dataset": "data"}``: ``--data``); the
    parameter keeps the option's name."""
    decorators = []
    for name in names:
        field = model.model_fields[name]
        opt = (flags or {}).get(name, name)
        flag = "--" + prefix + opt.replace("_", "-")
        dest = prefix.replace("-", "_") + opt
        if field.annotation is bool:
            decorators.append(
                click.option(
                    f"{flag}/--no-{prefix}{name.replace('_', '-')}",
                    dest,
                    default=field.default,
                    show_default=True,
                    help=field.description,
                )
            )
            continue
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            kind = click.Choice(args)
        else:
            kind = next(t for t in (bool, int, float, str) if t in (field.annotation, *args))
        default = CLI_DEFAULTS.get(
            (model.__name__, name), None if field.is_required() else field.default
        )
        decorators.append(
            click.option(
                flag,
                dest,
                default=default,
                type=kind,
                show_default=default is not None,
                help=field.description,
            )
        )
    return _options(*decorators)


# where a command-line default differs from the config group's: the data set a bare
# command reads, and standard training unless --eps is given
CLI_DEFAULTS = {("DataConfig", "dataset"): "mnist5k", ("AdversarialConfig", "eps"): 0.0}


INVERSION_FIELDS = [
    f for f in InversionConfig.model_fields if f not in ("steps", "snapshot_losses")
]
# the step rule and its settings: by name, so that a registered rule needs no new option
rule_opts = _options(
    click.option(
        "--schedule",
        default=None,
        help="A named schedule: paper (the default: the paper's 2,000 momentum steps) or "
        "converge (per-example L-BFGS steps that stop when done).",
    ),
    click.option("--rule", default=None, help="A step rule by name (invsim.inversion.RULES)."),
    click.option(
        "--snapshot-loss",
        "snapshot_losses",
        multiple=True,
        type=float,
        help="Keep each example's first iterate at or below this loss (repeat): the "
        "inversion path.",
    ),
    click.option(
        "--rule-setting",
        "step_settings",
        multiple=True,
        metavar="NAME=VALUE",
        help="A setting of the chosen rule, e.g. --rule-setting memory=5 (repeat).",
    ),
)


def _step_settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--rule-setting NAME=VALUE`` pairs as settings (each value read as a YAML scalar)."""
    import yaml

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--rule-setting takes NAME=VALUE (e.g. memory=5); got {pair!r}.")
        out[name.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


select_opt = click.option(
    "--select",
    "selection",
    multiple=True,
    default=["blocks"],
    show_default=True,
    help="Module names, patterns (layer*, blocks.*), penultimate, logits or blocks (repeat).",
)
device_opt = click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
seed_opt = click.option("--rng-seed", default=0, show_default=True, type=int, help="Random seed.")
data_opts = _field_options(
    DataConfig,
    ["dataset", "eval_split", "size", "crop"],
    flags={"dataset": "data", "eval_split": "split"},
)
pairs_opt = _field_options(DataConfig, ["pairs"])
shard_opt = _field_options(InversionSection, ["shard_size"])
adversarial_opts = _field_options(AdversarialConfig, ["eps", "norm", "steps"])
TRAIN_FIELDS = ["epochs", "lr", "batch_size", "width", "weight_decay", "eval_n", "eval_steps"]


def _load_data(data: str, split: str, size: int | None, crop: int | None) -> Any:
    from invsim.data import load_dataset

    return load_dataset(data, split=split, size=size, crop=crop)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invsim")
def main() -> None:
    """invsim: how similar neural networks really are (CKA on inverted data)."""


@main.command()
@click.option("--quick", is_flag=True, help="The same pipeline, smaller (under 2 minutes).")
@click.option("--out", default=None, help="Output directory [runs/demo or runs/demo-quick].")
@device_opt
@seed_opt
@_guard
def demo(quick: bool, out: str | None, device: str | None, rng_seed: int) -> None:
    """Train a small zoo on MNIST-5k (standard and robust), invert, run the confound
    experiment and write the report. Resumes when run again."""
    from invsim.demo import run_demo
    from invsim.experiment import headline

    out = out or ("runs/demo-quick" if quick else "runs/demo")
    results = run_demo(out, quick=quick, rng_seed=rng_seed, device=device)
    click.echo(headline(results))
    click.echo(f"report: {Path(out) / 'report.html'}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Override the config's output directory.")
@device_opt
@click.option("--rng-seed", default=None, type=int, help="Override the config's seed.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@_guard
def run(
    config: str, out: str | None, device: str | None, rng_seed: int | None, quiet: bool
) -> None:
    """Run the experiment described by the YAML file CONFIG (see examples/).
    An interrupted run started again resumes."""
    from invsim.config import load_config
    from invsim.experiment import headline, run_experiment

    cfg = load_config(config, out=out, device=device, rng_seed=rng_seed)
    results = run_experiment(cfg, quiet=quiet)
    click.echo(headline(results))
    click.echo(f"report: {Path(cfg.out) / 'report.html'}")


@main.command()
def schema() -> None:
    """Print the JSON schema of experiment YAML files (for editors)."""
    from invsim.config import ExperimentConfig

    click.echo(json.dumps(ExperimentConfig.model_json_schema(), indent=2))


@main.command()
@click.argument("spec")
@data_opts
@_field_options(TrainConfig, TRAIN_FIELDS)
@adversarial_opts
@click.option("--out", required=True, help="Checkpoint path (.safetensors).")
@device_opt
@seed_opt
@_guard
def train(spec, data, split, size, crop, eps, norm, steps, out, device, rng_seed, **recipe) -> None:
    """Train SPEC (a built-in name, tv:NAME or timm:NAME) on the train split of DATA and
    save it with its metadata. ``--split`` names the evaluation split."""
    from invsim.train import train_model

    adv = AdversarialConfig(norm=norm, eps=eps, steps=steps) if eps > 0 else None
    settings = TrainConfig.checked(
        {**recipe, "adversarial": adv, "rng_seed": rng_seed}, where="train"
    )
    _, metrics = train_model(
        spec,
        _load_data(data, "train", size, crop),
        settings,
        device=device,
        out=out,
        test_dataset=_load_data(data, split, size, crop),
    )
    click.echo(json.dumps(metrics, indent=2))


def _load_cli_model(model: str, checkpoint: str | None, trust: bool, num_classes: int | None):
    from invsim.models import load_model

    if checkpoint:
        return load_model(
            model, checkpoint=checkpoint, trust_checkpoint=trust, num_classes=num_classes
        )
    return load_model(model, num_classes=num_classes)


@main.command()
@click.argument("model", required=False)
@click.option("--checkpoint", default=None, help="Weights for MODEL when it is a spec.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled checkpoints (unsafe).")
@click.option("--num-classes", default=None, type=int, help="Classes of MODEL (spec + checkpoint).")
@data_opts
@pairs_opt
@click.option("--out", required=True, help="Directory of the inverted data set.")
@_field_options(InversionConfig, INVERSION_FIELDS)
@rule_opts
@shard_opt
@click.option("--noise-seeds", is_flag=True, help="Start from noise (STIR).")
@click.option("--num-shards", default=None, type=int, help="Split the work into K slices.")
@click.option("--shard-index", default=None, type=int, help="Which slice this job runs.")
@click.option("--merge", "merge_only", is_flag=True, help="Only assemble finished slices.")
@device_opt
@seed_opt
@_guard
def invert(
    model,
    checkpoint,
    trust_checkpoint,
    num_classes,
    data,
    split,
    size,
    crop,
    pairs,
    out,
    shard_size,
    noise_seeds,
    num_shards,
    shard_index,
    merge_only,
    device,
    rng_seed,
    **settings,
) -> None:
    """Invert PAIRS seed/target pairs of DATA through MODEL (a saved invsim model, or a
    spec with --checkpoint) into OUT. Resumes; refuses a different configuration.
    Under torchrun the shards are split across processes automatically."""
    from invsim.store import invert_dataset

    if merge_only:
        return _merge(out)
    part = _part(model, num_shards, shard_index)
    named = {k: settings.pop(k) for k in ("schedule", "rule") if settings.get(k) is not None}
    named["snapshot_losses"] = list(settings.pop("snapshot_losses") or ())
    steps = _step_settings(settings.pop("step_settings") or ())
    settings.pop("schedule", None), settings.pop("rule", None)
    inversion = InversionConfig.checked(settings | named | steps, where="invert")
    net = _load_cli_model(model, checkpoint, trust_checkpoint, num_classes)
    ds = invert_dataset(
        net,
        _load_data(data, split, size, crop),
        pairs,
        out,
        inversion=inversion,
        rng_seed=rng_seed,
        shard_size=shard_size,
        seed_images="noise" if noise_seeds else "data",
        part=part,
        device=device,
    )
    if ds is None:
        click.echo(f"slice done; run `invsim invert --merge --out {out}` when all are done.")
        return
    from invsim.store.diagnostics import diagnostics_line

    click.echo(repr(ds))
    click.echo(diagnostics_line(Path(out).name, ds.diagnostics))  # kept in its dataset.json


def _merge(out: str) -> None:
    """``invert --merge``: assemble the finished slices of a job array."""
    from invsim.store import merge_manifest

    ds = merge_manifest(out)
    if ds is None:
        _fail(ValueError(f"{out}: some shards are still missing; cannot merge yet."))
    click.echo(repr(ds))


def _part(model: str | None, num_shards: int | None, shard_index: int | None):
    """The (index, count) slice a job-array task runs, checked; None for the whole set."""
    if model is None:
        _fail(ValueError("MODEL is required unless --merge is given."))
    if (num_shards is None) != (shard_index is None):
        _fail(ValueError("--num-shards and --shard-index go together."))
    return None if num_shards is None else (shard_index, num_shards)


def _name_value(specs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for s in specs:
        if "=" not in s:
            raise ValueError(f"expected NAME=PATH; got {s!r}.")
        k, v = s.split("=", 1)
        out[k] = v
    return out


@main.command()
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    required=True,
    help="NAME=PATH of a saved model (repeat).",
)
@data_opts
@_field_options(DataConfig, ["natural_n"], flags={"natural_n": "n"})
@click.option(
    "--inverted",
    "inverted_specs",
    multiple=True,
    help="NAME=DIR of a model's inverted data set (repeat).",
)
@click.option(
    "--measure",
    "measures",
    multiple=True,
    default=["linear_cka"],
    show_default=True,
    help="A similarity measure (repeat); see invsim.similarity.MEASURES.",
)
@click.option("--out", required=True, help="Output directory.")
@device_opt
@_guard
def similarity(
    model_specs, data, split, size, crop, n, inverted_specs, measures, out, device
) -> None:
    """Natural (and, with --inverted, inverted) similarity matrices between saved models,
    one per --measure (linear_cka, debiased_cka, procrustes, mean_cca, svcca, pwcca,
    linreg_r2, mutual_knn, knn_jaccard, rsa, rbf_cka, agreement, cohens_kappa,
    js_divergence)."""
    from invsim.experiment import (
        RepresentationCache,
        inverted_similarity,
        natural_similarity,
        summarize,
    )
    from invsim.models import load_model
    from invsim.report import write_outputs
    from invsim.results import Results
    from invsim.store import InvertedDataset

    models = {k: load_model(v) for k, v in _name_value(model_specs).items()}
    outdir = Path(out)
    kw = {
        "measures": list(measures),
        "cache": RepresentationCache(outdir / "cache"),
        "device": device,
    }
    dataset = _load_data(data, split, size, crop)
    matrices = {"natural": natural_similarity(models, dataset, n=n, **kw)}
    if inverted_specs:
        inv = {k: InvertedDataset(v) for k, v in _name_value(inverted_specs).items()}
        matrices["inverted"] = inverted_similarity(models, inv, **kw)
    results = Results(matrices=matrices)
    results.summary = {regime: summarize(results.matrix(regime)) for regime in matrices}
    write_outputs(outdir, results, report=False)  # results.json and one CSV per regime
    for regime, by in results.matrices.items():
        for m, mat in by.items():
            click.echo(f"{regime} ({m}):\n{mat!r}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@_guard
def report(directory: str) -> None:
    """Rebuild figures and report.html of a finished run in DIRECTORY."""
    from invsim.report import write_report

    click.echo(str(write_report(directory)))


@main.command()
@click.argument("model")
@select_opt
@_guard
def layers(model: str, selection: tuple[str, ...]) -> None:
    """List the layers of MODEL (a spec or a saved model) that --select names, without
    running the model."""
    from invsim.models import load_model
    from invsim.representation import select_layers

    net = load_model(model)
    modules = dict(net.named_modules())
    for name in select_layers(net, list(selection)):
        kind = type(modules[name]).__name__ if name in modules else "(read by a probe)"
        click.echo(f"{name}\t{kind}")


@main.command("layer-similarity")
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    required=True,
    help="NAME=SPEC of a model: a saved model or a spec (repeat).",
)
@data_opts
@click.option(
    "--natural-n",
    "--n",
    "n",
    default=512,
    show_default=True,
    type=int,
    help="Natural images (--natural-n under torchrun, which claims --n).",
)
@select_opt
@click.option(
    "--select-for",
    "select_for",
    multiple=True,
    help="NAME=SELECTION for one model (comma-separated), e.g. a=layer*,fc.",
)
@click.option(
    "--inverted",
    "inverted_specs",
    multiple=True,
    help="NAME=DIR of a model's inverted data set (repeat): also on it.",
)
@click.option(
    "--measure",
    "measures",
    multiple=True,
    default=["linear_cka"],
    show_default=True,
    type=click.Choice(["linear_cka", "debiased_cka"]),
)
@click.option("--memory-gb", default=4.0, show_default=True, help="Peak memory budget (GB).")
@click.option("--block", default=None, type=int, help="Examples held per pass (default: fit).")
@click.option("--batch-size", default=128, show_default=True, help="Images per forward.")
@click.option(
    "--estimator", default="exact", show_default=True, type=click.Choice(["exact", "minibatch"])
)
@click.option("--out", required=True, help="Output directory (layers.json, CSVs).")
@device_opt
@_guard
def layer_similarity_cmd(
    model_specs,
    data,
    split,
    size,
    crop,
    n,
    selection,
    select_for,
    inverted_specs,
    measures,
    memory_gb,
    block,
    batch_size,
    estimator,
    out,
    device,
) -> None:
    """Layer-by-layer similarity of every model with every other: one L_a x L_b matrix
    per pair, exact linear CKA within a memory budget, on natural images (and with
    --inverted on each model's inverted set). Under torchrun the passes are split
    across processes; the numbers equal one process's."""
    from invsim.distributed import init_from_env, is_main
    from invsim.experiment.layers import layer_similarity
    from invsim.models import load_model
    from invsim.report import write_outputs
    from invsim.results import Results
    from invsim.store import InvertedDataset

    init_from_env(device)
    models = {k: load_model(v) for k, v in _name_value(model_specs).items()}
    layers: dict[str, Any] = {k: list(selection) for k in models}
    layers.update({k: v.split(",") for k, v in _name_value(select_for).items()})
    kw = {
        "layers": layers,
        "measures": list(measures),
        "memory_gb": memory_gb,
        "block": block,
        "batch_size": batch_size,
        "estimator": estimator,
        "device": device,
    }
    dataset = _load_data(data, split, size, crop)
    natural = layer_similarity(models, dataset, n=min(n, len(dataset)), **kw)
    inverted = {}
    for k, d in _name_value(inverted_specs).items():
        inverted[k] = layer_similarity(models, InvertedDataset(d), **kw)
        inverted[k].row = k
    # results.json (its "layers") and layers-natural.csv, layers-inverted-ROW.csv
    write_outputs(out, Results(layers={"natural": natural, "inverted": inverted}), report=False)
    if not is_main():
        return
    for key, res in {
        "natural": natural,
        **{f"inverted-{k}": v for k, v in inverted.items()},
    }.items():
        s = res.schedule
        click.echo(
            f"{key}: {sum(len(v) for v in res.layers.values())} layers, n={res.n}, "
            f"{s['passes']} pass(es), ~{s['bytes'] / 1e9:.2f} GB held"
        )


@main.command()
def models() -> None:
    """List the model sources load_model understands, and each one's names."""
    from invsim.catalog import MODEL_SOURCES, list_models

    found = list_models()
    for name, source in MODEL_SOURCES.items():
        names = found.get(name, [])
        if name == "timm" and not names:
            click.echo("timm: not installed (pip install 'invsim[timm]')")
            continue
        listed = f" ({len(names)}): " + ", ".join(names) if names else ""
        click.echo(f"{source.describe()}{listed}")


if __name__ == "__main__":
    main()
