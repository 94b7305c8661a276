"""Faster passes? torch.compile and channels-last on the inversion's inner loop (not a
test). Writes benchmarks/results/passes.json.

The bare loop of ``bench_inversion.py`` (forward to the representation, backward, the
update) for an untrained demo VGG and LeNet at batch 128 on MNIST-sized images, three
ways: eager (the reference), channels-last memory format (model and images), and
``torch.compile`` of the representation function (inductor; compile time reported
apart). An option is worth adding to ``invert_images`` only where it is faster than the
eager loop; the figures are recorded either way.

    python benchmarks/bench_passes.py [--iterations 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_inversion import bare_features, bare_loop  # same folder: the reference loop

from invsim.models import load_model

RESULTS = Path(__file__).parent / "results" / "passes.json"


def timed(features, seeds, targets, iterations: int, repeat: int = 3) -> float:
    return statistics.median(bare_loop(features, seeds, targets, iterations) for _ in range(repeat))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    seeds, targets = torch.rand(args.batch, 1, 28, 28), torch.rand(args.batch, 1, 28, 28)
    results: dict = {"batch": args.batch, "iterations": args.iterations}
    for arch in ("lenet", "vgg"):
        features = bare_features(arch, load_model(arch)).eval()
        row = {"eager_s": timed(features, seeds, targets, args.iterations)}
        cl = bare_features(arch, load_model(arch)).eval().to(memory_format=torch.channels_last)
        row["channels_last_s"] = timed(
            cl,
            seeds.to(memory_format=torch.channels_last),
            targets.to(memory_format=torch.channels_last),
            args.iterations,
        )
        try:
            compiled = torch.compile(features)
            t0 = time.perf_counter()
            bare_loop(compiled, seeds, targets, 2)  # compiles forward and backward
            row["compile_s"] = time.perf_counter() - t0
            row["compiled_s"] = timed(compiled, seeds, targets, args.iterations)
        except Exception as e:  # no compiler, unsupported op: recorded, not fatal
            row["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
        for k in ("channels_last_s", "compiled_s"):
            if k in row:
                row[k.replace("_s", "_speedup")] = row["eager_s"] / row[k]
        results[arch] = row
        print(arch, row, flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
