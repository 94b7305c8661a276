"""The ``invsim`` command line: a thin shell over the Python API.

Every command exits 0 on success and non-zero on failure (2 for bad input, with the
reason on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from invsim import __version__


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _guard(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from invsim.config import ConfigError
        from invsim.models import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, ConfigError, CheckpointError, ImportError) as e:
            _fail(e)

    return wrapper


device_opt = click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
seed_opt = click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")


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
def demo(quick: bool, out: str | None, device: str | None, seed: int) -> None:
    """Train a small zoo on MNIST-5k (standard and robust), invert, run the confound
    experiment and write the report. Resumes when run again."""
    from invsim.demo import headline, run_demo

    out = out or ("runs/demo-quick" if quick else "runs/demo")
    results = run_demo(out, quick=quick, seed=seed, device=device)
    click.echo(headline(results))
    click.echo(f"report: {Path(out) / 'report.html'}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Override the config's output directory.")
@device_opt
@click.option("--seed", default=None, type=int, help="Override the config's seed.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@_guard
def run(config: str, out: str | None, device: str | None, seed: int | None, quiet: bool) -> None:
    """Run the experiment described by the YAML file CONFIG (see examples/).
    An interrupted run started again resumes."""
    from invsim.config import load_config
    from invsim.demo import headline
    from invsim.pipeline import run_experiment

    cfg = load_config(config, out=out, device=device, seed=seed)
    results = run_experiment(cfg, quiet=quiet)
    click.echo(headline(results))
    click.echo(f"report: {Path(cfg['out']) / 'report.html'}")


@main.command()
@click.argument("spec")
@click.option("--data", default="mnist5k", show_default=True, help="Training data set.")
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option(
    "--eps",
    default=0.0,
    show_default=True,
    type=float,
    help="Adversarial training eps (0: standard training).",
)
@click.option("--norm", default="l2", show_default=True, type=click.Choice(["l2", "linf"]))
@click.option("--steps", default=7, show_default=True, type=int, help="PGD steps in training.")
@click.option("--width", default=None, type=int, help="Width of a built-in architecture.")
@click.option("--out", required=True, help="Checkpoint path (.safetensors).")
@device_opt
@seed_opt
@_guard
def train(spec, data, epochs, eps, norm, steps, width, out, device, seed) -> None:
    """Train SPEC (a built-in name, tv:NAME or timm:NAME) and save it with its metadata."""
    from invsim.data import load_dataset
    from invsim.train import train_model

    adv = {"norm": norm, "eps": eps, "steps": steps} if eps > 0 else None
    kw = {"width": width} if width else {}
    _, metrics = train_model(
        spec,
        load_dataset(data, split="train"),
        epochs=epochs,
        adversarial=adv,
        seed=seed,
        device=device,
        test_dataset=load_dataset(data, split="test"),
        out=out,
        **kw,
    )
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@click.argument("model", required=False)
@click.option("--checkpoint", default=None, help="Weights for MODEL when it is a spec.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled checkpoints (unsafe).")
@click.option("--num-classes", default=None, type=int, help="Classes of MODEL (spec + checkpoint).")
@click.option("--data", default="mnist5k", show_default=True, help="Data set name or path.")
@click.option("--split", default="test", show_default=True)
@click.option("--size", default=None, type=int, help="Resize images (image folders, digits).")
@click.option("--crop", default=None, type=int, help="Center-crop images (image folders).")
@click.option("--pairs", default=1000, show_default=True, type=int)
@click.option("--out", required=True, help="Directory of the inverted data set.")
@click.option("--iterations", default=2000, show_default=True, type=int)
@click.option("--step-size", default=1 / 8, show_default=True, type=float)
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--eps", default=1000.0, show_default=True, type=float, help="L2 ball radius.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--shard-size", default=256, show_default=True, type=int)
@click.option("--tol", default=None, type=float, help="Early stopping (off: paper).")
@click.option("--layer", default="penultimate", show_default=True)
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
    iterations,
    step_size,
    momentum,
    eps,
    batch_size,
    shard_size,
    tol,
    layer,
    noise_seeds,
    num_shards,
    shard_index,
    merge_only,
    device,
    seed,
) -> None:
    """Invert PAIRS seed/target pairs of DATA through MODEL (a saved invsim model, or a
    spec with --checkpoint) into OUT. Resumes; refuses a different configuration.
    Under torchrun the shards are split across processes automatically."""
    from invsim.store import merge_manifest

    if merge_only:
        ds = merge_manifest(out)
        if ds is None:
            _fail(ValueError(f"{out}: some shards are still missing; cannot merge yet."))
        click.echo(repr(ds))
        return
    if model is None:
        _fail(ValueError("MODEL is required unless --merge is given."))
    from invsim.data import load_dataset
    from invsim.distributed import invert_distributed
    from invsim.models import load_model

    if checkpoint:
        net = load_model(
            model, checkpoint=checkpoint, trust_checkpoint=trust_checkpoint, num_classes=num_classes
        )
    else:
        net = load_model(model, num_classes=num_classes)
    kwargs = dict(
        seed=seed,
        shard_size=shard_size,
        iterations=iterations,
        step_size=step_size,
        momentum=momentum,
        eps=eps,
        batch_size=batch_size,
        layer=layer,
        device=device,
    )
    if tol is not None:
        kwargs["tol"] = tol
    if noise_seeds:
        kwargs["seed_images"] = "noise"
    part = None
    if num_shards is not None or shard_index is not None:
        if num_shards is None or shard_index is None:
            _fail(ValueError("--num-shards and --shard-index go together."))
        part = (shard_index, num_shards)
    dataset = load_dataset(data, split=split, size=size, crop=crop)
    ds = invert_distributed(net, dataset, pairs, out, part=part, **kwargs)
    if ds is not None:
        click.echo(repr(ds))
    else:
        click.echo(f"slice done; run `invsim invert --merge --out {out}` when all are done.")


@main.command()
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    required=True,
    help="NAME=PATH of a saved model (repeat).",
)
@click.option("--data", default="mnist5k", show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--n", default=1000, show_default=True, type=int, help="Natural images.")
@click.option(
    "--inverted",
    "inverted_specs",
    multiple=True,
    help="NAME=DIR of a model's inverted data set (repeat).",
)
@click.option("--debiased", is_flag=True, help="Debiased (unbiased HSIC) CKA.")
@click.option("--out", required=True, help="Output directory.")
@device_opt
@_guard
def similarity(model_specs, data, split, n, inverted_specs, debiased, out, device) -> None:
    """Natural (and, with --inverted, inverted) CKA matrices between saved models."""
    from invsim.data import load_dataset
    from invsim.experiment import (
        RepresentationCache,
        inverted_similarity,
        natural_similarity,
        summarize,
    )
    from invsim.models import load_model
    from invsim.pipeline import write_matrix_csv
    from invsim.store import InvertedDataset

    def pairs(specs):
        out = {}
        for s in specs:
            if "=" not in s:
                raise ValueError(f"expected NAME=PATH; got {s!r}.")
            k, v = s.split("=", 1)
            out[k] = v
        return out

    models = {k: load_model(v) for k, v in pairs(model_specs).items()}
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    cache = RepresentationCache(outdir / "cache")
    matrices = {
        "natural": natural_similarity(
            models, load_dataset(data, split=split), n=n, debiased=debiased, cache=cache,
            device=device,
        )
    }  # fmt: skip
    if inverted_specs:
        inv = {k: InvertedDataset(v) for k, v in pairs(inverted_specs).items()}
        matrices["inverted"] = inverted_similarity(
            models, inv, debiased=debiased, cache=cache, device=device
        )
    res = {}
    for key, mat in matrices.items():
        write_matrix_csv(mat, outdir / f"{key}.csv")
        res[key] = {"matrix": mat.to_dict(), "summary": summarize(mat)}
        click.echo(f"{key}:\n{mat!r}")
    (outdir / "similarity.json").write_text(json.dumps(res, indent=2) + "\n")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@_guard
def report(directory: str) -> None:
    """Rebuild figures and report.html of a finished run in DIRECTORY."""
    from invsim.report import write_report

    click.echo(str(write_report(directory)))


@main.command()
def models() -> None:
    """List the model specs load_model understands."""
    from invsim.models import list_models

    found = list_models()
    click.echo("built-in: " + ", ".join(found["builtin"]))
    click.echo(f"torchvision ({len(found['torchvision'])}): " + ", ".join(found["torchvision"]))
    if found["timm"]:
        click.echo(f"timm: {len(found['timm'])} models (timm:NAME)")
    else:
        click.echo("timm: not installed (pip install 'invsim[timm]')")


if __name__ == "__main__":
    main()
