"""Every setting, defined once: typed groups (pydantic) that the functions' defaults, the
YAML schema and the CLI options all come from.

- :class:`InversionConfig`: the paper's inversion defaults (Jones et al. 2022), frozen.
- :class:`TrainConfig`, :class:`DataConfig`, :class:`ModelConfig`, :class:`StirConfig`,
  :class:`ConfoundConfig`: the groups of an experiment file.
- :class:`ExperimentConfig`: a whole YAML experiment. An unknown key or a wrong type is a
  :class:`ConfigError` naming the key (``'models[0].train.epochs' must be int``).
  ``ExperimentConfig.model_json_schema()`` (``invsim schema``) is a JSON schema for
  editors.

Examples:
    >>> from invsim.config import InversionConfig, validate
    >>> cfg = validate({"out": "runs/x", "data": {"dataset": "mnist5k"},
    ...                 "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}}]})
    >>> cfg.inversion.steps.step_size, cfg.inversion.iterations
    (0.125, 2000)
    >>> InversionConfig(iterations=50).replace(step_size=0.25).steps.step_size
    0.25
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from invsim._settings import ConfigError, RuleSettings, _Settings

__all__ = [
    "AdversarialConfig",
    "CalibrationConfig",
    "ConfigError",
    "ConfoundConfig",
    "DataConfig",
    "ExperimentConfig",
    "InversionConfig",
    "LayersConfig",
    "ModelConfig",
    "REGIMES",
    "StirConfig",
    "TrainConfig",
    "load_config",
    "validate",
]

PENULTIMATE = "penultimate"
LOGITS = "logits"  # the model's output, for functional measures
REGIMES = ("natural", "inverted", "stir")


def _step_rules() -> Any:
    """:mod:`invsim.inversion.settings`: the step rules' settings and the schedules
    (torch-free)."""
    import invsim.inversion.settings

    return invsim.inversion.settings


def _inversion_schema(schema: dict[str, Any]) -> None:
    """The JSON schema's view of the inversion group, for editors: the loop's fields, the
    schedule and rule by name, ``steps`` as any rule's settings, and each rule's settings
    given flat."""
    rules = _step_rules()
    props = schema.setdefault("properties", {})
    props["schedule"] = {"enum": sorted(rules.SCHEDULES), "description": "A named schedule."}
    props["rule"] = {"enum": sorted(rules.STEP_SETTINGS), "description": "A step rule by name."}
    settings = {name: cls.model_json_schema() for name, cls in rules.STEP_SETTINGS.items()}
    props["steps"] = {
        "description": props.get("steps", {}).get("description", ""),
        "anyOf": list(settings.values()),
    }
    for name, sub in settings.items():
        for key, field in sub.get("properties", {}).items():
            if key != "rule" and key not in props:
                props[key] = {**field, "description": f"{name}: {field.get('description', '')}"}


class InversionConfig(_Settings):
    """Representation-inversion settings: the loop's own, and ``steps``, the settings of
    the chosen step rule (:mod:`invsim.inversion`). The defaults are the paper's.

    The schedule, the rule and its settings can be given by name: ``schedule="converge"``
    (a named composition of a rule and its settings), ``rule="converging-momentum"``,
    and any of the chosen rule's settings flat (``memory=5``); they are merged in one
    place (:func:`invsim.inversion.rules.compose_steps`) into ``steps``, so a setting of
    another rule is an error, not a field that does nothing.

    Examples:
        >>> from invsim.config import InversionConfig
        >>> cfg = InversionConfig(schedule="converge", memory=5, iterations=500)
        >>> cfg.steps.rule, cfg.steps.memory, cfg.iterations
        ('lbfgs', 5, 500)
        >>> InversionConfig().steps.record()
        {'step_size': 0.125, 'momentum': 0.9}
    """

    model_config = ConfigDict(json_schema_extra=_inversion_schema)

    layer: str = Field(PENULTIMATE, description="'penultimate' or a module name.")
    iterations: int = Field(
        2000,
        ge=0,
        description="Steps per example (a cap on each example's passes where its rule stops "
        "it earlier).",
    )
    eps: float = Field(1000.0, gt=0, description="Radius of the L2 ball around the seed.")
    use_best: bool = Field(True, description="Return each example's lowest-loss iterate.")
    batch_size: int = Field(32, ge=1, description="Examples inverted together.")
    tol: float | None = Field(
        None,
        description="Early stopping, for every rule: every `patience` passes, an example "
        "whose best loss gained less than this stops (off: the paper).",
    )
    patience: int = Field(100, ge=1, description="Passes between tol checks.")
    fake_relu: bool = Field(False, description="Gradient through the last ReLU (robustness).")
    amp: bool = Field(False, description="bfloat16 autocast on CUDA.")
    channels_last: bool = Field(
        False, description="Channels-last memory format (faster convolutions on CPU)."
    )
    fold_bn: bool = Field(
        False,
        description="Fold each batch-norm into the convolution before it, in a copy of the "
        "model (eval mode: equal up to rounding, a faster forward).",
    )
    snapshot_losses: list[float] = Field(
        default_factory=list,
        description="Loss levels (descending) at which each example's first iterate at or "
        "below the level is kept, beside the final one: the inversion's path (empty: none; "
        "each level costs one more image per example in memory and on disk).",
    )
    steps: SerializeAsAny[RuleSettings] = Field(
        default=None,
        description="The step rule's settings, with its name as 'rule' (default: the paper's "
        "normalised momentum). Set by schedule=, rule= or the rule's settings given flat.",
    )

    @model_validator(mode="before")
    @classmethod
    def _compose(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        loop = {k for k in cls.model_fields if k != "steps"}
        return _step_rules().compose_steps(raw, loop)

    @classmethod
    def merged(cls, base: InversionConfig | None, changes: dict[str, Any], *, where: str = ""):
        """``base`` (default: the paper's settings) with ``changes`` applied: loop fields,
        ``schedule``, ``rule``, ``steps`` or the chosen rule's settings by name. A new
        schedule, rule or ``steps`` replaces the base's step settings (a rule that stays
        the same keeps them); flat rule settings refine them."""
        base = base if base is not None else cls()
        raw = base.model_dump()
        same_rule = changes.get("rule") in (None, base.steps.rule)
        if "schedule" in changes or "steps" in changes or not same_rule:
            del raw["steps"]
        return cls.checked({**raw, **changes}, where=where or cls.__name__)

    def replace(self, **changes: Any):
        return type(self).merged(self, changes)

    @field_validator("snapshot_losses")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        if any(not 0 < v < float("inf") for v in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"snapshot_losses must be distinct positive losses; got {levels}.")
        return sorted(levels, reverse=True)

    @property
    def schedule(self) -> str | None:
        """The named schedule these step settings are (``paper``, ``converge``), if any."""
        return next((k for k, v in _step_rules().SCHEDULES.items() if v == self.steps), None)


class AdversarialConfig(_Settings):
    """Adversarial training (Madry et al.): PGD in the ``norm`` ball of radius ``eps``."""

    norm: Literal["l2", "linf"] = Field("l2", description="The attack's norm.")
    eps: float = Field(ge=0, description="Adversarial training eps (0: standard training).")
    steps: int = Field(7, ge=1, description="PGD steps in training.")
    step_size: float | None = Field(None, description="PGD step (default: 2.5 eps / steps).")
    ramp_epochs: float = Field(
        0.0,
        ge=0,
        description="Training: eps (and the PGD step) grow linearly from 0 over this many "
        "epochs (Madry et al.'s L-inf MNIST models collapse to chance without it); 0: no ramp.",
    )


class TrainConfig(_Settings):
    """A training recipe (:func:`invsim.train.train_model`'s settings)."""

    epochs: int = Field(3, ge=1, description="Training epochs.")
    adversarial: AdversarialConfig | None = None
    rng_seed: int | None = Field(None, description="Training seed (default: the run's rng_seed).")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (one-cycle AdamW).")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay.")
    eval_n: int | None = Field(1000, ge=1, description="Test images for the accuracies.")
    eval_steps: int = Field(20, ge=1, description="PGD steps of the robust accuracy.")
    width: int | None = Field(None, ge=1, description="Width of a built-in architecture.")
    dataset: str | None = Field(None, description="Train on this data set instead.")
    data_options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Settings):
    dataset: str = Field(description="Data set name or path (invsim.data.DATASETS).")
    train_split: str = Field("train", description="The split models train on.")
    eval_split: str = Field("test", description="train, test or all.")
    natural_n: int | None = Field(1000, ge=2, description="Natural images (None: all).")
    pairs: int = Field(1000, ge=1, description="Seed/target pairs per model.")
    size: int | None = Field(None, description="Resize images (image folders, digits).")
    crop: int | None = Field(None, description="Center-crop images (image folders).")
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Settings):
    name: str
    spec: str
    checkpoint: str | None = None
    train: TrainConfig | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    layer: str | None = Field(
        None,
        description="This model's layer ('penultimate', 'logits' or a module name); default: "
        "the run's inversion.layer. A row model is inverted at it; every column is read at it.",
    )
    trust_checkpoint: bool = False
    eps: float | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the architecture (e.g. width_per_group)."
    )
    invert: bool = Field(True, description="Build this model's inverted data set (a row).")
    layers: str | list[str] | None = Field(
        None,
        description="This model's layers in the layer-by-layer view (names, patterns such "
        "as 'layer*', 'penultimate', 'logits', 'blocks'); default: the 'layers:' section's.",
    )

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if not self.checkpoint and self.train is None:
            raise ValueError(f"model {self.name!r} needs a 'checkpoint' or a 'train' recipe.")
        return self


