"""Standard and adversarial (Madry et al.) training, evaluation, robustness ladders."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from invsim._io import progress_bar
from invsim.attacks import pgd
from invsim.config import AdversarialConfig, TrainConfig
from invsim.models import InvsimModel, load_model, save_model
from invsim.models.folding import fold_batchnorm
from invsim.representation import eval_mode, logits

__all__ = ["accuracy", "train_ladder", "train_model"]


def _shape(dataset: Dataset) -> tuple[int, int, int]:
    x = dataset[0][0]
    return int(x.shape[0]), int(x.shape[-1]), len(getattr(dataset, "classes", [])) or 0


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    adversarial: Mapping[str, Any] | None = None,
    n: int | None = None,
    batch_size: int = 250,
    rng_seed: int = 0,
    device: str | torch.device | None = None,
) -> float:
    """Clean accuracy, or robust accuracy under PGD when ``adversarial`` gives
    ``{"norm", "eps", "steps"}``; on the first ``n`` examples when given."""
    dev = device or next((p.device for p in model.parameters()), "cpu")
    idx = range(len(dataset) if n is None else min(n, len(dataset)))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, list(idx)), batch_size=batch_size)
    g = torch.Generator().manual_seed(rng_seed)
    correct = total = 0
    attack = bool(adversarial and adversarial.get("eps", 0) > 0)
    # the attack's many passes run on a copy with folded batch-norms (the same function)
    attacked = (fold_batchnorm(model) or model) if attack else model
    with eval_mode(model, warn=False):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            if attack:
                x = pgd(attacked, x, y, generator=g, **_pgd_settings(_attack(adversarial)))
            with torch.no_grad():
                correct += int((logits(model(x)).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _attack(adv: Mapping[str, Any] | AdversarialConfig) -> dict[str, Any]:
    """The settings of an adversarial recipe, validated (:class:`AdversarialConfig`)."""
    if isinstance(adv, AdversarialConfig):
        return adv.model_dump()
    return AdversarialConfig.checked(dict(adv), where="adversarial").model_dump()


def _pgd_settings(adv: Mapping[str, Any], fraction: float = 1.0) -> dict[str, Any]:
    """:func:`~invsim.attacks.pgd`'s keywords for a validated recipe (:func:`_attack`),
    with eps and a given step scaled by ``fraction`` (the training ramp; 1: the recipe's
    own). An unset step stays unset: pgd's default follows the scaled eps."""
    out = {k: v for k, v in adv.items() if k != "ramp_epochs"}
    step = out["step_size"] and out["step_size"] * fraction
    return {**out, "eps": out["eps"] * fraction, "step_size": step}


def _ramp(adv: Mapping[str, Any], step: int, steps_per_epoch: int) -> float:
    """The fraction of eps that training uses at optimiser step ``step`` (linear ramp)."""
    ramp = float(adv.get("ramp_epochs", 0.0)) * steps_per_epoch
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


_RECIPE = set(TrainConfig.model_fields) - {"dataset", "data_options", "width"}


