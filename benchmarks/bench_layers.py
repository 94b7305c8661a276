"""Layer-by-layer CKA heatmap: invsim against pytorch-cka, the same models and inputs.

Two torchvision ResNet-18s (random weights, seeds 0 and 1), 12 layers each (from conv1,
65,536 features at 3 x 64 x 64, to fc), on n random 3 x 64 x 64 inputs, batches of 128.
Each tool runs in its own child process (so each peak RSS is its own), started by this
one run; the script records time, peak memory, passes, and every cell of both results:
pytorch-cka's (a minibatch estimate, float32) against invsim's exact full-data values.
The tool ``forward-only`` runs just both models' forwards over the inputs: the floor
under any tool's time and memory.

    python benchmarks/bench_layers.py                 # n = 2048 (and 10,000 with --large)
    python benchmarks/bench_layers.py --n 10000 --tools pytorch-cka,invsim-minibatch-float32 \
        --out benchmarks/results/layers-10k.json     # the one-pass estimators at n = 10,000
    python benchmarks/bench_layers.py --n 10000 --tools invsim \
        --out benchmarks/results/layers-10k-float64.json \
        --against benchmarks/results/layers-10k.json benchmarks/results/layers-10k-exact.json

Results: benchmarks/results/layers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LAYERS = ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1", "layer2.0", "layer2",
          "layer3", "layer4", "avgpool", "fc"]  # fmt: skip
OUT = Path(__file__).parent / "results" / "layers.json"


def _models():
    import torch
    import torchvision

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(torchvision.models.resnet18().eval())
    return out


def _inputs(n: int):
    import torch

    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tool: str, n: int, batch: int, memory_gb: float) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    a, b = _models()
    x = _inputs(n)
    base = _peak_mb()
    t = time.perf_counter()
    extra: dict = {}
    if tool == "forward-only":  # the floor: both models' forwards, nothing computed on them
        with torch.no_grad():
            for i in range(0, n, batch):
                a(x[i : i + batch]), b(x[i : i + batch])
        values = None
    elif tool == "pytorch-cka":
        from cka import compute_cka
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(x), batch_size=batch)
        values = compute_cka(a, b, loader, layers=LAYERS, model2_layers=LAYERS,
                             progress=False)[0]  # fmt: skip
        values = values.double().tolist()
    else:
        from invsim import layer_similarity

        dtype = torch.float32 if tool.endswith("float32") else torch.float64
        estimator = "minibatch" if "minibatch" in tool else "exact"
        res = layer_similarity({"a": a, "b": b}, x, layers=LAYERS, batch_size=batch,
                               memory_gb=memory_gb, product_dtype=dtype,
                               estimator=estimator, progress=False)  # fmt: skip
        values = res.pair("a", "b").values.tolist()
        extra = {"schedule": res.schedule}
    seconds = time.perf_counter() - t
    found = {"tool": tool, "n": n, "seconds": seconds, "peak_mb": _peak_mb(),
             "peak_above_inputs_mb": _peak_mb() - base, "values": values, **extra}  # fmt: skip
    return {k: v for k, v in found.items() if v is not None}


def run(tool: str, n: int, batch: int, memory_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--n", str(n), "--batch", str(batch),
           "--memory-gb", str(memory_gb)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"tool": tool, "n": n, "error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", default=None)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--memory-gb", type=float, default=4.0)
    p.add_argument("--large", action="store_true", help="also n = 10,000 (slow on a CPU)")
    p.add_argument("--tools", default="pytorch-cka,invsim,invsim-float32,invsim-minibatch-float32")
    p.add_argument("--out", default=str(OUT), help="results file")
    p.add_argument("--against", nargs="*", default=[],
                   help="results files of earlier runs whose values at the same n to compare "
                   "with this run's exact ones (recorded with the file's name)")  # fmt: skip
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.batch, args.memory_gb)))
        return
    import numpy as np

    sizes = [args.n] + ([10_000] if args.large else [])
    runs = []
    for n in sizes:
        found = {t: run(t, n, args.batch, args.memory_gb) for t in args.tools.split(",")}
        exact = np.array(found.get("invsim", {}).get("values", np.nan), dtype=float)
        for path in args.against:  # other runs' values at this n, against this run's exact
            for other in json.loads(Path(path).read_text())["runs"]:
                if other["n"] != n:
                    continue
                for t, r in other["results"].items():
                    if "values" in r and t != "invsim":
                        found[f"{t} ({Path(path).name})"] = {**r, "run": Path(path).name}
        for t, r in found.items():
            if "values" in r and exact.ndim == 2:
                diff = np.abs(np.array(r["values"]) - exact)
                r["max_abs_diff_from_exact"] = float(diff.max())
                i, j = np.unravel_index(int(diff.argmax()), diff.shape)
                worst = {"row": LAYERS[i], "column": LAYERS[j], "value": r["values"][i][j]}
                r["worst_cell"] = {**worst, "exact": float(exact[i, j])}
            print(f"n={n} {t}: " + (f"{r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB, "
                  f"max |diff| from exact {r.get('max_abs_diff_from_exact', float('nan')):.3g}"
                  if "seconds" in r else r["error"][-300:]))  # fmt: skip
        runs.append({"n": n, "results": found})
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    about = {"layers": LAYERS, "batch": args.batch, "input": "3x64x64", "threads": threads,
             "memory_gb": args.memory_gb}  # fmt: skip
    out.write_text(json.dumps({**about, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