class InversionSection(InversionConfig):
    """The YAML ``inversion:`` group: the inversion settings plus the store's shard size."""

    shard_size: int = Field(256, ge=1, description="Pairs per stored shard.")

    def settings(self) -> InversionConfig:
        return InversionConfig(**self.model_dump(exclude={"shard_size"}))


class StirConfig(_Settings):
    n: int = Field(500, ge=2)
    iterations: int | None = None
    seed_images: Literal["noise", "data"] = Field(
        "noise", description="What STIR's inversions start from: noise, or data images."
    )


class CalibrationConfig(_Settings):
    """Intervals and nulls for every cell (:func:`invsim.similarity.calibrate`)."""

    n_perm: int = Field(
        200, ge=0, description="Permutations per cell for a permutation null; 0: no null."
    )
    null: Literal["moments", "permutation"] = Field(
        "moments",
        description="Linear CKA's null: exact permutation moments (mean exact, p-value from "
        "a Pearson III fit) or n_perm random permutations. Other measures always permute.",
    )
    ci: float = Field(
        0.95, gt=0, lt=1, description="Interval level, for the measure's population value."
    )
    measures: list[str] = Field(
        default_factory=lambda: ["linear_cka"], description="Measures to calibrate."
    )


class LayersConfig(_Settings):
    """The layer-by-layer view (invsim.experiment.layers): every selected layer of every
    model against every other, on natural images and on each row's inverted set."""

    select: str | list[str] = Field(
        "blocks", description="Layers of every model (a model's own 'layers' overrides)."
    )
    n: int | None = Field(None, ge=4, description="Natural images (None: data.natural_n).")
    measures: list[Literal["linear_cka", "debiased_cka"]] = Field(
        default_factory=lambda: ["linear_cka"], description="From Gram tiles, exact."
    )
    inverted: bool = Field(True, description="Also on each row model's inverted set.")
    memory_gb: float = Field(4.0, gt=0, description="Budget of the held statistics (GB).")
    batch_size: int = Field(128, ge=4, description="Images per forward.")
    estimator: Literal["exact", "minibatch"] = Field(
        "exact", description="exact full-data CKA, or Nguyen et al.'s minibatch estimate."
    )


