"""PGD and (adversarial) training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invsim.attacks import pgd
from invsim.models import load_model
from invsim.train import accuracy, train_ladder, train_model


@pytest.mark.parametrize(("norm", "eps"), [("l2", 1.0), ("linf", 0.1)])
def test_pgd_raises_loss_and_respects_budget(trained_lenet, mnist_test, norm, eps):
    x, y = mnist_test.images[:64], mnist_test.labels[:64]
    x0 = x.clone()
    trained_lenet.train()
    adv = pgd(trained_lenet, x, y, norm=norm, eps=eps, steps=10, generator=torch.Generator())
    assert trained_lenet.training  # mode restored
    trained_lenet.eval()
    assert torch.equal(x, x0)
    with torch.no_grad():
        clean = F.cross_entropy(trained_lenet(x), y)
        attacked = F.cross_entropy(trained_lenet(adv), y)
    assert attacked > clean + 0.5
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(dim=1).values
    assert torch.all(size <= eps + 1e-5)
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_zero_budget_is_identity(trained_lenet, mnist_test):
    x, y = mnist_test.images[:4], mnist_test.labels[:4]
    assert torch.equal(pgd(trained_lenet, x, y, eps=0.0), x)
    with pytest.raises(ValueError, match="norm must be"):
        pgd(trained_lenet, x, y, norm="l1", eps=1.0)


def test_training_is_deterministic_and_saves(tmp_path, mnist_train, mnist_test):
    small = torch.utils.data.Subset(mnist_train, range(512))
    small.classes = mnist_train.classes  # type: ignore[attr-defined]
    a, ma = train_model(
        "mlp", small, epochs=1, rng_seed=5, progress=False, out=tmp_path / "a.safetensors"
    )
    b, _ = train_model("mlp", small, epochs=1, rng_seed=5, progress=False)
    c, _ = train_model("mlp", small, epochs=1, rng_seed=6, progress=False)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    back = load_model(str(tmp_path / "a.safetensors"))
    assert back.invsim_meta["training"]["rng_seed"] == 5 and back.invsim_meta["eps"] == 0.0
    assert all(torch.equal(back.state_dict()[k], sa[k]) for k in sa)
    assert ma["final_train_loss"] > 0


def test_adversarial_training_raises_robust_accuracy(tmp_path, mnist_train, mnist_test):
    attack = {"norm": "l2", "eps": 1.5, "steps": 5}
    kw = {"epochs": 2, "progress": False, "rng_seed": 0, "test_dataset": mnist_test, "eval_n": 300}
    standard, ms = train_model("mlp", mnist_train, **kw)
    robust, mr = train_model("mlp", mnist_train, adversarial=attack, **kw)
    rob_std = accuracy(standard, mnist_test, adversarial={**attack, "steps": 10}, n=300)
    assert mr["robust_acc"] > rob_std + 0.15
    assert ms["clean_acc"] > 0.85 and "robust_acc" not in ms
    assert mr["robust_eval"] == {"norm": "l2", "eps": 1.5, "steps": 20}


def test_ladder_skips_trained_models(tmp_path, mnist_train):
    small = torch.utils.data.Subset(mnist_train, range(256))
    small.classes = mnist_train.classes  # type: ignore[attr-defined]
    kw = {"epochs": 1, "progress": False, "steps": 2}
    paths = train_ladder("mlp", small, [0, 0.5], tmp_path, **kw)
    assert sorted(p.name for p in paths.values()) == [
        "mlp-l2-eps0.5.safetensors",
        "mlp-standard.safetensors",
    ]
    assert load_model(str(paths[0.5])).invsim_meta["eps"] == 0.5
    stamps = {eps: p.stat().st_mtime_ns for eps, p in paths.items()}
    train_ladder("mlp", small, [0, 0.5], tmp_path, **kw)
    assert {eps: p.stat().st_mtime_ns for eps, p in paths.items()} == stamps


def test_the_eps_ramp_grows_the_attack_linearly_then_holds(monkeypatch, mnist_test):
    import invsim.train as train

    seen = []
    real = train.pgd

    def spy(model, x, y, **kw):
        seen.append((kw["eps"], kw["step_size"]))
        return real(model, x, y, **kw)

    monkeypatch.setattr(train, "pgd", spy)
    ds = torch.utils.data.TensorDataset(mnist_test.images[:256], mnist_test.labels[:256])
    adv = {"norm": "linf", "eps": 0.3, "steps": 2, "step_size": 0.1, "ramp_epochs": 1.0}
    train_model("mlp", ds, epochs=2, batch_size=64, adversarial=adv, progress=False)
    eps = [e for e, _ in seen]
    # 4 optimiser steps an epoch: 1/4, 2/4, 3/4 and 4/4 of eps over the first, then all
    assert eps == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3, 0.3])
    assert [s / e for e, s in seen] == pytest.approx([0.1 / 0.3] * 8)  # the step scales too
