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
    "run_inversion",
]

_D = InversionConfig()  # the paper's defaults, the single source of invert_images' defaults
# the convergence criterion: an example (and, by its median, a data set) whose relative
# representation loss is at most this has reached its target (docs/trust.md)
CONVERGED_LOSS = 0.1


@dataclass
class InversionResult:
    """``images``: float32 in [0, 1], the seeds' shape. ``loss``: per-example relative
    loss of the returned image. ``initial_loss``: the seed's. ``iterations``: per example,
    the gradient steps taken (fewer than asked only with ``tol``). ``passes``: the
    forward+backward image evaluations spent in all (the cost). ``config``: the settings
    that act. ``snapshots[B]``: (images, loss) as they would be with ``iterations=B``
    (each example's best iterate up to step B), for the budgets asked."""

    images: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    iterations: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    passes: int = 0
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


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
    lr: torch.Tensor  # step size (constant for the paper's schedule)
    reference: torch.Tensor  # converge: the best loss when it last gained decay_tol
    stall: torch.Tensor  # converge: steps since then
    window: torch.Tensor  # converge: the best loss at the start of this horizon

    def select(self, keep: torch.Tensor) -> _Slots:
        return _Slots(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def cat(self, other: _Slots) -> _Slots:
        return _Slots(
            **{
                f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
                for f in fields(self)
            }
        )

    def __len__(self) -> int:
        return len(self.index)


def _admit(idx: range, seeds, targets, rep, cfg: InversionConfig, dev, dtype) -> _Slots:
    """New rows for pairs ``idx``: x at the seed, zero momentum, no best yet."""
    seed = seeds[idx.start : idx.stop].to(dev, dtype)
    if cfg.channels_last and seed.ndim == 4:
        seed = seed.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        target_rep = rep(targets[idx.start : idx.stop].to(dev, dtype))
    k = len(seed)
    inf = torch.full((k,), float("inf"), device=dev, dtype=dtype)
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
        lr=torch.full((k,), cfg.step_size, device=dev, dtype=dtype),
        reference=inf.clone(),
        stall=torch.zeros(k, dtype=torch.int64, device=dev),
        window=inf.clone(),
    )


def _keep_best(s: _Slots, loss: torch.Tensor) -> None:
    """Per example, the iterate of lowest loss seen so far (strictly lower replaces)."""
    view = (-1,) + (1,) * (s.x.ndim - 1)
    fresh = s.it == 0
    s.first_loss = torch.where(fresh, loss, s.first_loss)
    s.checkpoint = torch.where(fresh, loss, s.checkpoint)  # the first tol window: from the seed
    s.window = torch.where(fresh, loss, s.window)  # the first horizon, too
    better = loss < s.best_loss
    s.best_loss = torch.where(better, loss, s.best_loss)
    s.best_x = torch.where(better.view(view), s.x, s.best_x)


def _step(s: _Slots, grad: torch.Tensor, cfg: InversionConfig, ball_binds: bool) -> None:
    """One momentum step along the per-example normalised gradient, then the projection."""
    # m = momentum * m + (1 - momentum) * g / ||g||, in place
    momentum = cfg.step_momentum
    scale = (1.0 - momentum) / (l2_norm(grad) + _TINY)
    s.m.mul_(momentum).addcmul_(grad, scale)
    if cfg.schedule == "paper":
        x_new = torch.add(s.x, s.m, alpha=-cfg.step_size)
    else:
        x_new = s.x - s.lr.view((-1,) + (1,) * (s.x.ndim - 1)) * s.m
    if ball_binds:
        s.x = project(x_new, s.seed, eps=cfg.eps, norm="l2")
    else:  # no point of [0, 1]^d is farther than sqrt(d) from the seed
        s.x = x_new.clamp_(0.0, 1.0)
    s.it += 1


def _stop_rule(s: _Slots, cfg: InversionConfig) -> None:
    """``tol``: every ``patience`` steps, an example whose best loss improved by less than
    ``tol`` since the last check takes no more steps (its current iterate is still
    evaluated). ``schedule="converge"``: see :func:`_converge`."""
    if cfg.schedule == "converge":
        _converge(s, cfg)
    if cfg.tol is None:
        return
    check = (s.it % cfg.patience == 0) & (s.it < s.limit)
    stalled = check & ((s.checkpoint - s.best_loss) < cfg.tol)
    s.limit = torch.where(stalled, s.it, s.limit)
    s.checkpoint = torch.where(check, s.best_loss, s.checkpoint)