class ConfoundConfig(_Settings):
    epochs: int = 4
    pairs: int = 300
    iterations: int = 300
    arch: str = "mlp"


class ExperimentConfig(_Settings):
    """A whole experiment (one YAML file)."""

    name: str = "experiment"
    out: str
    rng_seed: int = 0
    device: str | None = None
    data: DataConfig
    models: list[ModelConfig] = Field(min_length=1)
    inversion: InversionSection = Field(default_factory=InversionSection)
    regimes: list[str] = Field(
        default_factory=lambda: ["natural", "inverted"],
        description="Which data the matrices are computed on: natural, inverted, stir.",
    )
    measures: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["linear_cka", "debiased_cka"],
        description="Similarity measures (invsim.similarity.MEASURES); the first is primary. "
        "A name, 'name:option=value,...' or a mapping {name: mutual_knn, k: 20}.",
    )
    calibration: CalibrationConfig | None = Field(
        default_factory=CalibrationConfig,
        description="Bootstrap intervals and permutation nulls per cell (null: none).",
    )
    stir: StirConfig = Field(default_factory=StirConfig)
    confound: ConfoundConfig | None = None
    layers: LayersConfig | None = Field(
        None, description="Layer-by-layer matrices at every selected depth (null: none)."
    )
    note: str | None = None

    @property
    def measure_names(self) -> list[str]:
        """The measures' names, options stripped; the first is the primary measure."""
        from invsim.similarity.registry import parse_measure

        return [parse_measure(m)[0] for m in self.measures]

    @property
    def measure_options(self) -> dict[str, dict[str, Any]]:
        """name -> the options the config sets (empty: the measure's defaults)."""
        from invsim.similarity.registry import parse_measure

        return dict(parse_measure(m) for m in self.measures)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        for r in self.regimes:
            if r not in REGIMES:
                raise ValueError(f"unknown regime {r!r} in 'regimes'; use {list(REGIMES)}.")
        moved = [m for m in self.measures if isinstance(m, str) and m in REGIMES]
        if moved:
            raise ValueError(
                f"'measures' lists {moved}, which are regimes (the data a matrix is computed "
                f"on): put them under 'regimes:' (regimes: {moved}); 'measures:' now names "
                "similarity indices such as linear_cka, procrustes or mutual_knn."
            )
        if not self.measures:
            raise ValueError("'measures' is empty: list at least one (e.g. [linear_cka]).")
        import invsim.similarity  # noqa: F401  (registers the built-in measures)
        from invsim.similarity.registry import get_measure  # the registry needs torch

        for m in self.measures:
            get_measure(m)  # an unknown name or option is an error here
        names = self.measure_names
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"'measures' lists {repeated} more than once.")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}.")
        return self


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate an experiment mapping and fill in defaults. Raises :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping; got {type(raw).__name__}.")
    return ExperimentConfig.checked(raw)


def load_config(path: str | Path, **overrides: Any) -> ExperimentConfig:
    """Read and validate a YAML experiment file; ``overrides`` (e.g. out, rng_seed, device)
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
