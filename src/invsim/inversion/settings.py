"""The step rules' settings, the named schedules, and where settings are merged.

Torch-free, so that the command line's help and the YAML schema load without torch. The
built-in rules' settings are defined here, and each rule names its own
(``Momentum.Settings = MomentumSettings``); a rule defined elsewhere keeps its settings in
its own module, and :func:`invsim.inversion.rules.register` adds them to
:data:`STEP_SETTINGS`.

Examples:
    >>> from invsim.inversion.settings import SCHEDULES, STEP_SETTINGS
    >>> sorted(STEP_SETTINGS), SCHEDULES["converge"].rule
    (['converging-momentum', 'lbfgs', 'momentum'], 'lbfgs')
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, ValidationError

from invsim._settings import ConfigError, RuleSettings, _message

__all__ = [
    "CONVERGED_LOSS",
    "ConvergingMomentumSettings",
    "HorizonSettings",
    "LbfgsSettings",
    "MomentumSettings",
    "SCHEDULES",
    "STEP_SETTINGS",
    "compose_steps",
    "register_settings",
]

# the convergence criterion: an example (and, by its median, a data set) whose relative
# representation loss is at most this has reached its target
# (docs/guides/intervals-and-nulls.md)
CONVERGED_LOSS = 0.1


# rule name -> the class of its settings
STEP_SETTINGS: dict[str, type[RuleSettings]] = {}


def register_settings(settings: type[RuleSettings]) -> type[RuleSettings]:
    """Add a rule's settings class to :data:`STEP_SETTINGS` under its rule name (the
    default of its ``rule`` field); another class under a taken name is an error."""
    name = settings.model_fields["rule"].default
    if not isinstance(name, str):
        raise TypeError(f"{settings.__name__} needs a default rule name (a Literal str).")
    taken = STEP_SETTINGS.get(name, settings)
    if taken is not settings:
        raise ValueError(
            f"step rule {name!r} is already registered ({taken.__name__}); pick another name."
        )
    STEP_SETTINGS[name] = settings
    return settings


@register_settings
class MomentumSettings(RuleSettings):
    """The paper's normalised momentum steps."""

    rule: Literal["momentum"] = "momentum"
    step_size: float = Field(1 / 8, gt=0, description="Length of each normalised step.")
    momentum: float = Field(
        0.9, ge=0, lt=1, description="m = momentum m + (1 - momentum) g / ||g||."
    )

    def record(self) -> dict[str, Any]:
        """Without the rule's name, when it is this rule: the record every
        paper-schedule store has, so its configuration hash stays the same."""
        out = self.model_dump()
        if out["rule"] == "momentum":
            del out["rule"]
        return out


class HorizonSettings(RuleSettings):
    """The stall test the converging rules share
    (:func:`~invsim.inversion.rules.horizon_stalled`)."""

    horizon: int = Field(250, ge=1, description="Passes over which stop_tol is checked.")
    stop_tol: float = Field(
        0.01, ge=0, description="Relative gain of the best loss over a horizon that counts."
    )


@register_settings
class ConvergingMomentumSettings(HorizonSettings):
    """Normalised momentum steps with a per-example step size and stop test."""

    rule: Literal["converging-momentum"] = "converging-momentum"
    step_size: float = Field(
        1 / 8, gt=0, description="The first step, and the smallest above the criterion."
    )
    momentum: float = Field(0.97, ge=0, lt=1, description="As the paper's, with warm-up.")
    decay_patience: int = Field(
        10, ge=1, description="Steps without a relative gain of decay_tol before halving."
    )
    decay_tol: float = Field(0.001, ge=0, description="The relative loss gain that counts.")
    min_step_size: float = Field(
        1 / 256, gt=0, description="The floor; at it, an example at the criterion stops."
    )


@register_settings
class LbfgsSettings(HorizonSettings):
    """Per-example L-BFGS steps (the ``converge`` schedule)."""

    rule: Literal["lbfgs"] = "lbfgs"
    memory: int = Field(10, ge=1, description="Curvature pairs kept per example.")
    loss_tol: float = Field(
        5e-4, gt=0, description="An example stops once its best loss is at most this."
    )
    stall: Literal["paper-steps", "stop"] = Field(
        "paper-steps",
        description="What a stalled example does: go on with the paper's normalised "
        "momentum steps from its best iterate (until they stall too), or stop.",
    )
    step_size: float = Field(
        1 / 8, gt=0, description="The first step's length, and the paper's steps' after a stall."
    )


# the named schedules: a rule and its settings
SCHEDULES: dict[str, RuleSettings] = {"paper": MomentumSettings(), "converge": LbfgsSettings()}


def compose_steps(raw: dict[str, Any], loop_fields: set[str]) -> dict[str, Any]:
    """The one place where inversion settings are merged: ``raw`` (a dict of
    :class:`~invsim.config.InversionConfig` keys) with ``schedule`` (a name of
    :data:`SCHEDULES`), ``steps`` (a rule's settings, or a dict of them), ``rule`` (a
    name of :data:`STEP_SETTINGS`) and any of the chosen rule's setting names given flat, becomes
    the loop's fields plus ``steps``, the chosen rule's settings. Later wins: the
    schedule, then ``steps``, then ``rule`` (a different rule starts from its defaults),
    then the flat settings. A setting of another rule is an error naming it."""
    out = {k: v for k, v in raw.items() if k in loop_fields}
    schedule, steps, rule = raw.get("schedule"), raw.get("steps"), raw.get("rule")
    flat = {k: v for k, v in raw.items() if k not in loop_fields | {"schedule", "steps", "rule"}}
    if schedule is not None and schedule not in SCHEDULES:
        raise ConfigError(
            f"inversion schedule {schedule!r} is unknown; choose one of {sorted(SCHEDULES)}."
        )
    base = SCHEDULES[schedule or "paper"].model_dump()
    if isinstance(steps, RuleSettings):
        steps = steps.model_dump()
    if isinstance(steps, dict):
        named = steps.get("rule", base["rule"])
        base = (base if named == base["rule"] else {"rule": named}) | steps
    elif steps is not None:
        raise ConfigError(
            f"inversion 'steps' must be a mapping of a rule's settings; got {steps!r}."
        )
    if rule is not None and rule != base["rule"]:
        base = {"rule": rule}
    name = base["rule"]
    if name not in STEP_SETTINGS:
        known = sorted(STEP_SETTINGS)
        raise ConfigError(f"inversion rule {name!r} is unknown; choose one of {known}.")
    settings_cls = STEP_SETTINGS[name]
    for key in flat:
        if key not in settings_cls.model_fields:
            raise ConfigError(_unknown(key, name, loop_fields))
    try:
        out["steps"] = settings_cls.model_validate(base | flat)
    except ValidationError as e:
        raise ConfigError(_message(e, "steps", settings_cls)) from None
    return out


def _unknown(key: str, rule: str, loop_fields: set[str]) -> str:
    """Why ``key`` is not a setting of this inversion: another rule's, or a typo."""
    owners = sorted(r for r, c in STEP_SETTINGS.items() if key in c.model_fields)
    if owners:
        return (
            f"inversion setting {key!r} is a setting of the step rule(s) {owners}, and this "
            f"inversion's rule is {rule!r} (choose the rule with rule=... or schedule=...)."
        )
    known = loop_fields | {"schedule", "rule", "steps"}
    known |= {f for c in STEP_SETTINGS.values() for f in c.model_fields}
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown inversion setting {key!r}{hint}: no loop setting or step rule has it."
