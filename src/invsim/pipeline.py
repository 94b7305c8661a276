"""The whole experiment from a validated config: train or load models, invert, compute
the natural / inverted / STIR matrices, summarise, write results and the report.

Every stage resumes: trained models, finished inversion shards and cached
representations under ``out`` are reused, so an interrupted run started again picks up
where it stopped and a finished run recomputes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import invsim
from invsim.data import load_dataset
from invsim.data.confound import make_confound
from invsim.distributed import barrier, init_from_env, invert_distributed, is_main
from invsim.experiment import (
    RepresentationCache,
    inverted_similarity,
    natural_similarity,
    robustness_summary,
    stir,
    summarize,
)
from invsim.inversion import PAPER_DEFAULTS
from invsim.models import load_model
from invsim.representation import eval_mode, logits
from invsim.similarity import SimilarityMatrix
from invsim.store import InvertedDataset
from invsim.train import train_model

__all__ = ["confound_experiment", "run_experiment", "write_matrix_csv"]


def log(msg: str, *, quiet: bool = False) -> None:
    if not quiet and is_main():
        print(f"[invsim] {msg}", file=sys.stderr, flush=True)


def write_matrix_csv(matrix: SimilarityMatrix, path: Path) -> None:
    """Long format: row, column, value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "column", "value"])
        for r, c, v in matrix.long():
            w.writerow([r, c, f"{v:.10g}"])


def train_once(path: Path, train: Any, *, device: str | None = None) -> Any:
    """Train into ``path`` unless it exists, then load it. Under torchrun only rank 0
    trains; the others wait at a barrier and load its file."""
    if is_main() and not path.exists():
        train()
    barrier()
    model = load_model(str(path))
    return model.to(device) if device else model


def _models(cfg: dict, train_ds, eval_ds, out: Path, quiet: bool):
    models, eps, arch = {}, {}, {}
    for m in cfg["models"]:
        name = m["name"]
        kw = {
            k: m[k] for k in ("num_classes", "in_channels", "image_size", "mean", "std") if k in m
        }
        if m.get("checkpoint"):
            model = load_model(
                m["spec"],
                checkpoint=m["checkpoint"],
                trust_checkpoint=m.get("trust_checkpoint", False),
                **kw,
            )
        else:
            path = out / "models" / f"{name}.safetensors"

            def train(m=m, name=name, path=path, kw=kw):
                recipe = dict(m["train"])
                ds = train_ds
                if "dataset" in recipe or "data_options" in recipe:
                    ds = load_dataset(
                        recipe.pop("dataset", cfg["data"]["dataset"]),
                        split=cfg["data"]["train_split"],
                        **recipe.pop("data_options", {}),
                    )
                log(f"model {name}: training {m['spec']} {recipe}", quiet=quiet)
                _, metrics = train_model(
                    m["spec"],
                    ds,
                    test_dataset=eval_ds,
                    out=path,
                    device=cfg["device"],
                    seed=recipe.pop("seed", cfg["seed"]),
                    **recipe,
                    **kw,
                )
                robust = metrics.get("robust_acc")
                clean = metrics.get("clean_acc", float("nan"))
                extra = "" if robust is None else f", robust acc {robust:.3f}"
                log(f"model {name}: clean acc {clean:.3f}{extra}", quiet=quiet)

            model = train_once(path, train, device=cfg["device"])
        models[name] = model
        eps[name] = float(
            m["eps"] if m.get("eps") is not None else model.invsim_meta.get("eps") or 0
        )
        arch[name] = m.get("arch") or model.invsim_meta.get("arch") or m["spec"]
    return models, eps, arch


def _inversion_quality(model, inv: InvertedDataset) -> dict[str, float]:
    """Median losses, and how often the model classifies an inverted image as its target."""
    dev = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model, warn=False):
        pred = torch.cat([logits(model(x.to(dev))).argmax(1).cpu() for x in inv.images.split(256)])
    return {
        "median_loss": float(inv.loss.median()),
        "median_initial_loss": float(inv.initial_loss.median()),
        "target_accuracy": float((pred == inv.target_labels).float().mean()),
        "n": len(inv),
    }


