"""One source for every setting: the typed groups against the functions, the CLI, YAML."""

from __future__ import annotations

import inspect
import json

import pytest

from invsim.cli import invert as invert_command
from invsim.cli import train as train_command
from invsim.config import (
    ConfigError,
    ExperimentConfig,
    InversionConfig,
    TrainConfig,
    validate,
)
from invsim.inversion import invert_images
from invsim.store import invert_dataset
from invsim.train import train_model

MINIMAL = {"out": "x", "data": {"dataset": "mnist5k"},
           "models": [{"name": "a", "spec": "mlp", "train": {}}]}  # fmt: skip


def _cli_defaults(command) -> dict:
    return {p.name: p.default for p in command.params}


def test_inversion_defaults_have_one_source():
    paper = InversionConfig()
    steps = paper.steps
    assert (steps.rule, steps.step_size, steps.momentum) == ("momentum", 1 / 8, 0.9)
    assert (paper.iterations, paper.eps) == (2000, 1000)
    # the converging-momentum rule has its own momentum
    assert paper.replace(rule="converging-momentum").steps.momentum == 0.97
    assert paper.replace(rule="converging-momentum", momentum=0.9).steps.momentum == 0.9
    assert (paper.batch_size, paper.use_best, paper.tol) == (32, True, None)
    cli = _cli_defaults(invert_command)
    yaml_defaults = validate(MINIMAL).inversion
    for name, field in InversionConfig.model_fields.items():
        if name == "snapshot_losses":  # --snapshot-loss, repeated
            assert field.default_factory() == [] and "snapshot_losses" in cli
            continue
        if name == "steps":  # by name: --schedule, --rule, --rule-setting NAME=VALUE
            assert (cli["schedule"], cli["rule"]) == (None, None) and "step_settings" in cli
            assert yaml_defaults.steps == steps
            continue
        assert cli[name] == field.default, name
        assert getattr(yaml_defaults, name) == field.default, name
    # invert_images and invert_dataset take the settings under one keyword, `inversion`
    # (default: the paper's), and any setting by name; nothing else travels as one
    for fn in (invert_images, invert_dataset):
        signature = inspect.signature(fn).parameters
        assert signature["inversion"].default is None
        assert signature["settings"].kind is inspect.Parameter.VAR_KEYWORD
    runtime = {"model", "seed_images", "target_images", "inversion", "device", "progress",
               "noise_seed", "snapshots", "callback", "settings"}  # fmt: skip
    assert set(inspect.signature(invert_images).parameters) == runtime


def test_training_defaults_have_one_source():
    from invsim.cli import TRAIN_FIELDS
    from invsim.cli import similarity as similarity_command
    from invsim.config import AdversarialConfig, DataConfig, InversionSection

    # train_model takes a TrainConfig: no recipe default is written in its signature
    signature = inspect.signature(train_model).parameters
    assert signature["recipe"].default is None
    assert not set(signature) & (set(TrainConfig.model_fields) - {"dataset"})
    cli = _cli_defaults(train_command)
    recipe = TrainConfig()
    for name in TRAIN_FIELDS:
        assert getattr(recipe, name) == cli[name], name
    for name in ("norm", "steps"):
        assert cli[name] == AdversarialConfig.model_fields[name].default, name
    # the data, pairs, shard and natural-n options come from their groups
    data = DataConfig(dataset="mnist5k")
    inv = _cli_defaults(invert_command)
    assert (inv["split"], inv["size"], inv["crop"]) == (data.eval_split, data.size, data.crop)
    assert inv["pairs"] == data.pairs and inv["shard_size"] == InversionSection().shard_size
    assert _cli_defaults(similarity_command)["n"] == data.natural_n


def test_train_model_takes_a_recipe_and_keywords_replace_it(digits_small):
    a, ma = train_model("mlp", digits_small, TrainConfig(epochs=1, rng_seed=3), progress=False)
    b, mb = train_model("mlp", digits_small, epochs=1, rng_seed=3, progress=False)
    assert ma["rng_seed"] == mb["rng_seed"] == 3
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert __import__("torch").equal(v, w), k
    with pytest.raises(ConfigError, match="adversarial.eps"):
        train_model("mlp", digits_small, adversarial={"norm": "l2"}, progress=False)
    with pytest.raises(ConfigError, match="'TrainConfig.epochs'"):
        train_model("mlp", digits_small, TrainConfig(), epochs=0, progress=False)


@pytest.fixture(scope="module")
def digits_small():
    from invsim.data import TensorImageDataset, load_dataset

    d = load_dataset("digits", split="train", size=28)
    return TensorImageDataset(d.images[:256], d.labels[:256], id="digits256")


def test_settings_are_checked_where_they_enter():
    with pytest.raises(ConfigError, match="unknown inversion setting 'iteration'.*'iterations'"):
        InversionConfig().replace(iteration=3)
    with pytest.raises(ConfigError, match=r"invert_images: 'steps.momentum'.*got 1.5"):
        invert_images(None, "noise", __import__("torch").rand(1, 1, 4, 4), momentum=1.5)
    with pytest.raises(ConfigError, match="inversion: 'steps.step_size'"):
        validate({**MINIMAL, "inversion": {"step_size": -1.0}})
    assert InversionConfig(iterations=5).replace(step_size=0.5).iterations == 5


def test_json_schema_for_editors():
    schema = ExperimentConfig.model_json_schema()
    text = json.dumps(schema)
    for key in ("inversion", "step_size", "models", "adversarial", "natural_n"):
        assert key in text
    assert schema["required"] == ["out", "data", "models"]


def test_schedule_is_a_setting_everywhere():
    from click.testing import CliRunner

    from invsim.cli import main

    with pytest.raises(
        ConfigError, match=r"inversion: .*'fast' is unknown.*\['converge', 'paper'\]"
    ):
        validate({**MINIMAL, "inversion": {"schedule": "fast"}})
    assert validate({**MINIMAL, "inversion": {"schedule": "converge"}}).inversion.schedule == (
        "converge")  # fmt: skip
    result = CliRunner().invoke(main, ["invert", "x", "--out", "o", "--schedule", "fast"])
    assert result.exit_code == 2 and "['converge', 'paper']" in result.output
    assert "schedule" in json.dumps(ExperimentConfig.model_json_schema())
