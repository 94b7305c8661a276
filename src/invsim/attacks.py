"""Untargeted PGD (Madry et al. 2018) on cross-entropy, for inputs in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from invsim.representation import eval_mode, logits
from invsim.steps import l2_step, normalize_l2, project, sign_step

__all__ = ["pgd"]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "l2",
    eps: float,
    step_size: float | None = None,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples within the ``norm`` ball of radius ``eps`` around ``x``.

    ``step_size`` defaults to ``2.5 * eps / steps``. ``random_start`` begins on the L2
    sphere of radius eps (robustness library convention) or uniformly in the L-inf box.
    The model is in eval mode during the attack and its mode is restored afterwards.
    The inputs are never modified; the result is detached and lies in [0, 1].

    Examples:
        >>> import torch
        >>> from invsim.attacks import pgd
        >>> from invsim.models import load_model
        >>> m = load_model("mlp")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> adv = pgd(m, x, y, eps=0.5, steps=3)
        >>> bool(((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())
        True
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf'; got {norm!r}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}.")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    step = step_size if step_size is not None else 2.5 * eps / steps
    with eval_mode(model, warn=False):
        if random_start:
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            if norm == "l2":
                start = x + eps * normalize_l2(noise)
            else:
                start = x + eps * (2 * torch.rand(x.shape, generator=generator).to(x.device) - 1)
            x_adv = project(start, x, eps=eps, norm=norm)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(logits(model(x_adv)), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                moved = l2_step(x_adv, grad, step) if norm == "l2" else sign_step(x_adv, grad, step)
                x_adv = project(moved, x, eps=eps, norm=norm)
    return x_adv.detach()
