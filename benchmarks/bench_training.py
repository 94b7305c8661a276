"""Training on 2 CPU cores: time and accuracy of the built-in zoo on MNIST-5k.

Not a test. Writes benchmarks/results/training.json; the robustness guide quotes it.

    python benchmarks/bench_training.py                 # standard zoo + the robust model
    python benchmarks/bench_training.py --only vgg      # one architecture
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invsim.data import load_dataset
from invsim.train import accuracy, train_model

RESULTS = Path(__file__).parent / "results" / "training.json"

STANDARD = {  # epochs chosen so that each takes about a minute or less on 2 cores
    "mlp": {"epochs": 15},
    "lenet": {"epochs": 15},
    "vgg": {"epochs": 8},
    "resnet": {"epochs": 4, "width": 8},
    "densenet": {"epochs": 8},
    "mobilenet": {"epochs": 8},
    "vit": {"epochs": 10},
}
ROBUST = ("vgg", {"epochs": 12, "adversarial": {"norm": "l2", "eps": 1.5, "steps": 7}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--no-robust", action="store_true")
    args = p.parse_args()
    train, test = load_dataset("mnist5k", split="train"), load_dataset("mnist5k", split="test")
    rows = []
    for arch, recipe in STANDARD.items():
        if args.only and arch not in args.only:
            continue
        t0 = time.perf_counter()
        _, m = train_model(arch, train, test_dataset=test, progress=False, **recipe)
        rows.append({"arch": arch, **recipe, "seconds": time.perf_counter() - t0,
                     "clean_acc": m["clean_acc"]})  # fmt: skip
        print(f"{arch:10} {rows[-1]['seconds']:6.1f} s  clean {m['clean_acc']:.3f}", flush=True)
    if not args.no_robust and (not args.only or ROBUST[0] in args.only):
        arch, recipe = ROBUST
        t0 = time.perf_counter()
        model, m = train_model(arch, train, test_dataset=test, progress=False, **recipe)
        pgd20 = {"norm": "l2", "eps": 1.5, "steps": 20}
        robust = accuracy(model, test, adversarial=pgd20)
        rows.append({"arch": arch, **recipe, "seconds": time.perf_counter() - t0,
                     "clean_acc": m["clean_acc"], "robust_acc_l2_1.5_pgd20": robust})  # fmt: skip
        print(f"{arch} robust {rows[-1]['seconds']:6.1f} s  clean {m['clean_acc']:.3f} "
              f"robust(L2 1.5, PGD-20) {robust:.3f}")  # fmt: skip

    # a partial run (--only) replaces its own rows and keeps the others
    def key(r: dict) -> tuple:
        return r["arch"], json.dumps(r.get("adversarial"), sort_keys=True)

    old = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    order = list(STANDARD) + [ROBUST[0]]
    merged.sort(key=lambda r: (r.get("adversarial") is not None, order.index(r["arch"])))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": torch.get_num_threads(), "results": merged},
                                  indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
