"""Representation inversion (Ilyas et al. 2019), with Jones et al. (2022)'s defaults.

One loop (:mod:`invsim.inversion.loop`) over step rules (:mod:`invsim.inversion.rules`):

- ``momentum`` (:mod:`invsim.inversion.momentum`), the paper's normalised momentum steps:
  the ``paper`` schedule, the default;
- ``lbfgs`` (:mod:`invsim.inversion.lbfgs`), per-example L-BFGS steps that stop at
  ``loss_tol`` and hand a stalled example to the paper's steps: the ``converge``
  schedule, the recommended fast one;
- ``converging-momentum``: normalised momentum with a per-example decaying step and stop
  test.

A new rule is one module and one :func:`~invsim.inversion.rules.register` call.

Examples:
    >>> from invsim.inversion import RULES, SCHEDULES
    >>> sorted(RULES), sorted(SCHEDULES)
    (['converging-momentum', 'lbfgs', 'momentum'], ['converge', 'paper'])
"""

from __future__ import annotations

from invsim.config import InversionConfig
from invsim.inversion import lbfgs, momentum  # noqa: F401  (registers the built-in rules)
from invsim.inversion.loop import (
    InversionResult,
    inversion_record,
    invert_images,
    relative_loss,
)
from invsim.inversion.rules import CONVERGED_LOSS, RULES, SCHEDULES, StepRule, register

__all__ = [
    "CONVERGED_LOSS",
    "InversionConfig",
    "InversionResult",
    "RULES",
    "SCHEDULES",
    "StepRule",
    "invert_images",
    "inversion_record",
    "register",
    "relative_loss",
]