def _converge(s: _Slots, cfg: InversionConfig) -> None:
    """The converging schedule. The step size halves once the best loss has not gained
    ``decay_tol`` (relative) for ``decay_patience`` steps, down to ``min_step_size``.
    An example stops once it has reached ``CONVERGED_LOSS`` and its step has come down to
    ``min_step_size`` (it is at rest at the criterion), or once its best loss gained less
    than ``stop_tol`` (relative) over the last ``horizon`` steps: a horizon long enough
    to see slow progress (docs/scaling.md). With ``horizon=None`` (the rule before
    invsim 0.2), it stops as soon as the step falls below ``min_step_size``."""
    gained = s.best_loss < s.reference * (1.0 - cfg.decay_tol)
    s.reference = torch.where(gained, s.best_loss, s.reference)
    s.stall = torch.where(gained, 0, s.stall + 1)
    decay = s.stall >= cfg.decay_patience
    s.lr = torch.where(decay, s.lr * 0.5, s.lr)
    s.stall = torch.where(decay, 0, s.stall)
    running = s.it < s.limit
    if cfg.horizon is None:
        s.limit = torch.where((s.lr < cfg.min_step_size) & running, s.it, s.limit)
        return
    s.lr = s.lr.clamp_min(cfg.min_step_size)
    at_rest = (s.lr <= cfg.min_step_size) & (s.best_loss <= CONVERGED_LOSS)
    check = s.it % cfg.horizon == 0
    stalled = check & (s.best_loss > s.window * (1.0 - cfg.stop_tol))
    s.window = torch.where(check, s.best_loss, s.window)
    s.limit = torch.where((at_rest | stalled) & running, s.it, s.limit)


