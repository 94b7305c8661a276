"""Representation inversion (Ilyas et al. 2019), with Jones et al. (2022)'s defaults.

For each (seed, target) pair, gradient descent in input space starting at the seed makes
the model's representation of the image match its representation of the target:

    loss_i   = ||Rep(x_i) - Rep(t_i)||_2 / ||Rep(t_i)||_2        (relative L2)
    g_i      = grad of the batch loss w.r.t. x_i, scaled to unit L2 norm per example
    m_i      = 0.9 m_i + 0.1 g_i                                   (m starts at 0)
    x_i      = clamp(project_{||x - seed_i|| <= eps}(x_i - step * m_i), 0, 1)

for 2000 iterations with step 1/8 and eps 1000, keeping per example the iterate of lowest
loss seen (the seed, every iterate and the last; a strictly lower loss replaces). The
settings are :class:`invsim.config.InversionConfig`.

``schedule="converge"`` (:class:`~invsim.config.InversionConfig`) keeps the loss and sets
each example's steps and stopping itself: per-example L-BFGS steps by default
(:mod:`invsim.lbfgs`; momentum, Gauss-Newton and hybrid steps as options).

Every example's update depends only on itself (the per-example normalisation removes the
batch-mean's 1/B), so results do not depend on ``batch_size``. The loop batches
*continuously*: an example that has finished leaves the batch at once and the next
pending pair takes its slot with fresh momentum, so with early stopping every forward and
backward is spent on unfinished examples.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from invsim._io import progress_bar
from invsim.config import InversionConfig
from invsim.gauss_newton import GaussNewtonStep, free_pixels, gauss_newton_step
from invsim.lbfgs import History, curvature_ok, direction
from invsim.models.folding import fold_batchnorm
from invsim.representation import PENULTIMATE, LayerRef, eval_mode, reader, resolve_layer
from invsim.steps import _TINY, l2_norm, project

__all__ = [
    "InversionConfig",
    "InversionResult",
    "CONVERGED_LOSS",
    "acting_settings",
    "invert_images",
    "relative_loss",
]

# the convergence criterion: an example (and, by its median, a data set) whose relative
# representation loss is at most this has reached its target (docs/guides/intervals-and-nulls.md)
CONVERGED_LOSS = 0.1


@dataclass
class InversionResult:
    """``images``: float32 in [0, 1], the seeds' shape. ``loss``: per-example relative
    loss of the returned image. ``initial_loss``: the seed's. ``iterations``: per example,
    the passes spent on it (its steps, for the paper's schedule; fewer than asked only
    when a stopping rule acts). ``passes``: the forward+backward image evaluations spent
    in all (the cost; a JVP + VJP pair of a Gauss-Newton step counts as one).
    ``config``: the settings that act. ``switched``: per example, the pass at which a
    hybrid inversion went from Gauss-Newton to momentum steps (-1: it did not).
    ``snapshots[B]``: (images, loss) as they would be with ``iterations=B`` (each
    example's best iterate up to pass B), for the budgets asked."""

    images: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    iterations: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    passes: int = 0
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    switched: torch.Tensor | None = None


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


def _seed_tensor(
    seed_images: torch.Tensor | str, target_images: torch.Tensor, noise_seed: int
) -> torch.Tensor:
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
    return seed_images


@dataclass
class _Slots:
    """The examples in the batch right now, one row each (continuous batching)."""

    index: torch.Tensor  # which pair each row holds (pair order is kept)
    seed: torch.Tensor
    target_rep: torch.Tensor
    x: torch.Tensor
    m: torch.Tensor  # momentum
    best_x: torch.Tensor
    best_loss: torch.Tensor
    first_loss: torch.Tensor
    it: torch.Tensor  # steps taken so far
    limit: torch.Tensor  # steps this example will take (lowered by the stopping rule)
    checkpoint: torch.Tensor  # best loss at the last tol check (the seed's at first)
    lr: torch.Tensor  # step size (constant for the paper's); lbfgs: the step's scale (1: full)
    reference: torch.Tensor  # converge: the best loss when it last gained decay_tol
    stall: torch.Tensor  # converge: steps since then
    window: torch.Tensor  # converge: the best loss at the start of this horizon
    probe: torch.Tensor  # hybrid: the best loss at the start of this switch window
    gn: torch.Tensor  # takes Gauss-Newton steps (bool)
    switched: torch.Tensor  # hybrid: the pass it went on with momentum steps (-1: not yet)
    steps: torch.Tensor  # momentum steps taken (the warm-up correction's t)
    damping: torch.Tensor  # Gauss-Newton: relative damping
    cost: torch.Tensor  # passes of the last step (1 for a momentum step)
    best_grad: torch.Tensor  # lbfgs: the gradient of loss^2 / 2 at best_x (else (k, 0))
    history: History  # lbfgs: the curvature pairs (no slots for the other methods)

    def select(self, keep: torch.Tensor) -> _Slots:
        return _Slots(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def cat(self, other: _Slots) -> _Slots:
        return _Slots(
            **{f.name: _cat(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )

    def __len__(self) -> int:
        return len(self.index)


def _cat(a: Any, b: Any) -> Any:
    return a.cat(b) if isinstance(a, History) else torch.cat([a, b])


@dataclass
class _Job:
    """The pairs to invert (seed and target images) and how: the settings, the device
    and the dtype the model computes in."""

    seeds: torch.Tensor
    targets: torch.Tensor
    cfg: InversionConfig
    dev: torch.device
    dtype: torch.dtype


def _admit(idx: range, job: _Job, rep: Callable[[torch.Tensor], torch.Tensor]) -> _Slots:
    """New rows for pairs ``idx``: x at the seed, zero momentum, no best yet."""
    seeds, targets, cfg, dev, dtype = job.seeds, job.targets, job.cfg, job.dev, job.dtype
    seed = seeds[idx.start : idx.stop].to(dev, dtype)
    if cfg.channels_last and seed.ndim == 4:
        seed = seed.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        target_rep = rep(targets[idx.start : idx.stop].to(dev, dtype))
    k = len(seed)
    inf = torch.full((k,), float("inf"), device=dev, dtype=dtype)
    quasi_newton = cfg.step_method == "lbfgs"
    width, memory = (seed[0].numel(), cfg.memory) if quasi_newton else (0, 0)
    return _Slots(
        index=torch.arange(idx.start, idx.stop),
        seed=seed,
        target_rep=target_rep,
        x=seed.clone(),
        m=torch.zeros_like(seed),
        best_x=seed.clone(),
        best_loss=inf,
        first_loss=inf.clone(),
        it=torch.zeros(k, dtype=torch.int64, device=dev),
        limit=torch.full((k,), cfg.iterations, dtype=torch.int64, device=dev),
        checkpoint=inf.clone(),
        lr=torch.full((k,), 1.0 if quasi_newton else cfg.step_size, device=dev, dtype=dtype),
        reference=inf.clone(),
        stall=torch.zeros(k, dtype=torch.int64, device=dev),
        window=inf.clone(),
        probe=inf.clone(),
        gn=torch.full((k,), _starts_second_order(cfg), device=dev),
        switched=torch.full((k,), -1, dtype=torch.int64, device=dev),
        steps=torch.zeros(k, dtype=torch.int64, device=dev),
        damping=torch.full((k,), cfg.damping, device=dev, dtype=dtype),
        cost=torch.zeros(k, dtype=torch.int64, device=dev),
        best_grad=torch.zeros(k, width, device=dev, dtype=dtype),
        history=History.empty(k, memory=memory, width=width, device=dev, dtype=dtype),
    )


def _starts_second_order(cfg: InversionConfig) -> bool:
    """Gauss-Newton and hybrid inversions start with Gauss-Newton steps, unless the cap is
    below one step's cost (``cg_iterations + 1`` passes): then momentum steps."""
    second_order = cfg.step_method in ("gauss-newton", "hybrid")
    return second_order and cfg.iterations >= cfg.cg_iterations + 1


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example (N,) tensor shaped to broadcast over images like ``like``."""
    return mask.view((-1,) + (1,) * (like.ndim - 1))


def _keep_best(s: _Slots, loss: torch.Tensor) -> None:
    """Per example, the iterate of lowest loss seen so far (strictly lower replaces)."""
    fresh = s.it == 0
    s.first_loss = torch.where(fresh, loss, s.first_loss)
    s.checkpoint = torch.where(fresh, loss, s.checkpoint)  # the first tol window: from the seed
    s.window = torch.where(fresh, loss, s.window)  # the first horizon, too
    s.probe = torch.where(fresh, loss, s.probe)
    better = loss < s.best_loss
    s.best_loss = torch.where(better, loss, s.best_loss)
    s.best_x = torch.where(_rows(better, s.x), s.x, s.best_x)


def _curvature(s: _Slots, ev: _Evaluation) -> None:
    """L-BFGS, before :func:`_keep_best`: a row whose evaluated point has a lower loss
    than its best is accepted; its step (from the old best) and gradient change become a
    curvature pair (where ``s.y > 0``), and its next step is a full one. A row whose point
    is refused keeps its best and tries a quarter of the step; after 7 refusals in a row
    (a step of 1/4^7) its history is cleared and it starts again from a gradient step."""
    if ev.grad is None:
        return
    grad = (ev.grad * _rows(ev.loss, ev.grad)).flatten(1)  # the gradient of loss^2 / 2
    accept = ev.loss < s.best_loss
    pair = accept & torch.isfinite(s.best_loss)
    step, change = (s.x - s.best_x).flatten(1), grad - s.best_grad
    s.history.push(step, change, pair & curvature_ok(step, change))
    s.best_grad = torch.where(accept[:, None], grad, s.best_grad)
    s.lr = torch.where(accept, 1.0, s.lr * 0.25)
    reset = s.lr < 0.25**7
    s.history.clear(reset)
    s.lr = torch.where(reset, 1.0, s.lr)


def _quasi_newton(s: _Slots, cfg: InversionConfig, ball_binds: bool) -> None:
    """One L-BFGS step from each row's best iterate: ``x = best + lr d``, with ``d`` the
    L-BFGS direction (:func:`invsim.lbfgs.direction`) of its gradient on the free pixels
    (a pixel at the [0, 1] box that a descent step would push outward is held); a row
    with no curvature pair yet steps ``step_size`` along its normalised gradient (the
    paper's first step)."""
    grad = s.best_grad.view_as(s.x)
    free = free_pixels(s.best_x, grad)
    d = direction(grad * free, s.history) * free
    first = cfg.step_size / (l2_norm(d) + _TINY)
    d = torch.where(_rows(s.history.count == 0, d), d * first, d)
    s.x = _constrain(s.best_x + _rows(s.lr, d) * d, s.seed, cfg, ball_binds)
    s.cost = torch.ones_like(s.it)


def _step(s: _Slots, ev: _Evaluation, cfg: InversionConfig, ball_binds: bool) -> None:
    """One momentum step along the per-example normalised gradient, then the projection
    (the rows that take Gauss-Newton steps move in :func:`_gauss_newton` instead; with
    ``method="lbfgs"`` every row takes an L-BFGS step, :func:`_quasi_newton`)."""
    if cfg.step_method == "lbfgs":
        _quasi_newton(s, cfg, ball_binds)
        return
    # m = momentum * m + (1 - momentum) * g / ||g||, in place
    momentum, grad = cfg.step_momentum, ev.grad
    scale = (1.0 - momentum) / (l2_norm(grad) + _TINY)
    s.m.mul_(momentum).addcmul_(grad, scale)
    if cfg.schedule == "paper":
        x_new = torch.add(s.x, s.m, alpha=-cfg.step_size)
    else:  # warm-up correction: m / (1 - momentum^t) is a unit-scale direction from step 1
        warm = 1.0 - momentum ** (s.steps + 1).to(s.lr.dtype)
        x_new = s.x - _rows(s.lr / warm, s.x) * s.m
    x_new = _constrain(x_new, s.seed, cfg, ball_binds)
    if ev.gn_rows is None:
        s.x = x_new
        s.steps += 1
    else:
        s.x = torch.where(_rows(ev.gn_rows, s.x), s.x, x_new)
        s.steps += (~ev.gn_rows).long()
    s.cost = torch.ones_like(s.it)  # Gauss-Newton rows: set by _gauss_newton


def _constrain(x: torch.Tensor, seed: torch.Tensor, cfg: InversionConfig, ball_binds: bool):
    """Onto the L2 ball of radius ``eps`` around the seed, then into [0, 1]."""
    if ball_binds:
        return project(x, seed, eps=cfg.eps, norm="l2")
    return x.clamp_(0.0, 1.0)  # no point of [0, 1]^d is farther than sqrt(d) from the seed


def _gauss_newton(s: _Slots, ev: _Evaluation, rep, cfg: InversionConfig, ball_binds: bool):
    """The Gauss-Newton rows: the trial point ``x + dx`` (constrained) is taken where its
    loss is lower (the damping then falls by 3) and refused elsewhere (it rises by 4)."""
    rows, step = ev.gn_rows, ev.gn
    assert rows is not None and step is not None
    x, seed = s.x[rows], s.seed[rows]
    trial = _constrain(x + step.dx, seed, cfg, ball_binds)
    with torch.no_grad():
        trial_loss = relative_loss(rep(trial), s.target_rep[rows])
    accept = trial_loss < ev.loss[rows]
    s.x[rows] = torch.where(_rows(accept, x), trial, x)
    damping = s.damping[rows]
    s.damping[rows] = torch.where(accept, damping / 3, damping * 4).clamp(1e-8, 1e8)
    s.cost[rows] = cfg.cg_iterations + 1


def _stop_rule(s: _Slots, cfg: InversionConfig) -> None:
    """``tol``: every ``patience`` steps, an example whose best loss improved by less than
    ``tol`` since the last check takes no more steps (its current iterate is still
    evaluated). ``schedule="converge"``: see :func:`_converge`. A Gauss-Newton step that
    would pass the cap is not taken."""
    if cfg.schedule == "converge":
        _converge(s, cfg)
    running = s.it < s.limit
    over = s.gn & running & (s.it + cfg.cg_iterations + 1 > s.limit)
    s.limit = torch.where(over, s.it, s.limit)
    if cfg.tol is None:
        return
    check = _crossed(s, cfg.patience) & running
    stalled = check & ((s.checkpoint - s.best_loss) < cfg.tol)
    s.limit = torch.where(stalled, s.it, s.limit)
    s.checkpoint = torch.where(check, s.best_loss, s.checkpoint)


def _crossed(s: _Slots, every: int) -> torch.Tensor:
    """Rows whose last step passed a multiple of ``every`` passes."""
    return (s.it // every) > ((s.it - s.cost) // every)


def _converge(s: _Slots, cfg: InversionConfig) -> None:
    """The converging schedule. The step size halves once the best loss has not gained
    ``decay_tol`` (relative) for ``decay_patience`` steps, down to ``min_step_size``;
    while the best loss is above ``CONVERGED_LOSS`` it stays at least ``step_size`` (a
    smaller step is for precision near a solution, not for a loss that falls slowly).
    An example stops once it has reached ``CONVERGED_LOSS`` and its step has come down to
    ``min_step_size`` (it is at rest at the criterion), or once its best loss gained less
    than ``stop_tol`` (relative) over the last ``horizon`` passes. With
    ``method="hybrid"``, an example starts with Gauss-Newton steps and goes on with
    momentum steps once they stall (:func:`_switch`). With ``horizon=None`` (the rule
    before invsim 0.2), it stops as soon as the step falls below ``min_step_size``.
    With ``method="lbfgs"`` the steps set their own length (:func:`_curvature`): an
    example stops once its best loss is at most ``loss_tol``, or by the horizon rule."""
    running = s.it < s.limit
    if cfg.step_method == "lbfgs":
        reached = s.best_loss <= cfg.loss_tol
        s.limit = torch.where((reached | _horizon(s, cfg, reached)) & running, s.it, s.limit)
        return
    gained = s.best_loss < s.reference * (1.0 - cfg.decay_tol)
    s.reference = torch.where(gained, s.best_loss, s.reference)
    s.stall = torch.where(gained, 0, s.stall + 1)
    decay = s.stall >= cfg.decay_patience
    s.lr = torch.where(decay, s.lr * 0.5, s.lr)
    s.stall = torch.where(decay, 0, s.stall)
    if cfg.horizon is None:
        s.limit = torch.where((s.lr < cfg.min_step_size) & running, s.it, s.limit)
        return
    above = s.best_loss > CONVERGED_LOSS
    s.lr = torch.maximum(s.lr, torch.where(above, cfg.step_size, cfg.min_step_size))
    at_rest = ~s.gn & (s.lr <= cfg.min_step_size) & ~above
    switched = _switch(s, cfg, running) if cfg.step_method == "hybrid" else torch.zeros_like(above)
    s.limit = torch.where((at_rest | _horizon(s, cfg, switched)) & running, s.it, s.limit)


def _horizon(s: _Slots, cfg: InversionConfig, skip: torch.Tensor) -> torch.Tensor:
    """The rows (not ``skip``) whose best loss gained less than ``stop_tol`` (relative)
    over the horizon that ended with this step; each checked row starts a new horizon."""
    assert cfg.horizon is not None
    check = _crossed(s, cfg.horizon) & ~skip
    stalled = check & (s.best_loss > s.window * (1.0 - cfg.stop_tol))
    s.window = torch.where(check, s.best_loss, s.window)
    return stalled


def _switch(s: _Slots, cfg: InversionConfig, running: torch.Tensor) -> torch.Tensor:
    """Hybrid: a Gauss-Newton row whose best loss gained less than ``switch_tol`` over the
    last ``horizon // 4`` passes goes on with momentum steps (from zero momentum, at
    ``step_size``, its horizon starting now): Gauss-Newton steps cover the long flat
    way (a robust model's), momentum steps the last kinked stretch (ReLU, max-pool)."""
    assert cfg.horizon is not None
    every = max(1, cfg.horizon // 4)
    check = s.gn & _crossed(s, every) & running
    slow = check & (s.best_loss > s.probe * (1.0 - cfg.switch_tol))
    s.probe = torch.where(check, s.best_loss, s.probe)
    s.gn = s.gn & ~slow
    s.switched = torch.where(slow, s.it, s.switched)
    s.x = torch.where(_rows(slow, s.x), s.best_x, s.x)  # from the best iterate
    s.m = torch.where(_rows(slow, s.m), 0.0, s.m)
    s.steps = torch.where(slow, 0, s.steps)
    s.lr = torch.where(slow, cfg.step_size, s.lr)
    s.stall = torch.where(slow, 0, s.stall)
    s.reference = torch.where(slow, s.best_loss, s.reference)
    s.window = torch.where(slow, s.best_loss, s.window)
    return slow


@dataclass
class _Evaluation:
    """The loss of every row at its iterate; the gradient of the momentum rows (zero on
    the others); the Gauss-Newton step of the rows ``gn_rows`` (None: there are none)."""

    loss: torch.Tensor
    grad: torch.Tensor | None
    gn: GaussNewtonStep | None = None
    gn_rows: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> _Evaluation:
        """The rows ``keep``: they include every Gauss-Newton row (a finished row takes no
        step), so ``gn`` stays whole."""
        grad = self.grad[keep] if self.grad is not None else None
        rows = self.gn_rows[keep] if self.gn_rows is not None else None
        return _Evaluation(self.loss[keep], grad, self.gn, rows)


def _evaluate(rep, s: _Slots, cfg: InversionConfig) -> _Evaluation:
    """Every row's loss, with what its next step needs. The rows that have finished
    (their cap or their stopping rule) are only evaluated."""
    running = s.it < s.limit
    second = running & s.gn
    if not bool(second.any()):
        return _Evaluation(*_loss_and_grad(rep, s.x, s.target_rep, bool(running.any())))
    first = running & ~s.gn
    loss = torch.empty(len(s), device=s.x.device, dtype=s.best_loss.dtype)
    grad = torch.zeros_like(s.x)
    if bool(first.any()):
        loss[first], grad[first] = _loss_and_grad(rep, s.x[first], s.target_rep[first], True)
    damping, n_cg = s.damping[second], cfg.cg_iterations
    step = gauss_newton_step(rep, s.x[second], s.target_rep[second], damping, cg_iterations=n_cg)
    loss[second] = relative_loss(step.rep, s.target_rep[second])
    if not bool(running.all()):
        loss[~running], _ = _loss_and_grad(rep, s.x[~running], s.target_rep[~running], False)
    return _Evaluation(loss, grad, step, second)


def _loss_and_grad(
    rep, x: torch.Tensor, target_rep: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not need_grad:
        with torch.no_grad():
            return relative_loss(rep(x), target_rep), None
    x = x.detach().requires_grad_(True)
    loss = relative_loss(rep(x), target_rep)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


class _Outputs:
    """Per-pair results, filled as examples finish (in any order), and the snapshots."""

    def __init__(self, shape: torch.Size, snapshots: Sequence[int]) -> None:
        n = shape[0]
        self.images = torch.empty(shape, dtype=torch.float32)
        self.loss, self.initial = torch.empty(n), torch.empty(n)
        self.iterations = torch.empty(n, dtype=torch.int64)
        self.switched = torch.full((n,), -1, dtype=torch.int64)
        self.snapshots = {
            b: (torch.full(shape, math.nan), torch.full((n,), math.nan))
            for b in sorted(set(snapshots))
        }

    def snapshot(self, s: _Slots, step_cost: int, final: bool = False) -> None:
        """Record the best iterate of the rows at a budget now (a finished row: at every
        budget from its last step on, as a run with that budget would return it). A
        Gauss-Newton row (its steps cost ``step_cost``) whose next step would pass B stands
        where a run capped at B stops it."""
        for b, (images, loss) in self.snapshots.items():
            if final:
                rows = s.it <= b
            else:
                passes = (s.it == b) | (s.gn & (s.it < b) & (s.it + step_cost > b))
                rows = passes & (s.it < s.limit)
            if bool(rows.any()):
                images[s.index[rows.cpu()]] = s.best_x[rows].detach().float().cpu()
                loss[s.index[rows.cpu()]] = s.best_loss[rows].float().cpu()

    def finish(self, s: _Slots, last_loss: torch.Tensor, use_best: bool) -> None:
        i = s.index
        self.images[i] = (s.best_x if use_best else s.x).detach().float().cpu()
        self.loss[i] = (s.best_loss if use_best else last_loss).float().cpu()
        self.initial[i] = s.first_loss.float().cpu()
        self.iterations[i] = s.it.cpu()
        self.switched[i] = s.switched.cpu()
        self.snapshot(s, 0, final=True)


def _run(model: nn.Module, ref: Any, job: _Job, bar: Any, hooks: tuple) -> tuple:
    """The continuously batched loop; returns (outputs, image passes)."""
    seeds, cfg, dev, dtype = job.seeds, job.cfg, job.dev, job.dtype
    callback, snapshots = hooks
    out, n, passes, next_pair = _Outputs(seeds.shape, snapshots), len(seeds), 0, 0
    ball_binds = cfg.eps < math.sqrt(seeds[0].numel())
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.amp and dev.type == "cuda"
        else contextlib.nullcontext()
    )
    with reader(model, ref, fake_relu=cfg.fake_relu) as read:

        def rep(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                return read(x).to(dtype)

        slots: _Slots | None = None
        while next_pair < n or (slots is not None and len(slots)):
            free = cfg.batch_size - (len(slots) if slots is not None else 0)
            if free > 0 and next_pair < n:
                new = range(next_pair, min(n, next_pair + free))
                fresh = _admit(new, job, rep)
                slots, next_pair = (fresh if slots is None else slots.cat(fresh)), new.stop
            assert slots is not None
            ev = _evaluate(rep, slots, cfg)
            # a momentum step is one pass; a Gauss-Newton step counts its CG's JVP + VJP
            # pairs and one more for its forward and its trial forward
            n_gn = int(ev.gn_rows.sum()) if ev.gn_rows is not None else 0
            passes += len(slots) + cfg.cg_iterations * n_gn
            if cfg.step_method == "lbfgs":
                _curvature(slots, ev)
            _keep_best(slots, ev.loss)
            if snapshots:
                out.snapshot(slots, cfg.cg_iterations + 1)
            done = slots.it >= slots.limit
            if bool(done.any()):
                out.finish(slots.select(done), ev.loss[done], cfg.use_best)
                slots, ev = slots.select(~done), ev.select(~done)
            if not len(slots):
                continue
            if callback is not None:
                for t in torch.unique(slots.it).tolist():
                    callback(t, slots.x[slots.it == t])
            before = slots.it.clone()
            _step(slots, ev, cfg, ball_binds)
            if ev.gn is not None:
                _gauss_newton(slots, ev, rep, cfg, ball_binds)
            slots.it += slots.cost
            _stop_rule(slots, cfg)
            bar.update(int((slots.it - before).sum()))
    return out, passes


def invert_images(
    model: nn.Module,
    seed_images: torch.Tensor | str,
    target_images: torch.Tensor,
    config: InversionConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    noise_seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    snapshots: Sequence[int] = (),
    **settings: Any,
) -> InversionResult:
    """Invert ``target_images`` through ``model`` starting from ``seed_images``.

    The settings are one :class:`~invsim.config.InversionConfig` (``config``; default:
    the paper's), with any of its fields given as keywords replacing it
    (``iterations=100``, ``schedule="converge"``): the same object travels from the
    command line, the YAML file and the store to this loop. An unknown keyword is a
    :class:`~invsim.config.ConfigError` naming it.

    ``schedule="paper"`` (the default) is the paper's fixed schedule, exactly.
    ``schedule="converge"`` is the recommended fast one: per-example steps and stopping,
    with L-BFGS steps (``method="lbfgs"``, its default, :mod:`invsim.lbfgs`: an example
    stops once its loss is at most ``loss_tol`` or its loss stops falling), momentum steps,
    damped Gauss-Newton steps (:mod:`invsim.gauss_newton`) or both (``method="hybrid"``:
    Gauss-Newton steps until they stall, then momentum steps); ``iterations`` is then a cap
    on each example's passes (an L-BFGS or momentum step is one pass, a Gauss-Newton step
    ``cg_iterations + 1``). Beyond the paper, off by default: ``tol`` stops an example
    once its best loss improved by less than ``tol`` over the last ``patience`` passes;
    ``fake_relu`` passes gradients through the last ReLU (robustness library option);
    ``amp`` runs the forward in bfloat16 autocast on CUDA; ``channels_last`` and
    ``fold_bn`` (each batch-norm folded into its convolution, in a copy of the model) make
    the same steps faster, equal up to float rounding.

    ``seed_images="noise"`` starts from uniform noise (STIR), drawn from ``noise_seed``.
    ``callback(iteration, x)`` sees, before each step, the iterates of the examples at
    that iteration (in pair order); it is for tests and diagnostics. ``snapshots``
    (budgets B <= iterations) also returns, per B, what ``iterations=B`` would have.
    Examples finish at different times and leave the batch at once; the next pair takes
    the slot (continuous batching), and no example's result depends on its batch.

    The input tensors are never modified; the model is put in eval mode (with a warning
    if it was training) and restored afterwards. ``device`` moves the model there (and it
    stays there); images are moved batch by batch and results come back on the CPU. The
    computation runs in the model's dtype (float32 normally; float64 for exact checks).

    Examples:
        >>> import torch
        >>> from invsim.config import InversionConfig
        >>> from invsim.models import load_model
        >>> from invsim.inversion import invert_images
        >>> torch.manual_seed(0) and None
        >>> m = load_model("mlp")
        >>> seeds, targets = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
        >>> r = invert_images(m, seeds, targets, iterations=50, progress=False)
        >>> r.images.shape, bool((r.loss < r.initial_loss).all())
        (torch.Size([4, 1, 28, 28]), True)
        >>> fast = InversionConfig(schedule="converge", iterations=200)
        >>> invert_images(m, "noise", targets, fast, progress=False).config["method"]
        'lbfgs'
    """
    cfg = config if config is not None else InversionConfig()
    if settings:
        cfg = InversionConfig.checked({**cfg.model_dump(), **settings}, where="invert_images")
    seeds = _seed_tensor(seed_images, target_images, noise_seed)
    if device is not None:
        model = model.to(device)
    first_param = next(model.parameters(), None)
    dev = first_param.device if first_param is not None else torch.device(device or "cpu")
    # compute in the model's dtype (float32 normally; float64 for exact comparisons)
    dtype = first_param.dtype if first_param is not None else torch.float32
    total = len(seeds) * cfg.iterations
    with (
        eval_mode(model, what="inversion"),
        memory_format(model, cfg.channels_last),
        progress_bar(total, "inverting", progress, unit="it·img") as bar,
    ):
        probe = target_images[:1].to(dev, dtype)
        ref = resolve_layer(model, cfg.layer, example_input=probe)
        net, ref = _folded(model, ref, probe, cfg.channels_last) if cfg.fold_bn else (model, ref)
        hooks = (callback, snapshots)
        job = _Job(seeds, target_images, cfg, dev, dtype)
        out, passes = _run(net, ref, job, bar, hooks)
    return InversionResult(
        out.images,
        out.loss,
        out.initial,
        out.iterations,
        acting_settings(cfg),
        passes,
        out.snapshots,
        out.switched,
    )


def _folded(
    model: nn.Module, ref: LayerRef, probe: torch.Tensor, channels_last: bool
) -> tuple[nn.Module, LayerRef]:
    """``fold_bn``: a copy of the model with its batch-norms folded (the layer ``ref`` kept
    whole), checked on ``probe`` to read the same representation; else the model itself,
    with a warning."""
    folded, why = fold_batchnorm(model, keep=[ref.name]), "torch.fx cannot trace it"
    if folded is not None:
        if channels_last:
            folded.to(memory_format=torch.channels_last)
        layer = ref.name if ref.capture == "output" else PENULTIMATE
        fref = resolve_layer(folded, layer, example_input=probe)
        with torch.no_grad(), reader(model, ref) as a, reader(folded, fref) as b:
            want, got = a(probe), b(probe)
        tol = 1e-4 * float(want.abs().max().clamp_min(1e-12))
        if fref.name == ref.name and float((got - want).abs().max()) <= tol:
            return folded, fref
        why = "the folded copy reads a different representation"
    warnings.warn(
        f"fold_bn: the batch-norms of this model were not folded ({why}); the inversion "
        "runs on the model as it is (the same results, without the speed-up).",
        stacklevel=4,
    )
    return model, ref


@contextlib.contextmanager
def memory_format(model: nn.Module, channels_last: bool):
    """With ``channels_last``, the model's 4-d weights in channels-last layout for the
    block (faster convolutions on CPU; benchmarks/results/passes.json), restored afterwards."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def acting_settings(cfg: InversionConfig) -> dict[str, Any]:
    """The settings that act: ``patience`` only with ``tol``, the decay settings only with
    ``schedule="converge"`` (and ``schedule`` itself only when it is not the paper's)."""
    out = cfg.model_dump()
    out["momentum"] = cfg.step_momentum  # as records before the schedule's own momentum
    if cfg.tol is None:
        del out["patience"]
    if not cfg.channels_last:  # a layout, not a setting of the method; absent from old records
        del out["channels_last"]
    if not cfg.fold_bn:  # the same: equal up to rounding; absent from older records
        del out["fold_bn"]
    unused = {
        "momentum": _SECOND_ORDER + _QUASI_NEWTON,
        "gauss-newton": ("switch_tol",) + _QUASI_NEWTON,
        "hybrid": _QUASI_NEWTON,
        "lbfgs": _SECOND_ORDER + _FIRST_ORDER,
    }
    for k in unused[cfg.step_method]:
        del out[k]
    if cfg.schedule == "paper":
        for k in _CONVERGE:
            del out[k]
    return out


# the settings of the converging schedule, of its second-order steps, of its L-BFGS
# steps, and those of momentum steps that L-BFGS steps do not use
_SECOND_ORDER = ("switch_tol", "cg_iterations", "damping")
_QUASI_NEWTON = ("memory", "loss_tol")
_FIRST_ORDER = ("momentum", "decay_patience", "decay_tol", "min_step_size")
_CONVERGE = (
    "schedule",
    "decay_patience",
    "decay_tol",
    "min_step_size",
    "horizon",
    "stop_tol",
    "method",
)
