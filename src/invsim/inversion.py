"""Representation inversion (Ilyas et al. 2019), with Jones et al. (2022)'s defaults.

For each (seed, target) pair, gradient descent in input space starting at the seed makes
the model's representation of the image match its representation of the target:

    loss_i   = ||Rep(x_i) - Rep(t_i)||_2 / ||Rep(t_i)||_2        (relative L2)
    g_i      = grad of the batch loss w.r.t. x_i, scaled to unit L2 norm per example
    m_i      = 0.9 m_i + 0.1 g_i                                   (m starts at 0)
    x_i      = clamp(project_{||x - seed_i|| <= eps}(x_i - step * m_i), 0, 1)

for 2000 iterations with step 1/8 and eps 1000, keeping per example the iterate of lowest
loss seen (the seed, every iterate and the last; a strictly lower loss replaces).

Every example's update depends only on itself (the per-example normalisation removes the
batch-mean's 1/B), so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from invsim.representation import PENULTIMATE, eval_mode, reader, resolve_layer
from invsim.steps import _TINY, l2_norm, project

__all__ = ["PAPER_DEFAULTS", "InversionResult", "invert_images", "relative_loss"]

PAPER_DEFAULTS: dict[str, Any] = {
    "step_size": 1 / 8,
    "iterations": 2000,
    "momentum": 0.9,
    "eps": 1000.0,
    "use_best": True,
    "batch_size": 32,
}


@dataclass
class InversionResult:
    """``images``: float32 in [0, 1], the seeds' shape. ``loss``: per-example relative
    loss of the returned image. ``initial_loss``: the seed's. ``iterations``: per example,
    the iterations run (fewer than asked only with ``tol``)."""

    images: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    iterations: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)


def relative_loss(rep: torch.Tensor, target_rep: torch.Tensor) -> torch.Tensor:
    """Per-example ``||rep - target||_2 / ||target||_2``."""
    return (rep - target_rep).norm(dim=1) / target_rep.norm(dim=1).clamp_min(1e-12)


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of images (N, C, H, W); got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"{name} must be a batch of images (N, C, H, W); got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; images must be finite values in [0, 1].")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{name} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]; invsim models take "
            "unnormalised images in [0, 1] (normalisation happens inside the model)."
        )


def invert_images(
    model: nn.Module,
    seed_images: torch.Tensor | str,
    target_images: torch.Tensor,
    *,
    layer: str = PENULTIMATE,
    step_size: float = 1 / 8,
    iterations: int = 2000,
    momentum: float = 0.9,
    eps: float = 1000.0,
    use_best: bool = True,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    tol: float | None = None,
    patience: int = 100,
    noise_seed: int = 0,
    fake_relu: bool = False,
    amp: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> InversionResult:
    """Invert ``target_images`` through ``model`` starting from ``seed_images``.

    The defaults are the paper's (see the module docstring). Beyond the paper, all off by
    default: ``tol`` freezes an example once its best loss improved by less than ``tol``
    over the last ``patience`` iterations, and ends a batch when all are frozen;
    ``seed_images="noise"`` starts from uniform noise (STIR), drawn from ``noise_seed``;
    ``fake_relu`` passes gradients through the last ReLU (robustness library option);
    ``amp`` runs the forward in bfloat16 autocast on CUDA. ``callback(iteration, x)`` is
    for tests and diagnostics.

    The input tensors are never modified; the model is put in eval mode (with a warning
    if it was training) and restored afterwards. ``device`` moves the model there (and it
    stays there); images are moved batch by batch and results come back on the CPU. The
    computation runs in the model's dtype (float32 normally; float64 for exact checks).

    Example:
        >>> import torch
        >>> from invsim.models import load_model
        >>> from invsim.inversion import invert_images
        >>> torch.manual_seed(0) and None
        >>> m = load_model("mlp")
        >>> seeds, targets = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
        >>> r = invert_images(m, seeds, targets, iterations=50, progress=False)
        >>> r.images.shape, bool((r.loss < r.initial_loss).all())
        (torch.Size([4, 1, 28, 28]), True)
    """
    _check_images(target_images, "target_images")
    if isinstance(seed_images, str):
        if seed_images != "noise":
            raise ValueError(f"seed_images must be a tensor or 'noise'; got {seed_images!r}.")
        g = torch.Generator().manual_seed(noise_seed)
        seed_images = torch.rand(target_images.shape, generator=g)
    _check_images(seed_images, "seed_images")
    if seed_images.shape != target_images.shape:
        raise ValueError(
            f"seed_images {tuple(seed_images.shape)} and target_images "
            f"{tuple(target_images.shape)} must have the same shape (one seed per target)."
        )
    if iterations < 0 or step_size <= 0 or eps <= 0 or not 0 <= momentum < 1 or batch_size < 1:
        raise ValueError(
            "need iterations >= 0, step_size > 0, eps > 0, 0 <= momentum < 1, batch_size >= 1; "
            f"got {iterations}, {step_size}, {eps}, {momentum}, {batch_size}."
        )
    if device is not None:
        model = model.to(device)
    first_param = next(model.parameters(), None)
    dev = first_param.device if first_param is not None else torch.device(device or "cpu")
    # compute in the model's dtype (float32 normally; float64 for exact comparisons)
    dtype = first_param.dtype if first_param is not None else torch.float32
    n = len(seed_images)
    images = torch.empty(seed_images.shape, dtype=torch.float32)
    losses = torch.empty(n)
    initial = torch.empty(n)
    used = torch.empty(n, dtype=torch.int64)

    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    bar = tqdm(total=n * iterations, desc="inverting", unit="it·img", disable=disable, leave=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model, what="inversion"))
        stack.enter_context(bar)
        ref = resolve_layer(model, layer, example_input=target_images[:1].to(dev))
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if amp and dev.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

        read = stack.enter_context(reader(model, ref, fake_relu=fake_relu))

        def rep(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                return read(x).to(dtype)

        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            seed = seed_images[sl].to(dev, dtype)
            with torch.no_grad():
                target_rep = rep(target_images[sl].to(dev, dtype))
            x = seed.clone()
            m = torch.zeros_like(x)
            best_x = seed.clone()
            best_loss = torch.full((len(x),), float("inf"), device=dev, dtype=dtype)
            frozen = torch.zeros(len(x), dtype=torch.bool, device=dev)
            steps_run = torch.zeros(len(x), dtype=torch.int64, device=dev)
            checkpoint_loss = None
            first = None
            view = (-1,) + (1,) * (x.ndim - 1)
            ball_binds = eps < math.sqrt(x[0].numel())
            for it in range(iterations + 1):
                x.requires_grad_(True)
                if it < iterations:
                    loss = relative_loss(rep(x), target_rep)
                    (grad,) = torch.autograd.grad(loss.sum(), x)
                else:  # the last iterate: evaluate only
                    with torch.no_grad():
                        loss = relative_loss(rep(x), target_rep)
                x = x.detach()
                loss = loss.detach()
                if first is None:
                    first = loss.clone()
                better = loss < best_loss
                torch.where(better, loss, best_loss, out=best_loss)
                torch.where(better.view(view), x, best_x, out=best_x)
                if it == iterations:
                    break
                if callback is not None:
                    callback(it, x)
                # m = momentum * m + (1 - momentum) * g / ||g||, in place
                scale = (1.0 - momentum) / (l2_norm(grad) + _TINY)
                m.mul_(momentum).addcmul_(grad, scale)
                x_new = torch.add(x, m, alpha=-step_size)
                if ball_binds:
                    x_new = project(x_new, seed, eps=eps, norm="l2")
                else:  # no point of [0, 1]^d is farther than sqrt(d) from the seed
                    x_new.clamp_(0.0, 1.0)
                if tol is not None:
                    x_new = torch.where(frozen.view(view), x, x_new)
                    steps_run += (~frozen).long()
                    if (it + 1) % patience == 0:
                        if checkpoint_loss is not None:
                            frozen |= (checkpoint_loss - best_loss) < tol
                        checkpoint_loss = best_loss.clone()
                        if bool(frozen.all()):
                            x = x_new
                            bar.update(len(x) * (iterations - it - 1))
                            with torch.no_grad():
                                loss = relative_loss(rep(x), target_rep)
                            better = loss < best_loss
                            torch.where(better, loss, best_loss, out=best_loss)
                            torch.where(better.view(view), x, best_x, out=best_x)
                            break
                x = x_new
                bar.update(len(x))
            if tol is None:
                steps_run.fill_(iterations)
            out_x, out_loss = (best_x, best_loss) if use_best else (x, loss)
            images[sl] = out_x.detach().float().cpu()
            losses[sl] = out_loss.float().cpu()
            initial[sl] = first.float().cpu()
            used[sl] = steps_run.cpu()
    config = {
        "layer": layer,
        "step_size": step_size,
        "iterations": iterations,
        "momentum": momentum,
        "eps": eps,
        "use_best": use_best,
        "tol": tol,
        "patience": patience if tol is not None else None,
        "fake_relu": fake_relu,
        "amp": amp,
    }
    return InversionResult(images, losses, initial, used, config)
