"""How the inverted matrix drifts with the inversion budget, and the converging schedule
(not a test). Writes benchmarks/results/convergence.json and docs/convergence.png.

The demo zoo (standard and L2-robust MLP, LeNet, VGG, ResNet; trained as ``invsim demo``
does, or read from ``--demo-dir``), 256 seed/target pairs of MNIST-5k per model.

- The paper's schedule to 4,000 iterations, one run per model with snapshots at 100,
  200, 500, 1,000, 2,000, 3,000 and 4,000 iterations: the inverted linear-CKA matrix at
  each budget, its largest and mean entry change from the previous budget, the median
  loss and the median distance from the seed.
- ``schedule="converge"`` with caps 2,000 and 4,000: the largest entry change between
  the two (goal: at most 0.01), its image passes and wall time against the paper's
  2,000-iteration schedule (goal: at most 25%), and how its matrix differs from the
  paper's at 2,000.

    python benchmarks/bench_convergence.py --demo-dir runs/demo
    python benchmarks/bench_convergence.py --rules --channels-last   # the rules only
    python benchmarks/bench_convergence.py --methods --pairs 32 --channels-last

``--rules``: the converging-momentum rule's settings (``RULES``) side by side on the
zoo, each capped at 4,000 with a snapshot at 2,000, into ``convergence-rules.json``.
``--methods``: the converging settings (``METHODS``: the converge schedule's L-BFGS
steps, capped lower and stopping at a stall, and the demo's converging-momentum rule)
beside the paper's 2,000 iterations, into ``convergence-methods.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from invsim.data import load_dataset
from invsim.data.pairs import sample_pairs
from invsim.demo import demo_config
from invsim.experiment import RepresentationCache
from invsim.experiment.matrices import panel
from invsim.experiment.stages import load_models
from invsim.inversion import invert_images

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "convergence.json"
FIGURE = ROOT / "docs" / "convergence.png"
BUDGETS = (100, 200, 500, 1000, 2000, 3000, 4000)


def inverted_matrix(models, images_by_row) -> np.ndarray:
    """Linear CKA, row r on row model r's inverted images (the paper's matrix)."""
    names = list(models)
    cache = RepresentationCache()
    out = np.empty((len(names), len(names)))
    for i, r in enumerate(names):
        x = images_by_row[r]
        reps = {c: cache.get(models[c], x, f"{r}:{id(x)}") for c in names}
        out[i] = panel(reps, ["linear_cka"], rows=[r])["linear_cka"].values[0]
    return out


def paper_run(models, seeds, targets, channels_last: bool) -> dict:
    snaps, seconds = {}, {}
    for name, model in models.items():
        times: dict[int, float] = {}
        t0 = time.perf_counter()

        def clock(it, _x, times=times, t0=t0):
            if it in BUDGETS:
                times[it] = time.perf_counter() - t0

        r = invert_images(model, seeds, targets, iterations=max(BUDGETS), batch_size=256,
                          snapshots=BUDGETS, callback=clock, progress=False,
                          channels_last=channels_last)  # fmt: skip
        times[max(BUDGETS)] = time.perf_counter() - t0
        snaps[name], seconds[name] = r.snapshots, times
        print(f"paper {name}: {times[max(BUDGETS)]:.0f} s", flush=True)
    rows = []
    previous = None
    for b in BUDGETS:
        m = inverted_matrix(models, {k: snaps[k][b][0] for k in models})
        loss = np.median([float(snaps[k][b][1].median()) for k in models])
        dist = np.median([float((snaps[k][b][0] - seeds).flatten(1).norm(dim=1).median())
                          for k in models])  # fmt: skip
        change = np.abs(m - (m if previous is None else previous))
        first = previous is None
        rows.append(
            {
                "iterations": b,
                "matrix": m.tolist(),
                "median_loss": float(loss),
                "median_distance_from_seed": float(dist),
                "max_change_from_previous": None if first else float(change.max()),
                "mean_change_from_previous": None if first else float(change.mean()),
            }
        )
        previous = m
    paper_2000_s = sum(seconds[k][2000] for k in models)
    return {"budgets": rows, "paper_2000_seconds": paper_2000_s,
            "paper_2000_passes": len(models) * len(seeds) * 2001}  # fmt: skip


def converge_run(models, seeds, targets, cap: int, channels_last: bool) -> dict:
    images, passes, seconds, its, losses = {}, 0, 0.0, [], []
    for model_name, model in models.items():
        t0 = time.perf_counter()
        r = invert_images(model, seeds, targets, iterations=cap, batch_size=256,
                          schedule="converge", progress=False,
                          channels_last=channels_last)  # fmt: skip
        seconds += time.perf_counter() - t0
        images[model_name], passes = r.images, passes + r.passes
        its.append(r.iterations.float())
        losses.append(float(r.loss.median()))
    it = torch.cat(its)
    return {"cap": cap, "matrix": inverted_matrix(models, images).tolist(), "passes": passes,
            "seconds": seconds, "median_iterations": float(it.median()),
            "max_iterations": int(it.max()), "median_loss": float(np.median(losses))}  # fmt: skip


RULES = {  # converging-momentum settings compared on the zoo (--rules)
    "momentum 0.9, decay_tol 0.02": {"momentum": 0.9, "decay_tol": 0.02},
    "momentum 0.9, decay_tol 0.005": {"momentum": 0.9, "decay_tol": 0.005},
    "momentum 0.97, decay_tol 0.005 (the demo's)": {"decay_tol": 0.005},
    "momentum 0.97, decay_tol 0.01": {"decay_tol": 0.01},  # cheaper; above the paper on L2
}
RULES_RESULTS = ROOT / "benchmarks" / "results" / "convergence-rules.json"


def rules_run(models, seeds, targets, settings: dict, channels_last: bool) -> dict:
    """One converging rule on the zoo, capped at 4,000 with a snapshot at 2,000 (what a
    2,000 cap returns): image passes at the 2,000 cap against the paper's 2,000
    iterations, and the largest change of the inverted matrix from cap 2,000 to 4,000."""
    images, stops, losses, passes = {2000: {}, 4000: {}}, [], {}, 0
    t0 = time.perf_counter()
    for name, model in models.items():
        r = invert_images(model, seeds, targets, iterations=4000, batch_size=256,
                          rule="converging-momentum", snapshots=(2000,), progress=False,
                          channels_last=channels_last, **settings)  # fmt: skip
        images[4000][name], (images[2000][name], loss) = r.images, r.snapshots[2000]
        stops.append(r.iterations)
        losses[name] = float(loss.median())
        passes += int((r.iterations.clamp(max=2000) + 1).sum())  # a 2,000 cap's passes
    change = np.abs(inverted_matrix(models, images[2000]) - inverted_matrix(models, images[4000]))
    i, j = np.unravel_index(change.argmax(), change.shape)
    it = torch.cat(stops)
    return {
        "settings": settings,
        "passes_ratio": passes / (len(models) * len(seeds) * 2001),
        "cap_change_max": float(change.max()),
        "cap_change_at": [list(models)[i], list(models)[j]],
        "entries_over_0.01": int((change > 0.01).sum()),
        "median_iterations": float(it.float().median()),
        "still_running_at_2000": int((it >= 2000).sum()),
        "at_4000": int((it >= 4000).sum()),
        "median_loss_at_2000": losses,
        "seconds": time.perf_counter() - t0,
    }


METHODS = {  # the converging settings compared on the zoo (--methods)
    "paper (2,000 iterations)": None,
    "converge (lbfgs, paper steps after a stall: the default)": {},
    "converge (lbfgs, cap 500)": {"iterations": 500},
    "converge (lbfgs, stop at a stall)": {"stall": "stop"},
    "converging-momentum (decay_tol 0.005: the demo's)": {
        "rule": "converging-momentum",
        "decay_tol": 0.005,
    },
}
METHODS_RESULTS = ROOT / "benchmarks" / "results" / "convergence-methods.json"


def methods_run(models, seeds, targets, settings: dict | None, channels_last: bool) -> dict:
    """The paper's 2,000 iterations, or one converging setting capped at twice its cap
    (``iterations``, default 2,000) with a snapshot at the cap (what the cap returns): per
    model the median loss and seconds, and the largest change of the inverted matrix when
    the cap doubles. The seconds are the doubled run's, scaled by its passes up to the
    cap (a run capped there does that work)."""
    settings = None if settings is None else dict(settings)
    cap = 2000 if settings is None else settings.pop("iterations", 2000)
    images, losses, seconds = {cap: {}, 2 * cap: {}}, {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        if settings is None:
            r = invert_images(model, seeds, targets, iterations=2000, batch_size=256,
                              progress=False, channels_last=channels_last)  # fmt: skip
            images[2000][name], losses[name] = r.images, float(r.loss.median())
        else:
            r = invert_images(model, seeds, targets, iterations=2 * cap, batch_size=256,
                              schedule="converge", snapshots=(cap,), progress=False,
                              channels_last=channels_last, **settings)  # fmt: skip
            images[2 * cap][name], (images[cap][name], loss) = r.images, r.snapshots[cap]
            losses[name] = float(loss.median())
        seconds[name] = time.perf_counter() - t0
        if settings is not None:  # a run capped at `cap` spends the passes up to it
            seconds[name] *= float(r.iterations.clamp(max=cap).sum()) / float(r.iterations.sum())
        print(f"  {name}: {losses[name]:.4f} in {seconds[name]:.1f} s", flush=True)
    out = {"settings": settings, "cap": cap, "median_loss": losses, "seconds": seconds,
           "total_seconds": sum(seconds.values())}  # fmt: skip
    if settings is not None:
        change = inverted_matrix(models, images[cap]) - inverted_matrix(models, images[2 * cap])
        out["cap_change_max"] = float(np.abs(change).max())
    return out


def figure(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = results["paper"]["budgets"][1:]
    b = [r["iterations"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax[0].plot(b, [r["max_change_from_previous"] for r in rows], "o-", label="largest")
    ax[0].plot(b, [r["mean_change_from_previous"] for r in rows], "s-", label="mean")
    ax[0].axhline(0.01, color="grey", ls=":", label="0.01")
    ax[0].set(xscale="log", yscale="log", xlabel="iterations (paper schedule)",
              ylabel="|change| of inverted CKA entries\nsince the previous budget")  # fmt: skip
    ax[0].legend(fontsize=8)
    full = results["paper"]["budgets"]
    ax[1].plot([r["iterations"] for r in full], [r["median_loss"] for r in full], "o-",
               label="paper")  # fmt: skip
    c = results["converge"]["cap_2000"]
    ax[1].plot([c["median_iterations"]], [c["median_loss"]], "r*", ms=12,
               label="converge (median stop)")  # fmt: skip
    ax[1].set(xscale="log", yscale="log", xlabel="iterations", ylabel="median relative loss")
    ax[1].legend(fontsize=8)
    for a, ticks in ((ax[0], b), (ax[1], [r["iterations"] for r in full])):
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xticks(ticks, [f"{t // 1000}k" if t >= 1000 else str(t) for t in ticks], fontsize=8)
    FIGURE.parent.mkdir(exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--demo-dir", default="runs/demo", help="Where the demo's models are.")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--channels-last", action="store_true",
                   help="Channels-last layout (same method, faster CPU convolutions).")  # fmt: skip
    p.add_argument("--rules", action="store_true",
                   help="Only compare converging rules (convergence-rules.json).")  # fmt: skip
    p.add_argument("--methods", action="store_true",
                   help="Only compare the methods (convergence-methods.json).")  # fmt: skip
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="--methods: run only these (exact names) and add them to "
                   "convergence-methods.json, against its stored paper row.")  # fmt: skip
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = demo_config(args.demo_dir)
    test = load_dataset("mnist5k", split="test")
    models = load_models(cfg, test, quiet=True).models
    s, t = sample_pairs(test.labels, args.pairs, rng_seed=0)
    seeds, targets = test.images[s], test.images[t]
    if args.methods:
        found, chosen = {}, METHODS
        if args.only:  # add to the stored rows (the paper's among them), in METHODS' order
            found = json.loads(METHODS_RESULTS.read_text())["methods"]
            chosen = {name: METHODS[name] for name in args.only}
        for name, settings in chosen.items():
            print(name, flush=True)
            found[name] = methods_run(models, seeds, targets, settings, args.channels_last)
        found = {k: found[k] for k in METHODS if k in found}
        paper = found[next(iter(METHODS))]
        for row in found.values():
            row["seconds_ratio"] = row["total_seconds"] / paper["total_seconds"]
            row["loss_at_most_paper"] = {m: row["median_loss"][m] <= paper["median_loss"][m]
                                         for m in models}  # fmt: skip
        out = {"pairs": args.pairs, "models": args.demo_dir, "channels_last": args.channels_last,
               "command": "python benchmarks/bench_convergence.py --methods --pairs "
               f"{args.pairs}" + (" --channels-last" if args.channels_last else ""),
               "methods": found}  # fmt: skip
        METHODS_RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        return
    if args.rules:
        found = {}
        for name, settings in RULES.items():
            found[name] = rules_run(models, seeds, targets, settings, args.channels_last)
            print(name, json.dumps(found[name]), flush=True)
        goal = {"passes_ratio": 0.3, "cap_change_max": 0.01}
        out = {"pairs": args.pairs, "models": args.demo_dir, "channels_last": args.channels_last,
               "goal": goal, "rules": found}  # fmt: skip
        RULES_RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        return
    paper = paper_run(models, seeds, targets, args.channels_last)
    conv = {f"cap_{c}": converge_run(models, seeds, targets, c, args.channels_last)
            for c in (2000, 4000)}  # fmt: skip
    a, b = (np.array(conv[k]["matrix"]) for k in ("cap_2000", "cap_4000"))
    p2000 = np.array(next(r["matrix"] for r in paper["budgets"] if r["iterations"] == 2000))
    c2000 = conv["cap_2000"]
    results = {
        "models": list(models), "pairs": args.pairs, "channels_last": args.channels_last,
        "paper": paper, "converge": conv,
        "converge_cap_change": {"max": float(np.abs(a - b).max()), "goal": 0.01},
        "converge_cost": {"passes_ratio": c2000["passes"] / paper["paper_2000_passes"],
                          "seconds_ratio": c2000["seconds"] / paper["paper_2000_seconds"],
                          "goal": 0.25},
        "converge_vs_paper_2000": {"max": float(np.abs(a - p2000).max()),
                                   "mean": float(np.abs(a - p2000).mean())},
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    figure(results)
    summary = {k: v for k, v in results.items() if k.startswith("converge_")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