def _loss_and_grad(rep, s: _Slots, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not need_grad:
        with torch.no_grad():
            return relative_loss(rep(s.x), s.target_rep), None
    x = s.x.detach().requires_grad_(True)
    loss = relative_loss(rep(x), s.target_rep)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    s.x = x.detach()
    return loss.detach(), grad


class _Outputs:
    """Per-pair results, filled as examples finish (in any order), and the snapshots."""

    def __init__(self, shape: torch.Size, snapshots: Sequence[int]) -> None:
        n = shape[0]
        self.images = torch.empty(shape, dtype=torch.float32)
        self.loss, self.initial = torch.empty(n), torch.empty(n)
        self.iterations = torch.empty(n, dtype=torch.int64)
        self.snapshots = {b: (torch.empty(shape), torch.empty(n)) for b in sorted(set(snapshots))}

    def snapshot(self, s: _Slots, final: bool = False) -> None:
        """Record the best iterate of the rows at a budget now (a finished row: at every
        budget from its last step on, as a run with that budget would return it)."""
        for b, (images, loss) in self.snapshots.items():
            rows = (s.it <= b) if final else (s.it == b) & (s.it < s.limit)
            if bool(rows.any()):
                images[s.index[rows.cpu()]] = s.best_x[rows].detach().float().cpu()
                loss[s.index[rows.cpu()]] = s.best_loss[rows].float().cpu()

    def finish(self, s: _Slots, last_loss: torch.Tensor, use_best: bool) -> None:
        i = s.index
        self.images[i] = (s.best_x if use_best else s.x).detach().float().cpu()
        self.loss[i] = (s.best_loss if use_best else last_loss).float().cpu()
        self.initial[i] = s.first_loss.float().cpu()
        self.iterations[i] = s.it.cpu()
        self.snapshot(s, final=True)


def _run(model, ref, seeds, targets, cfg: InversionConfig, dev, dtype, bar, hooks) -> tuple:
    """The continuously batched loop; returns (outputs, image passes)."""
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
                fresh = _admit(new, seeds, targets, rep, cfg, dev, dtype)
                slots, next_pair = (fresh if slots is None else slots.cat(fresh)), new.stop
            assert slots is not None
            loss, grad = _loss_and_grad(rep, slots, bool((slots.it < slots.limit).any()))
            passes += len(slots)
            _keep_best(slots, loss)
            if snapshots:
                out.snapshot(slots)
            done = slots.it >= slots.limit
            if bool(done.any()):
                out.finish(slots.select(done), loss[done], cfg.use_best)
                slots, grad = slots.select(~done), (grad[~done] if grad is not None else None)
            if not len(slots):
                continue
            if callback is not None:
                for t in torch.unique(slots.it).tolist():
                    callback(t, slots.x[slots.it == t])
            _step(slots, grad, cfg, ball_binds)
            _stop_rule(slots, cfg)
            bar.update(len(slots))
    return out, passes


def invert_images(
    model: nn.Module,
    seed_images: torch.Tensor | str,
    target_images: torch.Tensor,
    *,
    layer: str = _D.layer,
    step_size: float = _D.step_size,
    iterations: int = _D.iterations,
    momentum: float | None = _D.momentum,
    eps: float = _D.eps,
    use_best: bool = _D.use_best,
    batch_size: int = _D.batch_size,
    tol: float | None = _D.tol,
    patience: int = _D.patience,
    schedule: str = _D.schedule,
    decay_patience: int = _D.decay_patience,
    decay_tol: float = _D.decay_tol,
    min_step_size: float = _D.min_step_size,
    horizon: int | None = _D.horizon,
    stop_tol: float = _D.stop_tol,
    fake_relu: bool = _D.fake_relu,
    amp: bool = _D.amp,
    channels_last: bool = _D.channels_last,
    fold_bn: bool = _D.fold_bn,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    noise_seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    snapshots: Sequence[int] = (),
) -> InversionResult:
    """Invert ``target_images`` through ``model`` starting from ``seed_images``.

    The settings are the fields of :class:`~invsim.config.InversionConfig` (defaults: the
    paper's; :func:`run_inversion` takes them as one config object). Beyond the paper, all
    off by default: ``tol`` stops an example once its best loss improved by less than
    ``tol`` over the last ``patience`` iterations (it leaves the batch, and the next pair
    takes its slot); ``seed_images="noise"`` starts from uniform noise (STIR), drawn from
    ``noise_seed``; ``fake_relu`` passes gradients through the last ReLU (robustness
    library option); ``amp`` runs the forward in bfloat16 autocast on CUDA;
    ``channels_last`` and ``fold_bn`` (each batch-norm folded into its convolution, in a
    copy of the model) make the same steps faster, equal up to float rounding.
    ``callback(iteration, x)`` sees, before each step, the iterates of the examples at
    that iteration (in pair order); it is for tests and diagnostics. ``snapshots``
    (budgets B <= iterations) also returns, per B, what ``iterations=B`` would have.

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
    # the keyword form of run_inversion: these keywords are exactly InversionConfig's fields
    given = {k: v for k, v in locals().items() if k in InversionConfig.model_fields}
    cfg = InversionConfig.checked(given, where="invert_images")
    return run_inversion(model, seed_images, target_images, cfg, device=device,
                         progress=progress, noise_seed=noise_seed, callback=callback,
                         snapshots=snapshots)  # fmt: skip


def run_inversion(
    model: nn.Module,
    seed_images: torch.Tensor | str,
    target_images: torch.Tensor,
    settings: InversionConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    noise_seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    snapshots: Sequence[int] = (),
) -> InversionResult:
    """:func:`invert_images` with its settings as one :class:`InversionConfig` object: how
    a setting travels from the command line, the YAML file and the store to the loop.

    Example:
        >>> import torch
        >>> from invsim.config import InversionConfig
        >>> from invsim.inversion import run_inversion
        >>> from invsim.models import load_model
        >>> r = run_inversion(load_model("mlp"), "noise", torch.rand(2, 1, 28, 28),
        ...                   InversionConfig(iterations=5), progress=False)
        >>> r.config["iterations"]
        5
    """
    cfg = settings
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
        out, passes = _run(net, ref, seeds, target_images, cfg, dev, dtype, bar, hooks)
    return InversionResult(
        out.images,
        out.loss,
        out.initial,
        out.iterations,
        acting_settings(cfg),
        passes,
        out.snapshots,
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
    if cfg.schedule == "paper":
        for k in (
            "schedule",
            "decay_patience",
            "decay_tol",
            "min_step_size",
            "horizon",
            "stop_tol",
        ):
            del out[k]
    return out