def run_experiment(cfg: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Run a validated config (see :mod:`invsim.config`) and write every output in
    ``cfg["out"]``: results.json, natural.csv, inverted.csv (stir.csv), figures and
    report.html. Returns the results dictionary."""
    t0 = time.perf_counter()
    init_from_env(cfg["device"])  # under torchrun: join the group; else nothing
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    data = cfg["data"]
    opts = data.get("options", {})
    size = {k: data[k] for k in ("size", "crop") if data.get(k)}
    train_ds = load_dataset(data["dataset"], split=data["train_split"], **size, **opts)
    eval_ds = load_dataset(data["dataset"], split=data["eval_split"], **size, **opts)
    models, eps, arch = _models(cfg, train_ds, eval_ds, out, quiet)

    inv_cfg = dict(cfg["inversion"])
    layer = inv_cfg.pop("layer", "penultimate")
    shard_size = inv_cfg.pop("shard_size", 256)
    cache = RepresentationCache(out / "cache")
    results: dict[str, Any] = {"matrices": {}, "summary": {}, "inversion": {}}

    inverted: dict[str, InvertedDataset] = {}
    if "inverted" in cfg["measures"]:
        for name, model in models.items():
            log(
                f"inverting {data['pairs']} pairs through {name} "
                f"({inv_cfg['iterations']} iterations)",
                quiet=quiet,
            )
            inv = invert_distributed(
                model,
                eval_ds,
                data["pairs"],
                out / "inverted" / name,
                seed=cfg["seed"],
                shard_size=shard_size,
                layer=layer,
                device=cfg["device"],
                **inv_cfg,
            )
            assert inv is not None
            inverted[name] = inv
            results["inversion"][name] = _inversion_quality(model, inv)

    matrices: dict[str, SimilarityMatrix] = {}
    if "natural" in cfg["measures"]:
        log("natural similarity", quiet=quiet)
        matrices["natural"] = natural_similarity(
            models, eval_ds, n=data["natural_n"], layer=layer, cache=cache, device=cfg["device"]
        )
    if inverted:
        log("inverted similarity", quiet=quiet)
        matrices["inverted"] = inverted_similarity(
            models, inverted, layer=layer, cache=cache, device=cfg["device"]
        )
    if "stir" in cfg["measures"]:
        log("STIR", quiet=quiet)
        st = cfg["stir"]
        stir_kw = {**inv_cfg, "iterations": st.get("iterations", inv_cfg["iterations"])}
        matrices["stir"], _ = stir(
            models,
            eval_ds,
            out / "stir",
            n=st["n"],
            seed=cfg["seed"],
            layer=layer,
            cache=cache,
            device=cfg["device"],
            seed_images=st.get("seed_images", "noise"),
            shard_size=shard_size,
            **stir_kw,
        )
    for key, mat in matrices.items():
        results["matrices"][key] = mat.to_dict()
        results["summary"][key] = summarize(mat)
        write_matrix_csv(mat, out / f"{key}.csv")
    if len(set(eps.values())) > 1:
        results["robustness"] = {
            key: robustness_summary(mat, eps, arch) for key, mat in matrices.items()
        }
    if cfg.get("confound"):
        log("confound experiment", quiet=quiet)
        results["confound"] = confound_experiment(
            out / "confound",
            seed=cfg["seed"],
            device=cfg["device"],
            cache=cache,
            **cfg["confound"],
        )
    reduced = {
        k: {"used": inv_cfg[k], "paper": PAPER_DEFAULTS[k]}
        for k in ("iterations", "step_size", "momentum", "eps")
        if k in inv_cfg and inv_cfg[k] != PAPER_DEFAULTS[k]
    }
    results["models"] = {
        n: {
            "eps": eps[n],
            "arch": arch[n],
            "spec": m.invsim_meta.get("spec"),
            "sha256": m.invsim_meta.get("sha256"),
            "training": m.invsim_meta.get("training"),
        }
        for n, m in models.items()
    }
    results["provenance"] = {
        "invsim": invsim.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "config": cfg,
        "config_hash": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
        "deviations_from_paper": reduced,
        "pairs": data["pairs"],
        "cache": dict(cache.stats),
        "seconds": time.perf_counter() - t0,
    }
    if is_main():  # only rank 0 writes results and the report
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        from invsim.report import write_report

        write_report(out, results=results, inverted=inverted, models=models, eval_ds=eval_ds)
    barrier()
    log(f"done in {time.perf_counter() - t0:.0f} s: {out / 'report.html'}", quiet=quiet)
    return results


def confound_experiment(
    out_dir: str | Path,
    *,
    epochs: int = 4,
    pairs: int = 300,
    iterations: int = 300,
    arch: str = "mlp",
    seed: int = 0,
    device: str | None = None,
    cache: RepresentationCache | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train an only-A model (two seeds) and an only-B model on the confound set, then
    compare natural CKA (``both`` test images) with CKA on each model's inverted data."""
    out = Path(out_dir)
    cache = cache or RepresentationCache(out / "cache")
    models = {}
    for name, variant, s in (
        ("only_a", "only_a", seed),
        ("only_a_seed2", "only_a", seed + 1),
        ("only_b", "only_b", seed),
    ):
        path = out / "models" / f"{name}.safetensors"

        def train(variant=variant, s=s, path=path):
            train_model(
                arch,
                make_confound(variant, split="train", seed=seed),
                epochs=epochs,
                seed=s,
                out=path,
                device=device,
                progress=progress,
                test_dataset=make_confound("both", split="test", seed=seed),
            )

        models[name] = train_once(path, train, device=device)
    test = make_confound("both", split="test", seed=seed)
    natural = natural_similarity(models, test, n=None, cache=cache, device=device)
    inverted = {
        name: invert_distributed(
            models[name],
            test,
            pairs,
            out / "inverted" / name,
            seed=seed,
            iterations=iterations,
            batch_size=256,
            device=device,
            progress=progress,
        )
        for name in ("only_a", "only_b")
    }
    inv = inverted_similarity(models, inverted, cache=cache, device=device)  # type: ignore[arg-type]
    result = {
        "natural": natural.to_dict(),
        "inverted": inv.to_dict(),
        "headline": {
            "natural_a_b": natural["only_a", "only_b"],
            "natural_a_a2": natural["only_a", "only_a_seed2"],
            "inverted_a_b_on_a": inv["only_a", "only_b"],
            "inverted_a_b_on_b": inv["only_b", "only_a"],
            "inverted_a_a2_on_a": inv["only_a", "only_a_seed2"],
        },
        "inversion_loss": {k: float(v.loss.median()) for k, v in inverted.items()},  # type: ignore[union-attr]
        "settings": {"arch": arch, "epochs": epochs, "pairs": pairs, "iterations": iterations},
    }
    if is_main():
        (out / "confound.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
