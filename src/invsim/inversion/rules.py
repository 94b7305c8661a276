"""The step-rule protocol, the registry of rules and the named schedules.

The inversion loop (:mod:`invsim.inversion.loop`) owns what every inversion shares:
continuous batching, each example's best iterate, the constraints (the L2 ball around
the seed, the [0, 1] box), eval mode, the cap on passes and the ``tol`` early stop. A
**step rule** owns the rest: its settings, its per-example state, its step and its stop
test. Per example and per pass, the loop calls

1. ``observe(rows, state)`` with the loss and gradient at the current iterate, before
   the best iterate is updated (a rule that accepts or refuses points looks here);
2. ``step(rows, state)``: the next iterate, constrained by ``rows.constrain``;
3. ``stop(rows, state)``: after the step, the rows whose rule says they are done.

A new rule is one module: a settings class (a :class:`RuleSettings` with a ``rule``
name), a :class:`StepRule` subclass, and ``register(Rule)``. The loop does not change.

Examples:
    >>> import torch
    >>> from invsim.inversion import invert_images
    >>> from invsim.inversion.rules import RowState, RuleSettings, StepRule, register
    >>> from invsim.inversion.rules import unregister
    >>> class GDSettings(RuleSettings):
    ...     rule: str = "gradient-descent"  # in a module: Literal["gradient-descent"]
    ...     lr: float = 0.1
    >>> class GD(StepRule):
    ...     Settings = GDSettings
    ...     def step(self, rows, state):
    ...         return rows.constrain(rows.x - self.settings.lr * rows.grad)
    >>> _ = register(GD)
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(),
    ...                             torch.nn.Linear(3, 2))
    >>> r = invert_images(model, torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2),
    ...                   rule="gradient-descent", lr=0.5, iterations=5, progress=False)
    >>> r.config["rule"], r.config["lr"]
    ('gradient-descent', 0.5)
    >>> unregister("gradient-descent")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from invsim._settings import RuleSettings
from invsim.inversion.settings import (
    CONVERGED_LOSS,
    SCHEDULES,
    STEP_SETTINGS,
    HorizonSettings,
    compose_steps,
    register_settings,
)

__all__ = [
    "CONVERGED_LOSS",
    "RULES",
    "STEP_SETTINGS",
    "SCHEDULES",
    "Rows",
    "RowState",
    "RuleSettings",
    "StepRule",
    "compose_steps",
    "crossed",
    "horizon_stalled",
    "register",
    "rows_like",
    "unregister",
]


@dataclass
class Rows:
    """What the loop shows a rule of the examples in the batch (one row each): the
    ``seed``, the iterate ``x`` with its ``loss`` and ``grad`` (the gradient of the loss;
    ``None`` when no row takes another step), the best iterate ``best_x`` and its
    ``best_loss``, ``it`` (passes spent) and ``constrain`` (onto the ball and the box)."""

    seed: torch.Tensor
    x: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor | None
    best_x: torch.Tensor
    best_loss: torch.Tensor
    it: torch.Tensor
    constrain: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RowState:
    """A rule's per-example state: every field a tensor with one row per example (or an
    object with ``select`` / ``__getitem__`` and ``cat``), so that the loop can drop
    finished rows and append new ones."""

    def select(self, keep: torch.Tensor) -> RowState:
        return type(self)(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def cat(self, other: RowState) -> RowState:
        return type(self)(
            **{f.name: _cat(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a.cat(b)


@dataclass
class NoState(RowState):
    """The state of a rule that keeps none."""


class StepRule:
    """A step rule: ``Settings`` (its :class:`RuleSettings` class) and the three calls the
    loop makes. The defaults keep no state, observe nothing and never stop (the cap and
    ``tol`` still act)."""

    Settings: ClassVar[type[RuleSettings]]

    def __init__(self, settings: RuleSettings) -> None:
        self.settings = settings

    def start(self, seed: torch.Tensor) -> RowState:
        """The state of rows just admitted (their iterate is the seed; no loss yet)."""
        return NoState()

    def observe(self, rows: Rows, state: RowState) -> None:
        """Called with the loss and gradient at ``rows.x``, before the best is updated."""

    def step(self, rows: Rows, state: RowState) -> torch.Tensor:
        """The next iterate of every row (constrained with ``rows.constrain``)."""
        raise NotImplementedError

    def stop(self, rows: Rows, state: RowState) -> torch.Tensor | None:
        """After the step (``rows.it`` counts it): the rows that stop now, or ``None``."""
        return None


RULES: dict[str, type[StepRule]] = {}


def register(rule: type[StepRule]) -> type[StepRule]:
    """Add ``rule`` to :data:`RULES`, and its settings to
    :data:`~invsim.inversion.settings.STEP_SETTINGS`, under its settings' ``rule`` name
    (usable as a decorator). A name taken by another rule is an error."""
    name = rule.Settings.model_fields["rule"].default
    if name in RULES and RULES[name] is not rule:
        known = RULES[name].__name__
        raise ValueError(f"step rule {name!r} is already registered ({known}); pick another name.")
    register_settings(rule.Settings)
    RULES[name] = rule
    return rule


def unregister(name: str) -> None:
    """Remove the rule ``name`` and its settings (a rule defined for one script or test)."""
    RULES.pop(name, None)
    STEP_SETTINGS.pop(name, None)


def rows_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example (N,) tensor shaped to broadcast over images like ``like``."""
    return mask.view((-1,) + (1,) * (like.ndim - 1))


def crossed(it: torch.Tensor, every: int) -> torch.Tensor:
    """The rows whose last pass completed a multiple of ``every`` passes."""
    return (it > 0) & (it % every == 0)


def horizon_stalled(
    it: torch.Tensor,
    best_loss: torch.Tensor,
    window: torch.Tensor,
    settings: HorizonSettings,
    skip: torch.Tensor,
) -> torch.Tensor:
    """The horizon stop test, shared by the converging rules: the rows (not ``skip``) whose
    best loss gained less than ``settings.stop_tol`` (relative) over the ``settings.horizon``
    passes that end now. Each checked row starts a new horizon: ``window`` (the best loss
    at the horizon's start) is updated in place."""
    check = crossed(it, settings.horizon) & ~skip
    stalled = check & (best_loss > window * (1.0 - settings.stop_tol))
    window.copy_(torch.where(check, best_loss, window))
    return stalled
