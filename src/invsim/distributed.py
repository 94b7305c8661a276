"""Scaling out with ``torch.distributed`` (torchrun): gloo on CPU, NCCL on GPU.

The primitives the stages use, never a second code path:

- :func:`invsim.store.invert_dataset` assigns inversion shards round-robin by rank;
- extraction (:mod:`invsim.experiment`) gives each rank a strided slice of the images
  and :func:`gather_strided` reassembles the whole representation, in order, on every
  rank, so the representation cache is identical everywhere;
- :func:`all_reduce_accumulator` sums any streaming accumulator (the contract of
  :mod:`invsim.similarity.accumulator`: ``align``, then a plain all-reduce per state).

Only rank 0 prints and writes results and reports.

    torchrun --standalone --nproc-per-node=4 -m invsim invert model.safetensors \\
        --data mnist5k --pairs 10000 --out inv/

Without a process group, ``part=(i, k)`` (CLI: ``--shard-index i --num-shards k``) runs
one slice on its own, for SLURM job arrays; ``invsim invert --merge`` assembles them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from invsim.similarity.accumulator import Accumulator

__all__ = [
    "all_reduce_accumulator",
    "barrier",
    "gather_strided",
    "init_from_env",
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


def all_reduce_accumulator(acc: Accumulator, group: Any = None) -> Accumulator:
    """Sum any streaming accumulator (:class:`~invsim.LinearCKA`,
    :class:`~invsim.StreamingPanel`, :class:`~invsim.MinibatchCKA`, ``CrossMoments``,
    ``GramTiles``) over all processes, in place: ``acc.align`` makes the states
    summable (moments are re-shifted to the global mean), then each state tensor is
    all-reduced. Every process then holds the single-process result. Without a process
    group it returns ``acc`` unchanged."""
    rank, world = rank_world()
    if world == 1:
        return acc

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)

    try:
        acc.align(all_reduce)
    except ValueError as err:
        raise ValueError(f"rank {rank}: {err}") from err
    for t in acc.state_tensors():
        all_reduce(t)
    return acc


def gather_strided(mine: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble rows computed as strided slices (rank r holds rows r, r + world, ...)
    into the whole (n, ...) tensor, on every rank. Without a group, ``mine`` itself."""
    rank, world = rank_world()
    if world == 1:
        return mine
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    out = torch.empty(n, *mine.shape[1:], dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
