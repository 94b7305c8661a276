"""The inversion loop: one loop for every step rule (:mod:`invsim.inversion.rules`).

For each (seed, target) pair the loop minimises the relative representation loss

    loss_i = ||Rep(x_i) - Rep(t_i)||_2 / ||Rep(t_i)||_2

in input space from the seed, with the steps of the chosen rule. It owns what every rule
shares:

- **continuous batching**: an example that has finished leaves the batch at once and the
  next pending pair takes its slot, so every forward and backward is spent on
  unfinished examples. Every example's update depends only on itself, so results do not
  depend on ``batch_size``;
- **the best iterate**: per example, the iterate of lowest loss seen (the seed, every
  iterate and the last; a strictly lower loss replaces) is what is returned;
- **the constraints**: the L2 ball of radius ``eps`` around the seed, then [0, 1];
- **the cap** (``iterations`` passes per example) and the ``tol`` early stop; a rule's
  own stop test acts beside them;
- **eval mode**, restored afterwards, and hooks that are always removed. Resuming a killed
  run is the store's (:func:`invsim.store.invert_dataset`): each shard is one call here,
  deterministic in its inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from invsim._io import progress_bar
from invsim.config import InversionConfig
from invsim.inversion import lbfgs, momentum  # noqa: F401  (the built-in rules register)
from invsim.inversion.layout import folded, memory_format
from invsim.inversion.rules import RULES, Rows, RowState, StepRule, crossed, rows_like
from invsim.representation import eval_mode, reader, resolve_layer
from invsim.steps import project

__all__ = [
    "InversionPath",
    "InversionResult",
    "invert_images",
    "inversion_record",
    "relative_loss",
]


@dataclass
class InversionResult:
    """``images``: float32 in [0, 1], the seeds' shape. ``loss``: per-example relative
    loss of the returned image. ``initial_loss``: the seed's. ``iterations``: per example,
    the passes spent on it (fewer than the cap only where a stop test acted).
    ``passes``: the forward+backward image evaluations spent in all (the cost).
    ``config``: the record of the settings (:func:`inversion_record`).
    ``snapshots[B]``: (images, loss) as they would be with ``iterations=B`` (each
    example's best iterate up to pass B), for the budgets asked. ``path``: the inversion
    path at the settings' ``snapshot_losses`` (None without them)."""

    images: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    iterations: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    passes: int = 0
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    path: InversionPath | None = None


@dataclass
class InversionPath:
    """Each example's first iterate whose loss is at or below each level: ``levels`` (L,
    descending), ``images`` (N, L, ...) float32, ``loss`` (N, L) and ``passes`` (N, L),
    the pass at which the example reached the level. An example that never reached a
    level has NaN images and loss there, and ``passes`` -1."""

    levels: list[float]
    images: torch.Tensor
    loss: torch.Tensor
    passes: torch.Tensor

    @classmethod
    def empty(cls, levels: Sequence[float], shape: torch.Size) -> InversionPath:
        n, k = shape[0], len(levels)
        return cls(
            list(levels),
            torch.full((n, k, *shape[1:]), math.nan),
            torch.full((n, k), math.nan),
            torch.full((n, k), -1, dtype=torch.int64),
        )

    def reached(self, level: float) -> torch.Tensor:
        """Per example, whether it reached ``level`` (N,) bool."""
        if level not in self.levels:
            raise ValueError(f"no snapshots at loss {level}; this path has {self.levels}.")
        return self.passes[:, self.levels.index(level)] >= 0

    def at(self, level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(images of the examples that reached ``level``, their indices)."""
        index = self.reached(level).nonzero().squeeze(1)
        return self.images[index, self.levels.index(level)], index


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
class _Batch:
    """The examples in the batch right now, one row each (continuous batching): what the
    loop keeps, and the rule's ``state``."""

    index: torch.Tensor  # which pair each row holds (pair order is kept)
    seed: torch.Tensor
    target_rep: torch.Tensor
    x: torch.Tensor
    best_x: torch.Tensor
    best_loss: torch.Tensor
    first_loss: torch.Tensor
    it: torch.Tensor  # passes spent so far
    limit: torch.Tensor  # passes this example will take (lowered by the stop tests)
    checkpoint: torch.Tensor  # tol: the best loss at the last check (the seed's at first)
    reached: torch.Tensor  # (k, levels): the path's levels this example has reached
    state: RowState

    def select(self, keep: torch.Tensor) -> _Batch:
        return _Batch(**{f.name: _take(getattr(self, f.name), keep) for f in fields(self)})

    def cat(self, other: _Batch) -> _Batch:
        joined = {
            f.name: _join(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        }
        return _Batch(**joined)

    def __len__(self) -> int:
        return len(self.index)


def _take(a: Any, keep: torch.Tensor) -> Any:
    return a.select(keep) if isinstance(a, RowState) else a[keep]


def _join(a: Any, b: Any) -> Any:
    return a.cat(b) if isinstance(a, RowState) else torch.cat([a, b])


@dataclass
class _Job:
    """The pairs to invert (seed and target images) and how: the settings, the rule, the
    constraints, the device and the dtype the model computes in."""

    seeds: torch.Tensor
    targets: torch.Tensor
    cfg: InversionConfig
    rule: StepRule
    dev: torch.device
    dtype: torch.dtype
    constrain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _admit(idx: range, job: _Job, rep: Callable[[torch.Tensor], torch.Tensor]) -> _Batch:
    """New rows for pairs ``idx``: x at the seed, no best yet, the rule's fresh state."""
    seed = job.seeds[idx.start : idx.stop].to(job.dev, job.dtype)
    if job.cfg.channels_last and seed.ndim == 4:
        seed = seed.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        target_rep = rep(job.targets[idx.start : idx.stop].to(job.dev, job.dtype))
    k = len(seed)
    inf = torch.full((k,), float("inf"), device=job.dev, dtype=job.dtype)
    return _Batch(
        index=torch.arange(idx.start, idx.stop),
        seed=seed,
        target_rep=target_rep,
        x=seed.clone(),
        best_x=seed.clone(),
        best_loss=inf,
        first_loss=inf.clone(),
        it=torch.zeros(k, dtype=torch.int64, device=job.dev),
        limit=torch.full((k,), job.cfg.iterations, dtype=torch.int64, device=job.dev),
        checkpoint=inf.clone(),
        reached=torch.zeros(k, len(job.cfg.snapshot_losses), dtype=torch.bool, device=job.dev),
        state=job.rule.start(seed),
    )


def _constrainer(cfg: InversionConfig, width: int) -> Callable:
    """Onto the L2 ball of radius ``eps`` around the seed, then into [0, 1]; where the ball
    cannot bind (no point of [0, 1]^d is farther than sqrt(d) from the seed), the clamp."""
    if cfg.eps < math.sqrt(width):
        return lambda x, seed: project(x, seed, eps=cfg.eps, norm="l2")
    return lambda x, seed: x.clamp_(0.0, 1.0)


def _view(b: _Batch, job: _Job, loss: torch.Tensor, grad: torch.Tensor | None) -> Rows:
    """What the rule sees of the batch ``b``, with the loss and gradient at ``b.x``."""
    seed = b.seed
    constrain = lambda x: job.constrain(x, seed)  # noqa: E731
    return Rows(seed, b.x, loss, grad, b.best_x, b.best_loss, b.it, constrain)


def _keep_best(b: _Batch, loss: torch.Tensor) -> None:
    """Per example, the iterate of lowest loss seen so far (strictly lower replaces)."""
    fresh = b.it == 0
    b.first_loss = torch.where(fresh, loss, b.first_loss)
    b.checkpoint = torch.where(fresh, loss, b.checkpoint)  # the first tol window: the seed
    better = loss < b.best_loss
    b.best_loss = torch.where(better, loss, b.best_loss)
    b.best_x = torch.where(rows_like(better, b.x), b.x, b.best_x)


def _stop(b: _Batch, job: _Job, rows: Rows) -> None:
    """After a step: the rule's stop test, then ``tol`` (every ``patience`` passes, an
    example whose best loss gained less than ``tol`` since the last check stops; its
    current iterate is still evaluated)."""
    stop = job.rule.stop(rows, b.state)
    if stop is not None:
        b.limit = torch.where(stop, torch.minimum(b.it, b.limit), b.limit)
    cfg = job.cfg
    if cfg.tol is None:
        return
    check = crossed(b.it, cfg.patience) & (b.it < b.limit)
    stalled = check & ((b.checkpoint - b.best_loss) < cfg.tol)
    b.limit = torch.where(stalled, b.it, b.limit)
    b.checkpoint = torch.where(check, b.best_loss, b.checkpoint)


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

    def __init__(self, shape: torch.Size, snapshots: Sequence[int], levels: list[float]) -> None:
        n = shape[0]
        self.path = InversionPath.empty(levels, shape) if levels else None
        self.images = torch.empty(shape, dtype=torch.float32)
        self.loss, self.initial = torch.empty(n), torch.empty(n)
        self.iterations = torch.empty(n, dtype=torch.int64)
        self.snapshots = {
            b: (torch.full(shape, math.nan), torch.full((n,), math.nan))
            for b in sorted(set(snapshots))
        }

    def snapshot(self, b: _Batch, final: bool = False) -> None:
        """Record the best iterate of the rows at a budget now (a finished row: at every
        budget from its last pass on, as a run with that budget would return it)."""
        for budget, (images, loss) in self.snapshots.items():
            rows = (b.it <= budget) if final else (b.it == budget) & (b.it < b.limit)
            if bool(rows.any()):
                images[b.index[rows.cpu()]] = b.best_x[rows].detach().float().cpu()
                loss[b.index[rows.cpu()]] = b.best_loss[rows].float().cpu()

    def crossings(self, b: _Batch, loss: torch.Tensor) -> None:
        """Keep the iterate of each row whose loss is at or below a level of the path for
        the first time."""
        if self.path is None:
            return
        levels = torch.tensor(self.path.levels, device=loss.device, dtype=loss.dtype)
        new = (loss[:, None] <= levels[None]) & ~b.reached
        if not bool(new.any()):
            return
        b.reached |= new
        for r, j in new.nonzero().tolist():
            i = int(b.index[r])
            self.path.images[i, j] = b.x[r].detach().float().cpu()
            self.path.loss[i, j] = float(loss[r])
            self.path.passes[i, j] = int(b.it[r])

    def finish(self, b: _Batch, last_loss: torch.Tensor, use_best: bool) -> None:
        i = b.index
        self.images[i] = (b.best_x if use_best else b.x).detach().float().cpu()
        self.loss[i] = (b.best_loss if use_best else last_loss).float().cpu()
        self.initial[i] = b.first_loss.float().cpu()
        self.iterations[i] = b.it.cpu()
        self.snapshot(b, final=True)


def _run(model: nn.Module, ref: Any, job: _Job, bar: Any, hooks: tuple) -> tuple:
    """The continuously batched loop; returns (outputs, image passes)."""
    cfg, n = job.cfg, len(job.seeds)
    callback, snapshots = hooks
    out = _Outputs(job.seeds.shape, snapshots, cfg.snapshot_losses)
    passes, next_pair = 0, 0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.amp and job.dev.type == "cuda"
        else contextlib.nullcontext()
    )
    with reader(model, ref, fake_relu=cfg.fake_relu) as read:

        def rep(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                return read(x).to(job.dtype)

        b: _Batch | None = None
        while next_pair < n or (b is not None and len(b)):
            free = cfg.batch_size - (len(b) if b is not None else 0)
            if free > 0 and next_pair < n:
                new = range(next_pair, min(n, next_pair + free))
                fresh = _admit(new, job, rep)
                b, next_pair = (fresh if b is None else b.cat(fresh)), new.stop
            assert b is not None
            running = bool((b.it < b.limit).any())
            loss, grad = _loss_and_grad(rep, b.x, b.target_rep, running)
            passes += len(b)
            job.rule.observe(_view(b, job, loss, grad), b.state)
            out.crossings(b, loss)
            _keep_best(b, loss)
            if snapshots:
                out.snapshot(b)
            done = b.it >= b.limit
            if bool(done.any()):
                out.finish(b.select(done), loss[done], cfg.use_best)
                keep = ~done
                b, loss = b.select(keep), loss[keep]
                grad = grad[keep] if grad is not None else None
            if not len(b):
                continue
            if callback is not None:
                for t in torch.unique(b.it).tolist():
                    callback(t, b.x[b.it == t])
            b.x = job.rule.step(_view(b, job, loss, grad), b.state)
            b.it += 1
            _stop(b, job, _view(b, job, loss, grad))
            bar.update(len(b))
    return out, passes


def invert_images(
    model: nn.Module,
    seed_images: torch.Tensor | str,
    target_images: torch.Tensor,
    inversion: InversionConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    noise_seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    snapshots: Sequence[int] = (),
    **settings: Any,
) -> InversionResult:
    """Invert ``target_images`` through ``model`` starting from ``seed_images``.

    The settings are one :class:`~invsim.config.InversionConfig` (``inversion``; default:
    the paper's), with ``settings`` given as keywords applied to it
    (:meth:`InversionConfig.merged <invsim.config.InversionConfig.merged>`): loop fields
    (``iterations=100``), a named schedule (``schedule="converge"``), a rule
    (``rule="converging-momentum"``) or the chosen rule's settings (``memory=5``). An
    unknown keyword is a :class:`~invsim.config.ConfigError` naming it.

    ``schedule="paper"`` (the default) is the paper's fixed schedule, exactly: 2,000
    normalised momentum steps. ``schedule="converge"`` is the recommended fast one:
    per-example L-BFGS steps (:mod:`invsim.inversion.lbfgs`) that stop once the loss is
    at most ``loss_tol`` or stops falling; ``iterations`` is then a cap on each example's
    passes. Beyond the paper, off by default: ``tol`` stops an example once its best loss
    improved by less than ``tol`` over the last ``patience`` passes; ``fake_relu`` passes
    gradients through the last ReLU (robustness library option); ``amp`` runs the forward
    in bfloat16 autocast on CUDA; ``channels_last`` and ``fold_bn`` (each batch-norm
    folded into its convolution, in a copy of the model) make the same steps faster,
    equal up to float rounding.

    ``seed_images="noise"`` starts from uniform noise (STIR), drawn from ``noise_seed``.
    ``callback(iteration, x)`` sees, before each step, the iterates of the examples at
    that iteration (in pair order); it is for tests and diagnostics. ``snapshots``
    (budgets B <= iterations) also returns, per B, what ``iterations=B`` would have.

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
        >>> invert_images(m, "noise", targets, fast, progress=False).config["rule"]
        'lbfgs'
    """
    cfg = InversionConfig.merged(inversion, settings, where="invert_images")
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
        net, ref = folded(model, ref, probe, cfg.channels_last) if cfg.fold_bn else (model, ref)
        rule = RULES[cfg.steps.rule](cfg.steps)
        constrain = _constrainer(cfg, seeds[0].numel())
        job = _Job(seeds, target_images, cfg, rule, dev, dtype, constrain)
        out, passes = _run(net, ref, job, bar, (callback, snapshots))
    return InversionResult(
        out.images,
        out.loss,
        out.initial,
        out.iterations,
        inversion_record(cfg),
        passes,
        out.snapshots,
        out.path,
    )


def inversion_record(cfg: InversionConfig) -> dict[str, Any]:
    """The settings as a store's record and configuration hash see them: the loop's
    (``patience`` only beside ``tol``; the layouts ``channels_last`` and ``fold_bn``, which
    change no result, and ``snapshot_losses`` only when on) and the rule's
    (:meth:`RuleSettings.record <invsim.config.RuleSettings.record>`)."""
    out = cfg.model_dump(exclude={"steps"})
    if cfg.tol is None:
        del out["patience"]
    for off in ("channels_last", "fold_bn", "snapshot_losses"):  # absent when off
        if not out[off]:
            del out[off]
    return out | cfg.steps.record()
