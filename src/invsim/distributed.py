"""Scaling out with ``torch.distributed`` (torchrun): gloo on CPU, NCCL on GPU.

Never a second code path: inversion shards are assigned round-robin by rank through
:func:`invsim.store.invert_dataset`'s ``part``, and representation extraction splits the
data and all-reduces the :class:`~invsim.LinearCKA` / :class:`~invsim.LinearCKAMatrix`
moments (after a common re-shift, a plain sum). Only rank 0 prints and writes reports.

    torchrun --standalone --nproc-per-node=4 -m invsim invert model.safetensors \\
        --data mnist5k --pairs 10000 --out inv/

Without a process group, ``part=(i, k)`` (CLI: ``--shard-index i --num-shards k``) runs
one slice on its own, for SLURM job arrays; ``invsim invert --merge`` assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from invsim.store import InvertedDataset, invert_dataset, merge_manifest

__all__ = [
    "all_reduce_accumulator",
    "barrier",
    "extract_distributed",
    "extract_into_distributed",
    "init_from_env",
    "invert_distributed",
    "is_main",
    "rank_world",
]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    """A barrier across the process group; nothing without one."""
    if rank_world()[1] > 1:
        dist.barrier()


def init_from_env(device: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (idempotent).

    Uses NCCL when ``device`` is CUDA, gloo otherwise. Without torchrun's variables it
    does nothing and returns (0, 1).
    """
    if dist.is_initialized():
        return rank_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return 0, 1
    cuda = device is not None and str(device).startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return rank_world()


def invert_distributed(
    model: torch.nn.Module,
    dataset: Dataset,
    n_pairs: int,
    out_dir: str | Path,
    *,
    part: tuple[int, int] | None = None,
    **kwargs: Any,
) -> InvertedDataset | None:
    """:func:`invert_dataset`, split over the process group (or over job-array slices
    with ``part``). Every rank returns the assembled data set once all shards exist."""
    if part is not None:
        return invert_dataset(model, dataset, n_pairs, out_dir, part=part, **kwargs)
    rank, world = init_from_env(kwargs.get("device"))
    if world == 1:
        return invert_dataset(model, dataset, n_pairs, out_dir, **kwargs)
    if rank != 0:
        kwargs["progress"] = False
    if kwargs.get("device") and str(kwargs["device"]).startswith("cuda"):
        kwargs["device"] = f"cuda:{torch.cuda.current_device()}"
    # rank 0 writes dataset.json first, so every rank checks against the same file
    if rank == 0:
        invert_dataset(model, dataset, n_pairs, out_dir, part=(0, world), **kwargs)
        dist.barrier()
    else:
        dist.barrier()
        invert_dataset(model, dataset, n_pairs, out_dir, part=(rank, world), **kwargs)
    dist.barrier()
    if rank == 0:
        merge_manifest(out_dir)
    dist.barrier()
    return InvertedDataset(out_dir)


def all_reduce_accumulator(acc: Any, group: Any = None) -> Any:
    """Sum a streaming CKA accumulator over all processes, in place.

    Every process re-shifts its moments to the global mean (itself an all-reduce of n and
    the sums), so the remaining state is summed by a plain all-reduce.
    """
    rank, world = rank_world()
    if world == 1:
        return acc
    moments = acc.moments
    if moments.shift is None:
        raise ValueError(f"rank {rank} saw no data; give every process at least one batch.")
    # global mean, from n and the raw sums (shift * n + S) of every view
    n = moments.n.clone()
    raw = [sh * moments.n + s for sh, s in zip(moments.shift, moments.S, strict=True)]
    dist.all_reduce(n, group=group)
    for t in raw:
        dist.all_reduce(t, group=group)
    moments.reshift([t / n for t in raw])
    for t in moments.state_tensors():
        dist.all_reduce(t, group=group)
    return acc


def extract_into_distributed(
    models: dict[str, torch.nn.Module],
    images: torch.Tensor,
    accumulator: Any,
    **kwargs: Any,
) -> Any:
    """:func:`invsim.representation.extract_into` on this rank's strided slice of
    ``images``, then an all-reduce: every rank ends with the full-data accumulator."""
    from invsim.representation import extract_into

    rank, world = rank_world()
    if world > 1 and rank != 0:
        kwargs["progress"] = False
    extract_into(models, images[rank::world], accumulator, **kwargs)
    return all_reduce_accumulator(accumulator)


def extract_distributed(
    model: torch.nn.Module, images: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """:func:`invsim.representation.extract` split over the process group: each rank
    computes a strided slice and every rank gets the whole (n, d) result, in order."""
    from invsim.representation import extract

    rank, world = rank_world()
    if world == 1:
        return extract(model, images, **kwargs)
    if rank != 0:
        kwargs["progress"] = False
    mine = extract(model, images[rank::world], **kwargs)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    out = torch.empty(len(images), mine.shape[1], dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
