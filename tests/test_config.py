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
from invsim.train import train_model

MINIMAL = {"out": "x", "data": {"dataset": "mnist5k"},
           "models": [{"name": "a", "spec": "mlp", "train": {}}]}  # fmt: skip


def _cli_defaults(command) -> dict:
    return {p.name: p.default for p in command.params}


def test_inversion_defaults_have_one_source():
    paper = InversionConfig()
    assert (paper.step_size, paper.iterations, paper.momentum, paper.eps) == (
        1 / 8,
        2000,
        0.9,
        1000,
    )
    assert (paper.batch_size, paper.use_best, paper.tol) == (32, True, None)
    signature = inspect.signature(invert_images).parameters
    cli = _cli_defaults(invert_command)
    yaml_defaults = validate(MINIMAL).inversion
    for name, field in InversionConfig.model_fields.items():
        assert signature[name].default == field.default, name
        assert cli[name] == field.default, name
        assert getattr(yaml_defaults, name) == field.default, name
    # and nothing else travels as an inversion setting
    runtime = {"model", "seed_images", "target_images", "device", "progress", "noise_seed",
               "snapshots", "callback"}  # fmt: skip
    assert set(signature) - runtime == set(InversionConfig.model_fields)


def test_training_defaults_have_one_source():
    signature = inspect.signature(train_model).parameters
    cli = _cli_defaults(train_command)
    recipe = TrainConfig()
    for name in ("epochs", "lr", "batch_size"):
        assert signature[name].default == getattr(recipe, name) == cli[name], name


def test_settings_are_checked_where_they_enter():
    with pytest.raises(ConfigError, match="unknown key 'InversionConfig.iteration'.*'iterations'"):
        InversionConfig().replace(iteration=3)
    with pytest.raises(ConfigError, match="invert_images.momentum"):
        invert_images(None, "noise", __import__("torch").rand(1, 1, 4, 4), momentum=1.5)
    with pytest.raises(ConfigError, match="'inversion.step_size'"):
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

    with pytest.raises(ConfigError, match="'inversion.schedule'.*'paper' or 'converge'"):
        validate({**MINIMAL, "inversion": {"schedule": "fast"}})
    assert validate({**MINIMAL, "inversion": {"schedule": "converge"}}).inversion.schedule == (
        "converge")  # fmt: skip
    result = CliRunner().invoke(main, ["invert", "x", "--out", "o", "--schedule", "fast"])
    assert result.exit_code == 2 and "'paper', 'converge'" in result.output
    assert "schedule" in json.dumps(ExperimentConfig.model_json_schema())


def test_calibration_n_boot_still_loads_with_a_deprecation_warning():
    from invsim.config import CalibrationConfig

    with pytest.warns(DeprecationWarning, match="n_boot=100 is ignored"):
        assert CalibrationConfig(n_boot=100).ci == 0.95
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CalibrationConfig()  # the default says nothing
