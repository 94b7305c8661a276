"""Input-space steps shared by the inversion and the attacks.

All functions work per example on a batch (N, ...) and never modify their inputs.

Examples:
    >>> import torch
    >>> from invsim.steps import normalize_l2, project
    >>> g = torch.tensor([[3.0, 4.0]])
    >>> normalize_l2(g)
    tensor([[0.6000, 0.8000]])
    >>> project(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), eps=1.0, norm="l2")
    tensor([[1., 0.]])
"""

from __future__ import annotations

import torch

__all__ = ["l2_norm", "normalize_l2", "project", "sign_step", "l2_step"]

_TINY = 1e-12


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped (N, 1, 1, ...) for broadcasting."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


def normalize_l2(g: torch.Tensor) -> torch.Tensor:
    """Each example's gradient scaled to unit L2 norm (a zero gradient stays zero)."""
    return g / (l2_norm(g) + _TINY)


def l2_step(x: torch.Tensor, g: torch.Tensor, step_size: float) -> torch.Tensor:
    """Ascent step of length ``step_size`` along the normalised gradient."""
    return x + step_size * normalize_l2(g)


def sign_step(x: torch.Tensor, g: torch.Tensor, step_size: float) -> torch.Tensor:
    """L-inf ascent step: ``x + step_size * sign(g)``."""
    return x + step_size * g.sign()


def project(x: torch.Tensor, center: torch.Tensor, *, eps: float, norm: str = "l2") -> torch.Tensor:
    """Project onto the ``norm`` ball of radius ``eps`` around ``center``, then clamp to [0, 1]."""
    delta = x - center
    if norm == "l2":
        scale = torch.clamp(eps / (l2_norm(delta) + _TINY), max=1.0)
        delta = delta * scale
    elif norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        raise ValueError(f"norm must be 'l2' or 'linf'; got {norm!r}.")
    return (center + delta).clamp(0.0, 1.0)
