"""Normalised momentum steps: the paper's rule, and a converging variant.

``momentum`` (the paper's, Jones et al. 2022; the ``paper`` schedule): per example

    m = momentum m + (1 - momentum) g / ||g||        (m starts at 0)
    x = constrain(x - step_size m)

for as many passes as the cap allows. It has no stop test.

``converging-momentum``: the same direction with a per-example step. The step is
``lr m / (1 - momentum^t)`` (the warm-up correction makes the first steps unit-scale);
``lr`` halves once the best loss has not gained ``decay_tol`` (relative) for
``decay_patience`` steps, down to ``min_step_size``, and stays at least ``step_size``
while the best loss is above :data:`~invsim.inversion.CONVERGED_LOSS` (a smaller step is
for precision near a solution, not for a loss that falls slowly). An example stops once it
is at the criterion with its step at the floor (at rest), or once its best loss gained
less than ``stop_tol`` (relative) over the last ``horizon`` passes.

Examples:
    >>> import torch
    >>> from invsim.inversion import invert_images
    >>> from invsim.models import load_model
    >>> _ = torch.manual_seed(0)
    >>> m, t = load_model("mlp"), torch.rand(3, 1, 28, 28)
    >>> r = invert_images(m, torch.rand(3, 1, 28, 28), t, rule="converging-momentum",
    ...                   decay_tol=0.005, horizon=20, iterations=200, progress=False)
    >>> r.config["rule"], bool((r.loss < r.initial_loss).all())
    ('converging-momentum', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from invsim.inversion.rules import (
    Rows,
    RowState,
    StepRule,
    horizon_stalled,
    register,
    rows_like,
)
from invsim.inversion.settings import (
    CONVERGED_LOSS,
    ConvergingMomentumSettings,
    MomentumSettings,
)
from invsim.steps import _TINY, l2_norm

__all__ = [
    "ConvergingMomentum",
    "ConvergingMomentumSettings",
    "Momentum",
    "MomentumSettings",
    "momentum_update",
]


def momentum_update(m: torch.Tensor, grad: torch.Tensor, momentum: float) -> None:
    """``m = momentum m + (1 - momentum) grad / ||grad||`` per example, in place."""
    scale = (1.0 - momentum) / (l2_norm(grad) + _TINY)
    m.mul_(momentum).addcmul_(grad, scale)


@dataclass
class MomentumState(RowState):
    m: torch.Tensor  # the momentum buffer, the images' shape


@register
class Momentum(StepRule):
    """The paper's rule: a fixed normalised momentum step, no stop test."""

    Settings = MomentumSettings

    def start(self, seed: torch.Tensor) -> MomentumState:
        return MomentumState(m=torch.zeros_like(seed))

    def step(self, rows: Rows, state: MomentumState) -> torch.Tensor:
        assert rows.grad is not None
        momentum_update(state.m, rows.grad, self.settings.momentum)
        return rows.constrain(torch.add(rows.x, state.m, alpha=-self.settings.step_size))


@dataclass
class ConvergingState(RowState):
    m: torch.Tensor
    lr: torch.Tensor  # the step size
    reference: torch.Tensor  # the best loss when it last gained decay_tol
    stall: torch.Tensor  # steps since then
    window: torch.Tensor  # the best loss at the start of this horizon


@register
class ConvergingMomentum(StepRule):
    """Normalised momentum with warm-up, per-example decay and the horizon stop test."""

    Settings = ConvergingMomentumSettings

    def start(self, seed: torch.Tensor) -> ConvergingState:
        k, dev, dtype = len(seed), seed.device, seed.dtype
        inf = torch.full((k,), float("inf"), device=dev, dtype=dtype)
        return ConvergingState(
            m=torch.zeros_like(seed),
            lr=torch.full((k,), self.settings.step_size, device=dev, dtype=dtype),
            reference=inf,
            stall=torch.zeros(k, dtype=torch.int64, device=dev),
            window=inf.clone(),
        )

    def observe(self, rows: Rows, state: ConvergingState) -> None:
        state.window = torch.where(rows.it == 0, rows.loss, state.window)

    def step(self, rows: Rows, state: ConvergingState) -> torch.Tensor:
        assert rows.grad is not None
        momentum = self.settings.momentum
        momentum_update(state.m, rows.grad, momentum)
        # warm-up correction: m / (1 - momentum^t) is a unit-scale direction from step 1
        warm = 1.0 - momentum ** (rows.it + 1).to(state.lr.dtype)
        return rows.constrain(rows.x - rows_like(state.lr / warm, rows.x) * state.m)

    def stop(self, rows: Rows, state: ConvergingState) -> torch.Tensor:
        cfg, best = self.settings, rows.best_loss
        gained = best < state.reference * (1.0 - cfg.decay_tol)
        state.reference = torch.where(gained, best, state.reference)
        state.stall = torch.where(gained, 0, state.stall + 1)
        decay = state.stall >= cfg.decay_patience
        state.lr = torch.where(decay, state.lr * 0.5, state.lr)
        state.stall = torch.where(decay, 0, state.stall)
        above = best > CONVERGED_LOSS
        state.lr = torch.maximum(state.lr, torch.where(above, cfg.step_size, cfg.min_step_size))
        at_rest = (state.lr <= cfg.min_step_size) & ~above
        return at_rest | horizon_stalled(rows.it, best, state.window, cfg, torch.zeros_like(above))
