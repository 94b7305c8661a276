"""The one contract of invsim's streaming accumulators.

Every accumulator (:class:`~invsim.similarity.streaming.CrossMoments`,
:class:`~invsim.LinearCKA`, :class:`~invsim.StreamingPanel`, :class:`~invsim.MinibatchCKA`,
:class:`~invsim.similarity.layerwise.GramTiles`) has

- ``update(...)``: add a batch (its arguments are the accumulator's own);
- ``merge(other)``: add another accumulator's data, in place; returns self;
- ``compute(...)``: the value from all the data so far (it never changes the state);
- ``reset()``: forget all the data, keeping the settings;
- ``state_tensors()``: the declared state, a fixed list of float64 tensors, every one of
  them reduced by a *sum*;
- ``align(all_reduce)``: make the states of all processes summable, using the given
  in-place sum across processes (moments about a per-process shift are re-expressed
  about the global mean; the default does nothing).

:func:`invsim.distributed.all_reduce_accumulator` syncs any of them: ``align``, then one
all-reduce per state tensor.

Why not torchmetrics' ``Metric``: its states are reduced one tensor at a time, but the
exact moments are kept about a per-process shift (the only way raw sums of post-ReLU
activations keep float64 precision) and become summable only after a joint re-shift of
several states; its ``nn.Module`` base and all-gather sync would also cost a copy of
every d x d state per process. The contract above keeps torchmetrics' shape (declared
states, one sum reduction, update / merge / compute / reset) with an in-place all-reduce.

Examples:
    >>> import torch
    >>> from invsim import MinibatchCKA
    >>> a, b = MinibatchCKA(), MinibatchCKA()
    >>> x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    >>> a.update(x[:32], x[:32]); b.update(x[32:], x[32:])
    >>> round(a.merge(b).compute(), 8)
    1.0
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Accumulator"]


class Accumulator(ABC):
    """Base of the streaming accumulators: declared summed states, update / merge /
    compute / reset (see the module doc)."""

    @abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add a batch."""

    @abstractmethod
    def compute(self, *args: Any, **kwargs: Any) -> Any:
        """The value from all the data added so far."""

    @abstractmethod
    def reset(self) -> None:
        """Forget all the data, keeping the settings."""

    @abstractmethod
    def state_tensors(self) -> list[torch.Tensor]:
        """The state, in a fixed order; each tensor is summed across processes."""

    def _check_mergeable(self, other: Accumulator) -> None:
        """Raise when ``other`` cannot be added to this accumulator."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}.")

    def merge(self, other: Accumulator) -> Accumulator:
        """Add ``other``'s data (another process's, another pass's). Returns self."""
        self._check_mergeable(other)
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine += theirs.to(mine.device)
        return self

    def align(self, all_reduce: Callable[[torch.Tensor], None]) -> None:  # noqa: B027 (a hook)
        """Make this process's state summable with the others' (``all_reduce`` sums a
        tensor in place across processes). The default: the states already are."""
