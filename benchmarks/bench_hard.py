"""Inversion on hard models, where the paper's algorithm struggles (not a test). Writes
benchmarks/results/hard.json.

Three LeNets trained by invsim on MNIST-5k (no download): standard, L-inf PGD at eps
0.3 and L2 PGD at eps 3.0 (the adversarially trained ones are the hard ones: their
representations change slowly under small input changes). 64 seed/target pairs of the
test split per model. Per model and schedule: median and 90th-percentile relative loss,
the fraction of examples at most ``CONVERGED_LOSS``, the fraction the model classifies
as the target's label, mean steps and image passes; per schedule, the largest change of
the 3 x 3 inverted linear-CKA matrix when the cap (or the paper's budget) doubles.

Schedules: the paper's (1,000 and 2,000 iterations), the converging schedule before
invsim 0.2 (``horizon=None``), its previous default (momentum 0.9, ``decay_tol`` 0.02),
the default (momentum 0.97, ``decay_tol`` 0.005), and one change of it at a time.

    python benchmarks/bench_hard.py            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from invsim.config import InversionConfig, TrainConfig
from invsim.data import load_dataset
from invsim.data.pairs import sample_pairs
from invsim.experiment import RepresentationCache
from invsim.experiment.matrices import panel
from invsim.inversion import CONVERGED_LOSS, run_inversion
from invsim.models import load_model, save_model
from invsim.representation import logits
from invsim.train import train_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hard.json"
MODELS = {
    "standard": None,
    "linf-0.3": {"norm": "linf", "eps": 0.3, "steps": 10},
    "l2-3.0": {"norm": "l2", "eps": 3.0, "steps": 10},
}
PAPER = InversionConfig(batch_size=64)
OLD = {"momentum": 0.9, "decay_tol": 0.02}  # the previous default converging settings
SCHEDULES = {
    "paper": PAPER,
    "converge (horizon=None, before 0.2)": PAPER.replace(schedule="converge", horizon=None, **OLD),
    "converge, previous default (momentum 0.9, decay_tol 0.02)": PAPER.replace(
        schedule="converge", **OLD
    ),
    "converge (default: momentum 0.97, decay_tol 0.005)": PAPER.replace(schedule="converge"),
    "converge, momentum 0.9, decay_tol 0.005": PAPER.replace(
        schedule="converge", momentum=0.9, decay_tol=0.005
    ),
    "converge, momentum 0.97, decay_tol 0.01": PAPER.replace(schedule="converge", decay_tol=0.01),
}


def zoo(out: Path) -> dict:
    """The standard LeNet, then each adversarial one fine-tuned from it (PGD training
    from scratch at these radii collapses to chance on 4,000 images)."""
    import copy

    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    models = {}
    for name, adv in MODELS.items():
        path = out / f"lenet-{name}.safetensors"
        if not path.exists():
            recipe = TrainConfig(epochs=8, adversarial=adv, eval_n=500, lr=1e-3 if adv else 2e-3)
            if adv is None:
                train_model("lenet", train, recipe, out=path, progress=False, test_dataset=test)
            else:
                start = copy.deepcopy(models["standard"])
                tuned, _ = train_model(
                    start,
                    train,
                    recipe,
                    progress=False,
                    test_dataset=test,
                    in_channels=1,
                    mean=[0.5],
                    std=[0.5],
                )
                net = load_model("lenet")
                net.load_state_dict(tuned.state_dict())
                meta = {k: tuned.invsim_meta[k] for k in ("training", "eps", "norm")}
                save_model(net, path, **meta)
        models[name] = load_model(str(path))
        print(name, models[name].invsim_meta.get("training", {}).get("clean_acc"), flush=True)
    return models


def matrix(models, images) -> np.ndarray:
    names, cache = list(models), RepresentationCache()
    out = np.empty((len(names), len(names)))
    for i, r in enumerate(names):
        reps = {c: cache.get(models[c], images[r], f"{r}:{id(images[r])}") for c in names}
        out[i] = panel(reps, ["linear_cka"], rows=[r])["linear_cka"].values[0]
    return out


def one(model, seeds, targets, target_labels, cfg: InversionConfig) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    r = run_inversion(model, seeds, targets, cfg, progress=False)
    with torch.no_grad():
        pred = logits(model(r.images)).argmax(1)
    loss = r.loss.double()
    row = {
        "median_loss": float(loss.median()),
        "p90_loss": float(torch.quantile(loss, 0.9)),
        "fraction_converged": float((loss <= CONVERGED_LOSS).double().mean()),
        "target_accuracy": float((pred == target_labels).double().mean()),
        "mean_steps": float(r.iterations.double().mean()),
        "passes": int(r.passes),
        "seconds": time.perf_counter() - t0,
    }
    return row, r.images


def schedule_rows(models, seeds, targets, labels, cfg: InversionConfig, cap: int) -> dict:
    """Per model at ``cap`` and at twice it (the paper: its budget and half of it)."""
    short = cfg.replace(iterations=cap // 2 if cfg.schedule == "paper" else cap)
    long = cfg.replace(iterations=cap if cfg.schedule == "paper" else 2 * cap)
    out, images = {"models": {}}, {"short": {}, "long": {}}
    for name, model in models.items():
        row, images["short"][name] = one(model, seeds, targets, labels, short)
        row2, images["long"][name] = one(model, seeds, targets, labels, long)
        out["models"][name] = {"at": short.iterations, **row, "doubled": row2}
        print(f"  {name}: {row['median_loss']:.3f} ({row['passes']} passes), doubled "
              f"{row2['median_loss']:.3f}", flush=True)  # fmt: skip
    change = np.abs(matrix(models, images["short"]) - matrix(models, images["long"]))
    out["matrix_change_when_doubled"] = float(change.max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--cap", type=int, default=2000)
    ap.add_argument("--models-dir", default=str(ROOT / "runs" / "hard-models"))
    args = ap.parse_args()
    torch.manual_seed(0)
    models = zoo(Path(args.models_dir))
    test = load_dataset("mnist5k", split="test")
    s, t = sample_pairs(test.labels.numpy(), args.pairs, seed=0)
    seeds, targets, labels = test.images[s], test.images[t], test.labels[t]
    results = {"pairs": args.pairs, "cap": args.cap, "criterion": CONVERGED_LOSS,
               "schedules": {}}  # fmt: skip
    for name, cfg in SCHEDULES.items():
        print(name, flush=True)
        results["schedules"][name] = schedule_rows(models, seeds, targets, labels, cfg, args.cap)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