def train_model(
    spec: str | nn.Module,
    dataset: Dataset,
    recipe: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    test_dataset: Dataset | None = None,
    out: str | Path | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> tuple[InvsimModel, dict[str, Any]]:
    """Train a classifier on ``dataset`` with ``recipe`` (a :class:`TrainConfig`; default:
    its defaults): standard, or adversarial (Madry et al.) when ``recipe.adversarial``
    sets an eps above 0. Keywords named like a recipe field (``epochs=1``,
    ``adversarial={"norm": "linf", "eps": 0.3}``) replace it; the others (``width``,
    ``num_classes``, ...) go to the architecture.

    AdamW with a one-cycle schedule (warm-up then cosine decay). Deterministic on CPU for
    a given ``recipe.rng_seed`` (default 0). Metrics: clean test accuracy and, for robust
    models, robust test accuracy under PGD-``eval_steps`` at the training eps (on
    ``eval_n`` test images). With ``out``, saves a checkpoint that ``load_model(out)``
    restores with its metadata.

    Examples:
        >>> from invsim.config import AdversarialConfig, TrainConfig
        >>> from invsim.data import load_dataset
        >>> from invsim.train import train_model
        >>> ds = load_dataset("digits", split="train", size=28)
        >>> model, metrics = train_model("mlp", ds, TrainConfig(epochs=1), progress=False,
        ...                              test_dataset=load_dataset("digits", size=28))
        >>> metrics["clean_acc"] > 0.5
        True
    """
    changes = {k: kwargs.pop(k) for k in list(kwargs) if k in _RECIPE}
    if isinstance(changes.get("adversarial"), Mapping):
        changes["adversarial"] = _attack(changes["adversarial"])
    r = (recipe or TrainConfig()).replace(**changes) if changes else (recipe or TrainConfig())
    rng_seed = 0 if r.rng_seed is None else r.rng_seed
    if r.width is not None:
        kwargs.setdefault("width", r.width)
    torch.manual_seed(rng_seed)
    model = _build(spec, dataset, kwargs)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    adv = _attack(r.adversarial) if r.adversarial and r.adversarial.eps > 0 else None
    g = torch.Generator().manual_seed(rng_seed)
    loader = DataLoader(dataset, batch_size=r.batch_size, shuffle=True, generator=g, drop_last=True)
    t0 = time.perf_counter()
    losses = _fit(model, loader, r, adv, rng_seed, progress)
    metrics: dict[str, Any] = {
        "train_seconds": time.perf_counter() - t0,
        "epochs": r.epochs,
        "final_train_loss": float(sum(losses[-20:]) / max(len(losses[-20:]), 1)),
        "rng_seed": rng_seed,
        "adversarial": dict(adv) if adv else None,
        "dataset": getattr(dataset, "id", None),
    }
    if test_dataset is not None:
        t0 = time.perf_counter()
        metrics.update(_evaluate(model, test_dataset, adv, r, rng_seed, dev))
        metrics["eval_seconds"] = time.perf_counter() - t0  # the robust accuracy's PGD: not small
    meta = {"training": metrics, "eps": adv["eps"] if adv else 0.0, "norm": adv and adv["norm"]}
    model.invsim_meta.update(meta)
    if out is not None:
        save_model(model, out, **meta)
    return model, metrics


def _evaluate(model, test_dataset, adv, r: TrainConfig, rng_seed: int, dev) -> dict[str, Any]:
    """Clean accuracy and, for an adversarial recipe, robust accuracy at its eps."""
    out: dict[str, Any] = {"clean_acc": accuracy(model, test_dataset, n=r.eval_n, device=dev)}
    if adv is not None:
        attack = {"norm": adv["norm"], "eps": adv["eps"], "steps": r.eval_steps}
        out["robust_acc"] = accuracy(
            model, test_dataset, adversarial=attack, n=r.eval_n, device=dev, rng_seed=rng_seed
        )
        out["robust_eval"] = attack
    return out


def _build(spec: str | nn.Module, dataset: Dataset, model_kwargs: dict[str, Any]) -> InvsimModel:
    """An untrained model shaped for ``dataset`` (channels, size, classes)."""
    if isinstance(spec, nn.Module):
        return load_model(spec, **model_kwargs)
    channels, size, n_classes = _shape(dataset)
    return load_model(
        spec,
        num_classes=model_kwargs.pop("num_classes", n_classes or 10),
        in_channels=channels,
        image_size=size,
        **model_kwargs,
    )


def _fit(model, loader, r: TrainConfig, adv, rng_seed: int, progress) -> list[float]:
    """AdamW with a one-cycle schedule; adversarial examples from PGD when ``adv``."""
    epochs, lr, weight_decay = r.epochs, r.lr, r.weight_decay
    dev = next(model.parameters()).device
    steps_total = epochs * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps_total, 1), pct_start=0.15
    )
    attack_gen = torch.Generator().manual_seed(rng_seed + 1)
    losses: list[float] = []
    desc = f"train {model.invsim_meta['arch']}"
    with progress_bar(steps_total, desc, progress, unit="it") as bar:
        for _epoch in range(epochs):
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                if adv is not None:  # the model is in eval mode during the attack
                    fraction = _ramp(adv, len(losses), len(loader))
                    x = pgd(model, x, y, generator=attack_gen, **_pgd_settings(adv, fraction))
                model.train()
                loss = F.cross_entropy(logits(model(x)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def ladder_name(spec: str, eps: float, norm: str) -> str:
    return f"{spec}-{norm}-eps{eps:g}" if eps > 0 else f"{spec}-standard"


def train_ladder(
    spec: str,
    dataset: Dataset,
    eps_list: Sequence[float],
    out_dir: str | Path,
    *,
    norm: str = "l2",
    steps: int = 7,
    **train_kwargs: Any,
) -> dict[float, Path]:
    """One model per eps (0 means standard training), saved in ``out_dir``. Models already
    trained there are skipped. Returns eps -> checkpoint path."""
    out = Path(out_dir)
    paths: dict[float, Path] = {}
    for eps in eps_list:
        path = out / f"{ladder_name(spec, float(eps), norm)}.safetensors"
        if not path.exists():
            adv = {"norm": norm, "eps": float(eps), "steps": steps} if eps > 0 else None
            train_model(spec, dataset, adversarial=adv, out=path, **train_kwargs)
        paths[float(eps)] = path
    return paths
