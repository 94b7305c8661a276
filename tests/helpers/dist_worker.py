"""One process of a two-process gloo group, started by tests/test_distributed.py.

python dist_worker.py TASK RANK WORLD RENDEZVOUS_FILE OUT_DIR
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def data():
    g = torch.Generator().manual_seed(0)
    x = 50.0 + torch.randn(301, 12, generator=g, dtype=torch.float64)
    y = x[:, :6] @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    return x, y + torch.randn(301, 6, generator=g, dtype=torch.float64)


def small_set():
    from invsim.data import TensorImageDataset

    g = torch.Generator().manual_seed(1)
    return TensorImageDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 4,
                              id="random-40")  # fmt: skip


CONVERGE = {"iterations": 60, "schedule": "converge", "decay_patience": 3, "decay_tol": 0.1}


def model():
    from invsim.models import load_model

    torch.manual_seed(0)
    return load_model("lenet")


def main() -> None:
    task, rank, world, rdv, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    from invsim import LinearCKA, StreamingPanel
    from invsim.distributed import all_reduce_accumulator
    from invsim.store import invert_dataset

    if task == "cka":
        x, y = data()
        acc = LinearCKA()
        mat = StreamingPanel(["x", "y", "z"])
        # uneven, strided slices with different first batches (so different shifts)
        mine = torch.arange(rank, len(x), world)
        for chunk in mine.split(37 + 11 * rank):
            acc.update(x[chunk], y[chunk])
            mat.update({"x": x[chunk], "y": y[chunk], "z": torch.tanh(x[chunk, :3] - 50)})
        all_reduce_accumulator(acc)
        all_reduce_accumulator(mat)
        streaming = ["procrustes", "mean_cca", "pwcca", "linreg_r2", "svcca"]
        result = {"biased": acc.compute(), "debiased": acc.compute(debiased=True),
                  "matrix": mat.compute(debiased=True).values.tolist(),
                  "measures": {k: v.values.tolist()
                               for k, v in mat.compute_measures(streaming).items()}}  # fmt: skip
        with open(f"{out}/cka-{rank}.json", "w") as f:
            json.dump(result, f)
    elif task in ("invert", "invert-converge"):
        kw = {"iterations": 6} if task == "invert" else CONVERGE
        ds = invert_dataset(model(), small_set(), 10, out, shard_size=3, batch_size=3,
                            progress=False, **kw)  # fmt: skip
        with open(f"{out}/../rank-{rank}.json", "w") as f:
            json.dump({"n": len(ds)}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
