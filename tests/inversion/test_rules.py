"""Step rules: the protocol (a toy rule plugs in), the settings and their records, the
L-BFGS hand-over to the paper's steps, and kill -9 then resume for every rule."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Literal

import pytest
import torch
from torch import nn

from invsim._io import json_bytes
from invsim.config import ConfigError, InversionConfig
from invsim.inversion import RULES, SCHEDULES, inversion_record, invert_images
from invsim.inversion.rules import RowState, RuleSettings, StepRule, register, unregister


class PlainSettings(RuleSettings):
    rule: Literal["plain-gd"] = "plain-gd"
    lr: float = 0.1


class PlainGD(StepRule):
    """Plain gradient descent: x = x - lr g, no state, no stop test."""

    Settings = PlainSettings

    def step(self, rows, state: RowState) -> torch.Tensor:
        return rows.constrain(rows.x - self.settings.lr * rows.grad)


@pytest.fixture
def plain_gd():
    register(PlainGD)
    try:
        yield PlainGD
    finally:
        unregister("plain-gd")


class _Linear(nn.Module):
    def __init__(self, d: int = 12, k: int = 5) -> None:
        super().__init__()
        self.rep = nn.Linear(d, k)
        self.head = nn.Linear(k, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.rep(x.flatten(1))))


def test_a_toy_rule_plugs_in_and_the_loop_runs_it_exactly(plain_gd):
    torch.manual_seed(0)
    model = _Linear().double().eval()
    gen = torch.Generator().manual_seed(1)
    seeds = torch.rand(3, 1, 1, 12, generator=gen, dtype=torch.float64)
    targets = torch.rand(3, 1, 1, 12, generator=gen, dtype=torch.float64)
    r = invert_images(
        model, seeds, targets, rule="plain-gd", lr=0.05, iterations=15, batch_size=2, progress=False
    )
    assert r.config["rule"] == "plain-gd" and r.config["lr"] == 0.05

    def rep(x):
        return torch.relu(model.rep(x.flatten(1)))

    for i in range(3):  # by hand: plain steps, the best iterate kept
        x, t = seeds[i : i + 1].clone(), rep(targets[i : i + 1]).detach()
        best, best_loss = None, float("inf")
        for it in range(16):
            x = x.detach().requires_grad_(True)
            loss = (rep(x) - t).norm() / t.norm()
            if loss.item() < best_loss:
                best, best_loss = x.detach().clone(), loss.item()
            if it == 15:
                break
            (g,) = torch.autograd.grad(loss, x)
            x = (x - 0.05 * g).clamp(0, 1)
        assert torch.allclose(r.images[i].double(), best[0], atol=1e-12)
        assert r.loss[i].item() == pytest.approx(best_loss, abs=1e-6)


def test_a_rule_name_is_registered_once(plain_gd):
    class Other(StepRule):
        Settings = PlainSettings

    with pytest.raises(ValueError, match="'plain-gd' is already registered"):
        register(Other)


def test_schedules_are_named_compositions_of_a_rule_and_its_settings():
    assert InversionConfig().steps == SCHEDULES["paper"] and InversionConfig().schedule == "paper"
    fast = InversionConfig(schedule="converge")
    assert fast.steps == SCHEDULES["converge"] and fast.steps.rule == "lbfgs"
    assert fast.replace(memory=5).steps.memory == 5  # a setting refines the rule's
    assert fast.replace(memory=5).schedule is None  # and it is no longer the named one
    # a new rule starts from its own defaults; a new schedule replaces the steps
    moved = fast.replace(memory=5, iterations=10).replace(rule="converging-momentum")
    assert moved.steps == RULES["converging-momentum"].Settings() and moved.iterations == 10
    assert moved.replace(schedule="paper").steps == SCHEDULES["paper"]
    # YAML's nested form and the flat keywords are one thing
    nested = InversionConfig.checked({"steps": {"rule": "lbfgs", "memory": 3}})
    assert nested == InversionConfig(schedule="converge", memory=3)


def test_a_setting_of_another_rule_is_named_not_ignored():
    with pytest.raises(
        ConfigError,
        match=r"'memory' is a setting of the step rule\(s\) "
        r"\['lbfgs'\], and this inversion's rule is 'momentum'",
    ):
        InversionConfig.checked({"memory": 5})
    with pytest.raises(ConfigError, match="unknown inversion setting 'warp'"):
        InversionConfig.checked({"schedule": "converge", "warp": 2})
    with pytest.raises(ConfigError, match="schedule 'fast' is unknown"):
        InversionConfig.checked({"schedule": "fast"})
    with pytest.raises(ConfigError, match="rule 'adam' is unknown"):
        InversionConfig.checked({"rule": "adam"})
    with pytest.raises(ConfigError, match="stall"):
        InversionConfig.checked({"schedule": "converge", "stall": "sometimes"})
    # the settings object carries no field that does nothing
    dumped = InversionConfig(schedule="converge").model_dump()
    assert set(dumped["steps"]) == set(RULES["lbfgs"].Settings.model_fields)
    assert "momentum" not in dumped and "memory" not in dumped


# the paper schedule's record and its hash as every earlier invsim wrote them: stores made
# then still resume (the hash is the store's, of the record's canonical JSON)
PAPER_RECORDS = [
    ({}, "1e382b39efd0ddcf"),
    (
        {"tol": 0.01, "patience": 50, "iterations": 300, "batch_size": 7, "channels_last": True},
        "2ec10b89cf70707a",
    ),
]


@pytest.mark.parametrize("settings,digest", PAPER_RECORDS)
def test_the_paper_schedules_record_and_hash_are_unchanged(settings, digest):
    record = inversion_record(InversionConfig(**settings))
    assert record["step_size"] == 0.125 and record["momentum"] == 0.9 and "rule" not in record
    assert hashlib.sha256(json_bytes(record)).hexdigest()[:16] == digest


def test_a_stalled_lbfgs_example_goes_on_with_the_papers_steps_from_its_best_iterate():
    torch.manual_seed(0)
    model = _Linear(16, 6).double().eval()
    gen = torch.Generator().manual_seed(3)
    seeds = torch.rand(2, 1, 1, 16, generator=gen, dtype=torch.float64)
    targets = torch.rand(2, 1, 1, 16, generator=gen, dtype=torch.float64)
    # stop_tol 1e9: every horizon "stalls", so the hand-over comes at pass 10 and the
    # paper's steps stop at their own first horizon, pass 20
    kw = {
        "schedule": "converge",
        "iterations": 100,
        "horizon": 10,
        "stop_tol": 1e9,
        "loss_tol": 1e-12,
        "progress": False,
    }
    stopped = invert_images(model, seeds, targets, stall="stop", **kw)
    handed = invert_images(model, seeds, targets, **kw)
    assert stopped.iterations.tolist() == [10, 10] and handed.iterations.tolist() == [20, 20]
    # what the hand-over does: 10 of the paper's steps from the stalled best iterate
    paper = invert_images(model, stopped.images.double(), targets, iterations=10, progress=False)
    assert torch.allclose(handed.images.double(), paper.images.double(), atol=1e-9)
    assert torch.allclose(handed.loss, paper.loss, atol=1e-7)
    assert bool((handed.loss <= stopped.loss).all())


CHILD = textwrap.dedent(
    """
    import sys, torch
    from invsim.data import load_dataset
    from invsim.models import load_model
    from invsim.store import invert_dataset
    import json
    settings = json.loads(sys.argv[3])
    ds = load_dataset("mnist5k", split="test")
    invert_dataset(load_model(sys.argv[1]), ds, 12, sys.argv[2], shard_size=2, rng_seed=1,
                   progress=False, **settings)
    """
)

RULE_SETTINGS = {
    "momentum": {"iterations": 150},
    "converging-momentum": {
        "iterations": 150,
        "rule": "converging-momentum",
        "horizon": 20,
        "decay_patience": 3,
        "decay_tol": 0.1,
        "stop_tol": 0.1,
    },
    "lbfgs": {  # with the inversion path kept, which the shards store
        "iterations": 150,
        "schedule": "converge",
        "horizon": 20,
        "stop_tol": 0.1,
        "loss_tol": 0.05,
        "snapshot_losses": [0.5, 0.2],
    },
}


@pytest.mark.parametrize("rule", sorted(RULE_SETTINGS))
def test_kill_9_then_resume_is_byte_identical_for_every_rule(
    tmp_path, mnist_test, store_files, rule
):
    import json

    from invsim.models import save_model
    from invsim.store import InvertedDataset, StoreError, invert_dataset

    torch.manual_seed(0)
    model = load_lenet()
    path = tmp_path / "lenet.safetensors"
    save_model(model, path)
    settings = RULE_SETTINGS[rule]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(killed), json.dumps(settings)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "shards").glob("*.safetensors")):
            assert child.poll() is None, "the child ended before writing a shard"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(StoreError, match="incomplete"):
        InvertedDataset(killed)
    from invsim.models import load_model

    again = load_model(str(path))
    kw = {"shard_size": 2, "rng_seed": 1, "progress": False, **settings}
    resumed = invert_dataset(again, mnist_test, 12, killed, **kw)
    whole = invert_dataset(again, mnist_test, 12, tmp_path / "whole", **kw)
    assert store_files(killed) == store_files(tmp_path / "whole")
    assert torch.equal(resumed.images, whole.images)
    if "snapshot_losses" in settings:  # the path is in the shards, resumed with them
        assert torch.equal(resumed.path.passes, whole.path.passes)
        assert int((resumed.path.passes >= 0).sum()) > 0


def load_lenet():
    from invsim.models import load_model

    return load_model("lenet")


def _cnn3(width: int = 8) -> nn.Module:
    """Three conv/ReLU/max-pool stages and a ReLU representation: a kinked landscape."""
    stages, cin = [], 1
    for cout in (width, 2 * width, 4 * width):
        stages += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    head = [nn.Flatten(), nn.Linear(cin * 9, 64), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*stages, *head)


@pytest.mark.slow
def test_on_a_kinked_cnn_the_converge_schedule_reaches_the_papers_loss(mnist_test):
    from invsim.data import load_dataset
    from invsim.data.pairs import sample_pairs
    from invsim.train import train_model

    train = load_dataset("mnist5k", split="train")
    model, _ = train_model(_cnn3(), train, epochs=2, progress=False, in_channels=1)
    s, t = sample_pairs(mnist_test.labels.numpy(), 12, rng_seed=0)
    seeds, targets = mnist_test.images[s], mnist_test.images[t]
    kw = {"iterations": 400, "batch_size": 12, "progress": False}
    paper = invert_images(model, seeds, targets, **kw)
    fast = invert_images(model, seeds, targets, schedule="converge", **kw)
    stopped = invert_images(model, seeds, targets, schedule="converge", stall="stop", **kw)
    assert float(fast.loss.median()) <= float(paper.loss.median())
    assert fast.passes < paper.passes
    # the hand-over only adds steps from each example's best iterate: never worse
    assert bool((fast.loss <= stopped.loss).all())


def test_the_settings_and_schedules_load_without_torch():
    code = (
        "import sys\n"
        "from invsim.config import InversionConfig, validate\n"
        "cfg = InversionConfig(schedule='converge', memory=5)\n"
        "assert cfg.steps.rule == 'lbfgs' and cfg.schedule is None\n"
        "assert 'torch' not in sys.modules, 'the settings imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
