"""Experiment configuration: a YAML file, validated (unknown keys and wrong types are
errors naming the key), with the paper's inversion defaults filled in.

Example:
    >>> from invsim.config import validate
    >>> cfg = validate({"out": "runs/x", "data": {"dataset": "mnist5k"},
    ...                 "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}}]})
    >>> cfg["inversion"]["step_size"], cfg["inversion"]["iterations"]
    (0.125, 2000)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "load_config", "validate"]


class ConfigError(ValueError):
    """The experiment configuration is invalid."""


NUM = (int, float)
OPT_STR = (str, type(None))
OPT_NUM = (int, float, type(None))

ADVERSARIAL = {"norm": (str,), "eps": NUM, "steps": (int,)}
TRAIN = {
    "epochs": (int,),
    "adversarial": (dict, type(None)),
    "seed": (int,),
    "lr": NUM,
    "batch_size": (int,),
    "width": (int,),
    "dataset": (str,),
    "data_options": (dict,),
}
MODEL = {
    "name": (str,),
    "spec": (str,),
    "checkpoint": OPT_STR,
    "train": (dict, type(None)),
    "num_classes": (int,),
    "in_channels": (int,),
    "image_size": (int,),
    "mean": (list, type(None)),
    "std": (list, type(None)),
    "layer": (str,),
    "trust_checkpoint": (bool,),
    "eps": OPT_NUM,
    "arch": (str,),
}
DATA = {
    "dataset": (str,),
    "train_split": (str,),
    "eval_split": (str,),
    "natural_n": (int,),
    "pairs": (int,),
    "size": (int, type(None)),
    "crop": (int, type(None)),
    "options": (dict,),
}
INVERSION = {
    "step_size": NUM,
    "iterations": (int,),
    "momentum": NUM,
    "eps": NUM,
    "use_best": (bool,),
    "batch_size": (int,),
    "tol": OPT_NUM,
    "patience": (int,),
    "fake_relu": (bool,),
    "layer": (str,),
    "shard_size": (int,),
}
STIR = {"n": (int,), "iterations": (int,), "seed_images": OPT_STR}
CONFOUND = {"epochs": (int,), "pairs": (int,), "iterations": (int,), "arch": (str,)}
TOP = {
    "name": (str,),
    "out": (str,),
    "seed": (int,),
    "device": OPT_STR,
    "data": (dict,),
    "models": (list,),
    "inversion": (dict,),
    "measures": (list,),
    "stir": (dict,),
    "confound": (dict, type(None)),
    "note": (str,),
}
MEASURES = ("natural", "inverted", "stir")

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "device": None,
    "measures": ["natural", "inverted"],
    "data": {"train_split": "train", "eval_split": "test", "natural_n": 1000, "pairs": 1000},
    "inversion": {
        "step_size": 0.125,
        "iterations": 2000,
        "momentum": 0.9,
        "eps": 1000.0,
        "use_best": True,
        "batch_size": 32,
        "tol": None,
        "layer": "penultimate",
        "shard_size": 256,
    },
    "stir": {"n": 500, "seed_images": "noise"},
    "confound": None,
}


def _check(obj: Any, schema: dict[str, tuple], where: str) -> None:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping; got {type(obj).__name__}.")
    for key, value in obj.items():
        path = f"{where}.{key}" if where else key
        if key not in schema:
            raise ConfigError(f"unknown key {path!r}; allowed here: {', '.join(sorted(schema))}.")
        types = schema[key]
        # bool is an int subclass: accept it only where bool is allowed
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join(sorted({t.__name__ for t in types}))
            raise ConfigError(f"{path!r} must be {names}; got {value!r} ({type(value).__name__}).")


def validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a configuration and fill in defaults. Raises :class:`ConfigError`."""
    _check(raw, TOP, "")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = copy.deepcopy(value)
    for key in ("out", "data", "models"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}.")
    _check(cfg["data"], DATA, "data")
    if "dataset" not in cfg["data"]:
        raise ConfigError("missing required key 'data.dataset'.")
    _check(cfg["inversion"], INVERSION, "inversion")
    _check(cfg["stir"], STIR, "stir")
    if cfg["confound"] is not None:
        _check(cfg["confound"], CONFOUND, "confound")
    for m in cfg["measures"]:
        if m not in MEASURES:
            raise ConfigError(f"unknown measure {m!r} in 'measures'; use {list(MEASURES)}.")
    if not cfg["models"]:
        raise ConfigError("'models' is empty: list at least two models.")
    names = []
    for i, model in enumerate(cfg["models"]):
        where = f"models[{i}]"
        _check(model, MODEL, where)
        for key in ("name", "spec"):
            if key not in model:
                raise ConfigError(f"missing required key '{where}.{key}'.")
        if model.get("train") is not None:
            _check(model["train"], TRAIN, f"{where}.train")
            adv = model["train"].get("adversarial")
            if adv is not None:
                _check(adv, ADVERSARIAL, f"{where}.train.adversarial")
                if "eps" not in adv:
                    raise ConfigError(f"missing required key '{where}.train.adversarial.eps'.")
        if not model.get("checkpoint") and model.get("train") is None:
            raise ConfigError(
                f"{where} ({model['name']!r}) needs a 'checkpoint' or a 'train' recipe."
            )
        names.append(model["name"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"model names must be unique; repeated: {dup}.")
    return cfg


def load_config(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Read and validate a YAML experiment file; ``overrides`` (e.g. out, seed, device)
    replace top-level keys when not None."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"no such config file: {str(path)!r}.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}") from e
    if raw is None:
        raise ConfigError(f"{str(path)!r} is empty.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping at the top level.")
    for k, v in overrides.items():
        if v is not None:
            raw[k] = v
    return validate(raw)
