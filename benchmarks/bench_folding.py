"""Folded batch-norms (``fold_bn``) and channels-last in the inversion loop itself (not a
test). Writes benchmarks/results/folding.json.

``invert_images`` on the demo's batch-norm architectures (VGG, and ResNet-18 at width 8)
on MNIST-sized images, batch 256, a fixed number of the paper's iterations, four ways:
plain, ``channels_last``, ``fold_bn``, both. Per way: seconds per image pass (median of
``--repeat`` runs) and the largest difference of the returned loss from the plain run
(float rounding only). The weights are untrained; folding's cost does not depend on
their values, and the batch-norms get random running statistics so that the fold is
not the identity.

    python benchmarks/bench_folding.py [--iterations 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from invsim.inversion import invert_images
from invsim.models import load_model
from invsim.models.folding import count_batchnorms, fold_batchnorm

RESULTS = Path(__file__).parent / "results" / "folding.json"
MODELS = {"vgg": {}, "resnet": {"width": 8}}  # as in the demo
WAYS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "fold_bn": {"fold_bn": True},
    "fold_bn + channels_last": {"fold_bn": True, "channels_last": True},
}


def _statistics(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    seeds, targets = torch.rand(args.batch, 1, 28, 28), torch.rand(args.batch, 1, 28, 28)
    results: dict = {"batch": args.batch, "iterations": args.iterations, "models": {}}
    for arch, kwargs in MODELS.items():
        model = _statistics(load_model(arch, **kwargs))
        folded = fold_batchnorm(model)
        row: dict = {"batchnorms": count_batchnorms(model),
                     "batchnorms_folded": count_batchnorms(folded)}  # fmt: skip
        reference = None
        for way, opts in WAYS.items():
            times, loss = [], None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                r = invert_images(model, seeds, targets, iterations=args.iterations,
                                  batch_size=args.batch, progress=False, **opts)  # fmt: skip
                times.append((time.perf_counter() - t0) / r.passes)
                loss = r.loss
            reference = loss if reference is None else reference
            row[way] = {
                "ms_per_pass": 1e3 * statistics.median(times),
                "max_loss_difference": float((loss - reference).abs().max()),
            }
            print(arch, way, f"{row[way]['ms_per_pass']:.3f} ms/pass", flush=True)
        plain = row["plain"]["ms_per_pass"]
        for way in WAYS:
            row[way]["speedup"] = plain / row[way]["ms_per_pass"]
        results["models"][arch] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
