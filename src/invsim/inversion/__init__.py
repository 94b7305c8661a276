"""Representation inversion (Ilyas et al. 2019), with Jones et al. (2022)'s defaults.

One loop (:mod:`invsim.inversion.loop`) over step rules (:mod:`invsim.inversion.rules`):

- ``momentum`` (:mod:`invsim.inversion.momentum`), the paper's normalised momentum steps:
  the ``paper`` schedule, the default;
- ``lbfgs`` (:mod:`invsim.inversion.lbfgs`), per-example L-BFGS steps that stop at
  ``loss_tol`` and hand a stalled example to the paper's steps: the ``converge``
  schedule, the recommended fast one;
- ``converging-momentum``: normalised momentum with a per-example decaying step and stop
  test.

The rules' settings and the schedules are :mod:`invsim.inversion.settings` (torch-free).
A new rule is one module and one :func:`~invsim.inversion.rules.register` call. The
names below are imported on first use, so that the settings load without torch.

Examples:
    >>> from invsim.inversion import RULES, SCHEDULES
    >>> sorted(RULES), sorted(SCHEDULES)
    (['converging-momentum', 'lbfgs', 'momentum'], ['converge', 'paper'])
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it (imported on first access, after the loop,
# which registers the built-in rules)
_LAZY: dict[str, str] = {
    "CONVERGED_LOSS": "invsim.inversion.settings",
    "SCHEDULES": "invsim.inversion.settings",
    "InversionConfig": "invsim.config",
    "InversionPath": "invsim.inversion.loop",
    "InversionResult": "invsim.inversion.loop",
    "invert_images": "invsim.inversion.loop",
    "inversion_record": "invsim.inversion.loop",
    "relative_loss": "invsim.inversion.loop",
    "RULES": "invsim.inversion.rules",
    "StepRule": "invsim.inversion.rules",
    "register": "invsim.inversion.rules",
    "unregister": "invsim.inversion.rules",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'invsim.inversion' has no attribute {name!r}")
    importlib.import_module("invsim.inversion.loop")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
