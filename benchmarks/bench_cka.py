"""Benchmark: exact linear CKA on n=50,000, d1=d2=2048 float32 activations, batches of 1,000.

Not a test. Each contender runs in its own subprocess so that its peak RSS is its own.
Writes benchmarks/results/cka.json and prints a table.

    python benchmarks/bench_cka.py            # full problem (a few minutes on 2 cores)
    python benchmarks/bench_cka.py --n 10000  # smaller
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "cka.json"


def batches(n: int, d: int, batch: int, seed: int = 0):
    """Deterministic correlated activations, generated batch by batch (never all in memory)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.relu(torch.randn(m, d, generator=g) + 1.0)
        y = x @ mix + 0.5 * torch.randn(m, d, generator=g)
        yield x, y


def matmul_rate(dtype: torch.dtype, d: int, batch: int) -> float:
    """Measured FLOP/s of the accumulating (d x batch) @ (batch x d) product this problem
    is made of (``addmm_`` into a preallocated d x d buffer); the best of three 2 s windows,
    so that a busy moment on the machine does not lower the bound."""
    a = torch.randn(batch, d, dtype=dtype)
    out = torch.zeros(d, d, dtype=dtype)
    out.addmm_(a.T, a)
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            out.addmm_(a.T, a)
            reps += 1
        best = max(best, 2 * batch * d * d * reps / (time.perf_counter() - t0))
    return best


def run_one(name: str, n: int, d: int, batch: int) -> dict:
    t0 = time.perf_counter()
    if name.startswith("invsim.LinearCKA"):
        from invsim import LinearCKA

        dtype = torch.float32 if name.endswith("fp32-products") else torch.float64
        acc = LinearCKA(product_dtype=dtype)
        spent = 0.0  # time in invsim only, not in generating the activations
        for x, y in batches(n, d, batch):
            t1 = time.perf_counter()
            acc.update(x, y)
            spent += time.perf_counter() - t1
        t1 = time.perf_counter()
        value = acc.compute()
        spent += time.perf_counter() - t1
        t0 = time.perf_counter() - spent  # so that wall below is the time spent in invsim
        note = "exact full-data linear CKA (feature space, streaming)"
        # the compute bound measured in this same process, right after the run: the three
        # accumulating d x d products of one batch, times the number of batches
        xb, yb = x.to(dtype), y.to(dtype)
        g = torch.zeros(d, d, dtype=dtype)
        reps = []
        for _ in range(5):
            t1 = time.perf_counter()
            g.addmm_(xb.T, xb)
            g.addmm_(yb.T, yb)
            g.addmm_(xb.T, yb)
            reps.append(time.perf_counter() - t1)
        in_process_bound = sorted(reps)[2] * -(-n // batch)
    elif name.startswith("invsim.MinibatchCKA"):
        from invsim import MinibatchCKA

        xs, ys = zip(*batches(n, d, batch), strict=True)
        t0 = time.perf_counter()
        fp32 = name.endswith("fp32-products")
        acc = MinibatchCKA(product_dtype=torch.float32 if fp32 else torch.float64)
        for x, y in zip(xs, ys, strict=True):
            acc.update(x, y)
        value = acc.compute()
        note = "minibatch CKA (Nguyen et al.), the estimator the peers compute, " + (
            "float32 products" if fp32 else "float64"
        )
    elif name == "ckatorch.cka_batch":
        from ckatorch.core import cka_batch

        xs, ys = zip(*batches(n, d, batch), strict=True)
        t0 = time.perf_counter()
        value = float(cka_batch(torch.stack(xs), torch.stack(ys)))
        note = "minibatch CKA (Nguyen et al.), a different estimator; needs all batches at once"
    elif name == "torch_cka.CKA":
        import torch.nn as nn
        from torch.utils.data import DataLoader, TensorDataset
        from torch_cka import CKA

        xs, ys = zip(*batches(n, d, batch), strict=True)
        t0 = time.perf_counter()
        dl_x = DataLoader(TensorDataset(torch.cat(xs)), batch_size=batch)
        dl_y = DataLoader(TensorDataset(torch.cat(ys)), batch_size=batch)
        m1, m2 = nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity())
        cka = CKA(m1, m2, model1_layers=["0"], model2_layers=["0"], device="cpu")
        cka.compare(dl_x, dl_y)
        value = float(cka.export()["CKA"][0, 0])
        note = "minibatch CKA (unbiased HSIC per batch), float32"
    else:
        raise ValueError(name)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    out = {"name": name, "wall_s": wall, "peak_rss_mib": peak, "cka": value, "note": note}
    if name.startswith("invsim.LinearCKA"):
        out["in_process_bound_s"] = in_process_bound
        out["ratio_to_in_process_bound"] = wall / in_process_bound
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.d, args.batch)))
        return

    n, d, b = args.n, args.d, args.batch
    flops = 3 * 2 * n * d * d  # X^T X, Y^T Y, X^T Y over all batches
    rate64 = matmul_rate(torch.float64, d, b)
    rate32 = matmul_rate(torch.float32, d, b)
    bound = {"float64": flops / rate64, "float32": flops / rate32}
    rows = []
    names = [
        "invsim.LinearCKA",
        "invsim.LinearCKA:fp32-products",
        "invsim.MinibatchCKA",
        "invsim.MinibatchCKA:fp32-products",
        "ckatorch.cka_batch",
        "torch_cka.CKA",
    ]
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(n), "--d", str(d)]
        cmd += ["--batch", str(b)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"name": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours = rows[0]
    for r in rows:
        if "wall_s" in r:
            dt = "float32" if ("fp32" in r["name"] or "torch_cka" in r["name"]) else "float64"
            # the bound is that of the exact problem; minibatch estimators do other work
            r["ratio_to_compute_bound"] = r["wall_s"] / bound[dt]
            r["ratio_to_invsim"] = r["wall_s"] / ours["wall_s"] if "wall_s" in ours else None
    out = {
        "problem": {"n": n, "d1": d, "d2": d, "batch": b, "dtype_in": "float32"},
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "dense_flops": flops,
        "matmul_gflops": {"float64": rate64 / 1e9, "float32": rate32 / 1e9},
        "compute_bound_s": bound,
        "not_run": {
            "ckatorch.cka_base": f"needs two {n}x{n} float64 Gram matrices "
            f"({2 * n * n * 8 / 2**30:.0f} GiB): not possible on this machine",
        },
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(
        f"compute bound: float64 {bound['float64']:.1f} s ({rate64 / 1e9:.0f} GFLOP/s), "
        f"float32 {bound['float32']:.1f} s ({rate32 / 1e9:.0f} GFLOP/s)"
    )
    print(
        f"{'contender':34} {'wall s':>8} {'peak MiB':>9} {'x bound':>8} {'CKA':>8}"
        "   (x bound: against the separately measured bound; LinearCKA rows also"
    )
    print(" " * 34 + "  report the bound measured in their own process, in brackets)")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:34} error: {r['error']}")
            continue
        extra = (
            f"   [{r['ratio_to_in_process_bound']:.2f}x in-process bound]"
            if "ratio_to_in_process_bound" in r
            else ""
        )
        print(
            f"{r['name']:34} {r['wall_s']:8.1f} {r['peak_rss_mib']:9.0f} "
            f"{r['ratio_to_compute_bound']:8.2f} {r['cka']:8.4f}{extra}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
