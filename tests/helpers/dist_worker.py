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


CONVERGE = {"iterations": 60, "schedule": "converge", "horizon": 10, "stop_tol": 0.1}


def others(rank: int, world: int) -> dict:
    """CrossMoments, MinibatchCKA and GramTiles over this rank's share of the data, all
    synced by the one all_reduce_accumulator; their values on every rank."""
    from invsim.distributed import all_reduce_accumulator
    from invsim.similarity import CrossMoments, MinibatchCKA
    from invsim.similarity.layerwise import GramTiles

    x, y = data()
    moments, mini = CrossMoments(2), MinibatchCKA(weighting="size")
    for k, chunk in enumerate(torch.arange(len(x)).split(43)):
        if k % world == rank:  # whole batches per rank: minibatch CKA depends on them
            moments.update([x[chunk], y[chunk]])
            mini.update(x[chunk], y[chunk])
    tiles = GramTiles(len(x), shifts=[x[:5].mean(0), y[:5].mean(0)])
    for p, i0 in enumerate(range(0, len(x), 60)):  # rank p % world holds block p
        if p % world == rank:
            held = [x[i0 : i0 + 60], y[i0 : i0 + 60]]
            for j0 in range(i0, len(x), 60):
                tiles.update(held, i0, [x[j0 : j0 + 60], y[j0 : j0 + 60]], j0)
    for acc in (moments, mini, tiles):
        all_reduce_accumulator(acc)
    return {
        "moments": moments.hsic_matrix(debiased=True).tolist(),
        "minibatch": mini.compute(),
        "tiles": tiles.compute(debiased=True).tolist(),
    }


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
        result = {"others": others(rank, world)}
        streaming = ["procrustes", "mean_cca", "pwcca", "linreg_r2", "svcca"]
        result |= {"biased": acc.compute(), "debiased": acc.compute(debiased=True),
                  "matrix": mat.compute(["debiased_cka"])["debiased_cka"].values.tolist(),
                  "measures": {k: v.values.tolist()
                               for k, v in mat.compute(streaming).items()}}  # fmt: skip
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
