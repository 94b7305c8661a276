"""Inversion on hard models, where first-order steps crawl (not a test). Writes
benchmarks/results/hard.json.

Models, trained by invsim on MNIST-5k inside the benchmark (no download; about 15
minutes the first time, then read from ``--models-dir``):

- ``standard``: a LeNet, 8 epochs of standard training;
- ``linf-0.3``: a LeNet (32 first-layer channels) trained from scratch with L-inf PGD-10
  at eps 0.3 (step 0.05), eps ramped up over the first 9.6 of 60 epochs (Madry et al.'s
  recipe; without the ramp it collapses to chance on 4,000 images), then trained on at
  the full eps: as hard to invert as outside L-inf MNIST models (the paper's schedule
  ends above 0.3); goal: robust accuracy at least 0.85 under PGD-40 (step 0.01);
- ``l2-2.0``: a LeNet (16 channels) trained with L2 PGD-10 at eps 2.0, ramped over the
  first 30% of 20 epochs; goal: robust accuracy at least 0.6 under PGD-40 at eps 2;
- ``cnn3``: a plain CNN, three conv/ReLU/max-pool stages and a 256-unit ReLU
  representation, 30 epochs of standard training: a landscape of max-pool and ReLU kinks.

64 seed/target pairs of the test split per model. Schedules (``SCHEDULES``): the
paper's (2,000 iterations, with its snapshots), ``schedule="converge"`` (L-BFGS steps)
with its stall settings, and the demo's converging-momentum rule, each capped at 2,000
passes and again at 4,000. A pass is one forward and backward of one image. Per model
and schedule: median and 90th-percentile relative loss, the fraction at most
``CONVERGED_LOSS``, the fraction classified as the target's label, passes and seconds,
both as a fraction of the paper's, and the passes per example and seconds at which the
median first reached the paper's 2,000-iteration median (``to_paper_loss``); per
schedule, the largest change of the inverted linear-CKA matrix when the cap doubles.

    python benchmarks/bench_hard.py            # about 40 minutes on 2 CPU cores
    python benchmarks/bench_hard.py --table    # hard.json as the docs' tables
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from invsim.config import InversionConfig, TrainConfig
from invsim.data import load_dataset
from invsim.data.pairs import sample_pairs
from invsim.experiment import RepresentationCache
from invsim.experiment.matrices import panel
from invsim.inversion import CONVERGED_LOSS, invert_images
from invsim.models import load_model
from invsim.representation import logits
from invsim.train import accuracy, train_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hard.json"
# name -> (architecture, width, epochs, training attack, the robust-accuracy attack, its goal)
MODELS = {
    "standard": ("lenet", 6, 8, None, None, None),
    # trained on at the full eps long after the ramp (60 epochs): as hard to invert as
    # outside L-inf MNIST models are (the paper's schedule ends above 0.3)
    "linf-0.3": (
        "lenet",
        32,
        60,
        {"norm": "linf", "eps": 0.3, "steps": 10, "step_size": 0.05, "ramp_epochs": 9.6},
        {"norm": "linf", "eps": 0.3, "steps": 40, "step_size": 0.01},
        0.85,
    ),
    "l2-2.0": (
        "lenet",
        16,
        20,
        {"norm": "l2", "eps": 2.0, "steps": 10, "ramp_epochs": 6.0},
        {"norm": "l2", "eps": 2.0, "steps": 40},
        0.6,
    ),
    # three conv/ReLU/max-pool stages and a 256-unit ReLU representation: a landscape of
    # max-pool and ReLU kinks
    "cnn3": ("cnn3", 32, 30, None, None, None),
}


def cnn3(width: int = 32) -> torch.nn.Module:
    """A plain CNN: three conv(3x3)/ReLU/max-pool(2) stages (28 -> 14 -> 7 -> 3), then a
    256-unit ReLU layer (the representation) and the linear classifier."""
    nn = torch.nn
    stages, cin = [], 1
    for cout in (width, 2 * width, 4 * width):
        stages += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    head = [nn.Flatten(), nn.Linear(cin * 9, 256), nn.ReLU(), nn.Linear(256, 10)]
    return nn.Sequential(*stages, *head)


PAPER = InversionConfig(batch_size=64)
CURVE = (100, 250, 500, 1000)  # the loss-for-passes curve: what these caps would return
FAST = PAPER.replace(schedule="converge")
SCHEDULES = {
    "paper": PAPER,
    "converge (lbfgs, paper steps after a stall: the default)": FAST,
    "converge (lbfgs, cap 500)": FAST.replace(iterations=500),
    "converge (lbfgs, stop at a stall)": FAST.replace(stall="stop"),
    "converging-momentum (decay_tol 0.005: the demo's)": PAPER.replace(
        rule="converging-momentum", decay_tol=0.005
    ),
}


def zoo(out: Path, names=None) -> tuple[dict, dict]:
    """The models (trained once into ``out``) and their accuracies."""
    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    models, accuracies = {}, {}
    for name in names or MODELS:
        arch, width, epochs, adv, attack, goal = MODELS[name]
        path = out / f"{arch}-{name}.safetensors"
        spec = cnn3(width) if arch == "cnn3" else arch
        if not path.exists():
            recipe = TrainConfig(epochs=epochs, adversarial=adv, eval_n=500, batch_size=64)
            kw = {"in_channels": 1} if arch == "cnn3" else {"width": width}
            model, _ = train_model(spec, train, recipe, progress=False, **kw)
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, path)
        model = load_model(cnn3(width), in_channels=1, checkpoint=path) if arch == "cnn3" else None
        model = model if model is not None else load_model(arch, width=width, checkpoint=path)
        model = model.eval()
        acc = {"clean": accuracy(model, test)}
        if attack is not None:
            acc |= {
                "robust": accuracy(model, test, adversarial=attack),
                "attack": attack,
                "goal": goal,
            }
        models[name], accuracies[name] = model, acc
        print(name, acc, flush=True)
    return models, accuracies


def matrix(models, images) -> np.ndarray:
    names, cache = list(models), RepresentationCache()
    out = np.empty((len(names), len(names)))
    for i, r in enumerate(names):
        reps = {c: cache.get(models[c], images[r], f"{r}:{id(images[r])}") for c in names}
        out[i] = panel(reps, ["linear_cka"], rows=[r])["linear_cka"].values[0]
    return out


def one(model, pairs, cfg: InversionConfig, snapshots=(), reach=None) -> tuple[dict, torch.Tensor]:
    """One inversion of the pairs: its end point, and with ``reach`` (a median loss) the
    passes per example and the seconds at which its median first fell to it (from
    snapshots every 10 passes, timed by the loop's callback: the pairs fill one batch)."""
    seeds, targets, target_labels = pairs
    grid = range(10, cfg.iterations + 1, 10) if reach is not None else ()
    started: dict[int, float] = {}

    def clock(t: int, _x) -> None:
        started.setdefault(t, time.perf_counter())

    t0 = time.perf_counter()
    r = invert_images(
        model,
        seeds,
        targets,
        cfg,
        progress=False,
        callback=clock,
        snapshots=sorted({*snapshots, *grid}),
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = logits(model(r.images)).argmax(1)
    loss = r.loss.double()
    row = {
        "median_loss": float(loss.median()),
        "p90_loss": float(torch.quantile(loss, 0.9)),
        "fraction_converged": float((loss <= CONVERGED_LOSS).double().mean()),
        "target_accuracy": float((pred == target_labels).double().mean()),
        "mean_passes_per_example": float(r.iterations.double().mean()),
        "passes": int(r.passes),
        "seconds": seconds,
        "snapshots": {str(b): float(r.snapshots[b][1].median()) for b in snapshots},
    }
    if reach is not None:
        first = next((b for b in grid if float(r.snapshots[b][1].median()) <= reach), None)
        row["to_paper_loss"] = (
            None
            if first is None
            else {"passes_per_example": first, "seconds": started.get(first, t0 + seconds) - t0}
        )
    return row, r.images


def schedule_rows(models, pairs, cfg: InversionConfig, paper: dict | None) -> dict:
    """Per model at the cap (2,000) and at twice it; for the paper's schedule, its 2,000
    iterations with the 1,000 snapshot standing for the halved budget."""
    out, images = {"models": {}}, {"short": {}, "long": {}}
    for name, model in models.items():
        if cfg.schedule == "paper":
            row, images["long"][name] = one(model, pairs, cfg, snapshots=CURVE)
            images["short"][name] = None
        else:
            curve = [b for b in CURVE if b < cfg.iterations]
            reach = paper["models"][name]["median_loss"] if paper is not None else None
            row, images["short"][name] = one(model, pairs, cfg, snapshots=curve, reach=reach)
            row["doubled"], images["long"][name] = one(
                model, pairs, cfg.replace(iterations=2 * cfg.iterations)
            )
        if paper is not None:
            ref = paper["models"][name]
            row["passes_ratio"] = row["passes"] / ref["passes"]
            row["seconds_ratio"] = row["seconds"] / ref["seconds"]
            row["loss_at_most_paper"] = row["median_loss"] <= ref["median_loss"]
        out["models"][name] = row
        print(
            f"  {name}: {json.dumps({k: v for k, v in row.items() if k != 'doubled'})}", flush=True
        )
    if cfg.schedule != "paper":
        change = np.abs(matrix(models, images["short"]) - matrix(models, images["long"]))
        out["matrix_change_when_doubled"] = float(change.max())
    if paper is not None:
        total = sum(out["models"][m]["seconds"] for m in models)
        out["seconds_ratio"] = total / sum(paper["models"][m]["seconds"] for m in models)
        out["max_model_seconds_ratio"] = max(r["seconds_ratio"] for r in out["models"].values())
    return out


def table(results: dict) -> str:
    """The markdown tables of docs/guides/inversion-evidence.md, from hard.json: per
    schedule and model, the end point and when the paper's loss was first reached; per
    schedule, the time against the paper's and the matrix's change when the cap doubles."""
    head = (
        "| schedule | model | median loss (p90) | passes | seconds | vs paper: passes, "
        "time | first at the paper's loss: passes per example, seconds |"
    )
    lines = [head, "|---" * 7 + "|"]
    for name, sched in results["schedules"].items():
        for m, r in sched["models"].items():
            ratio = (
                f"{r['passes_ratio']:.0%}, {r['seconds_ratio']:.0%}" if "passes_ratio" in r else ""
            )
            reach = r.get("to_paper_loss", "")
            if isinstance(reach, dict):
                reach = f"{reach['passes_per_example']:,}, {reach['seconds']:.1f}"
            elif reach is None:
                reach = "not reached"
            lines.append(
                f"| {name} | {m} | {r['median_loss']:.4f} ({r['p90_loss']:.3f}) | "
                f"{r['passes']:,} | {r['seconds']:.1f} | {ratio} | {reach} |"
            )
    lines += [
        "",
        "| schedule | time vs paper (all, worst model) | cap doubled: largest CKA change |",
        "|---|---|---|",
    ]
    for name, sched in results["schedules"].items():
        time_ = (
            f"{sched['seconds_ratio']:.0%}, {sched['max_model_seconds_ratio']:.0%}"
            if "seconds_ratio" in sched
            else ""
        )
        change = sched.get("matrix_change_when_doubled")
        lines.append(f"| {name} | {time_} | " + ("" if change is None else f"{change:.4f}") + " |")
    return "\n".join(lines)


def per_pass(models, pairs, repeats: int = 3) -> dict:
    """Milliseconds per image pass at a full batch, no tail: 300 steps of every pair in
    one batch, the paper's momentum steps against L-BFGS steps (stopping rules off); the
    best of ``repeats``. Their ratio is what a step's own work costs on top of the model."""
    seeds, targets, _ = pairs
    steps = {"paper": {}, "lbfgs": {"schedule": "converge", "loss_tol": 1e-12, "horizon": 10**6}}
    out = {}
    for name, model in models.items():
        row = {}
        for label, kw in steps.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = invert_images(
                    model, seeds, targets, PAPER.replace(iterations=300, **kw), progress=False
                )
                times.append((time.perf_counter() - t0) / r.passes * 1e3)
            row[f"{label}_ms_per_pass"] = min(times)
        row["ratio"] = row["lbfgs_ms_per_pass"] / row["paper_ms_per_pass"]
        out[name] = row
        print(name, row, flush=True)
    return out


def curve_table(results: dict) -> str:
    """The loss-for-passes curve: per schedule and model, the median loss that a cap of
    B passes returns (its snapshots), the paper's included."""
    models = list(results["accuracies"])
    caps = [*map(str, CURVE), "2000"]
    lines = ["| schedule | model | " + " | ".join(f"cap {int(b):,}" for b in caps) + " |"]
    lines.append("|---" * (len(caps) + 2) + "|")
    for name, sched in results["schedules"].items():
        if "cap" in name:
            continue
        for m in models:
            r = sched["models"][m]
            at = {**r["snapshots"], "2000": r["median_loss"]}
            cells = [f"{at[b]:.4f}" if b in at else "" for b in caps]
            lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--models-dir", default=str(ROOT / "runs" / "hard-models"))
    ap.add_argument("--table", action="store_true", help="Print hard.json as a table.")
    ap.add_argument(
        "--per-pass",
        action="store_true",
        help="Only time a pass at a full batch (paper against L-BFGS steps) "
        "and add it to hard.json.",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="Run only these schedules (exact names) and add them to hard.json, "
        "against its stored paper row.",
    )
    args = ap.parse_args()
    if args.table:
        results = json.loads(RESULTS.read_text())
        print(table(results) + "\n\n" + curve_table(results))
        return
    torch.manual_seed(0)
    models, accuracies = zoo(Path(args.models_dir))
    test = load_dataset("mnist5k", split="test")
    s, t = sample_pairs(test.labels.numpy(), args.pairs, rng_seed=0)
    pairs = (test.images[s], test.images[t], test.labels[t])
    if args.per_pass:
        results = json.loads(RESULTS.read_text())
        results["per_pass"] = per_pass(models, pairs)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        return
    results = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_hard.py",
        "pairs": args.pairs,
        "criterion": CONVERGED_LOSS,
        "accuracies": accuracies,
        "goals": {
            "median_loss": "at most the paper's at 2,000 iterations, every model",
            "seconds_ratio": "at most 0.40 (aim: 0.25)",
            "max_model_seconds_ratio": 0.6,
            "matrix_change_when_doubled": 0.01,
        },
        "schedules": {},
    }
    paper, chosen = None, SCHEDULES
    if args.only:  # add to the stored results, against their paper row
        results = json.loads(RESULTS.read_text())
        paper = results["schedules"]["paper"]
        chosen = {name: SCHEDULES[name] for name in args.only}
    for name, cfg in chosen.items():
        print(name, flush=True)
        results["schedules"][name] = schedule_rows(models, pairs, cfg, paper)
        paper = paper or results["schedules"][name]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
