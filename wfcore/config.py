"""The config schema, loading, dot-list overrides and per-plugin validation.

Overriding a component's name (``estimator.name=kfac``) drops the options written for the
component it replaces (see ``_switch_components``).

Top-level sections have a fixed schema (below). Component sections (estimator, scorer,
allocator, scheduler, export) hold ``name`` plus that component's options; they are
validated against the options dataclass of the plugin that registered the name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wfcore.errors import ConfigError

COMPONENT_KINDS = {
    "estimator": "estimators",
    "scorer": "scorers",
    "allocator": "allocators",
    "scheduler": "schedulers",
    "export": "exporters",
}


@dataclass
class ModelSection:
    name: str = "mlpnet"  # a registered model, or torchvision:<name>
    checkpoint: Optional[str] = None  # state_dict of the dense model; null = train it (cached)
    params: Optional[list[str]] = None  # globs over parameter names; null = Linear/Conv weights
    options: dict[str, Any] = field(default_factory=dict)  # passed to the model's factory


@dataclass
class DataSection:
    name: str = "mnist5k"  # mnist5k | fake | torchvision:<Dataset> | imagefolder | registered
    root: Optional[str] = None  # where torchvision / imagefolder data lie; nothing is downloaded
    batch_size: int = 64  # training and evaluation batch
    num_workers: int = 0  # DataLoader workers; 0 keeps small runs simple and deterministic
    options: dict[str, Any] = field(default_factory=dict)  # passed to the data set's factory
    # Pruning's view of the training split (dense training always sees all of it): the
    # gradients and the calibration batch come from a seeded random subset of this
    # fraction (1.0 = everything; the WoodFisher paper's limited-data regime uses 0.01).
    train_fraction: float = 1.0
    subset_seed: Optional[int] = None  # seed of that subset; null = the run's seed
    finetune_subset: bool = False  # fine-tune on the subset too (false: the whole split)


@dataclass
class TrainSection:
    epochs: int = 20  # dense training epochs (fine-tuning epochs come from the scheduler)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # L2 on all parameters; pruned weights stay exactly zero
    lr_schedule: str = "cosine"  # cosine | step | exponential | constant, per epoch
    lr_gamma: float = 0.1  # decay factor of step / exponential schedules
    lr_step: int = 10  # epochs between decays of the step schedule


@dataclass
class FisherSection:
    num_grads: int = 1000  # m: gradients in the empirical Fisher
    grad_batch: int = 1  # samples averaged into one gradient
    labels: str = "empirical"  # empirical (data labels) | sampled (from the model's softmax)
    storage_dtype: str = "float32"  # of the (m, d) gradient buffer: float32 | float16 | bfloat16
    offload: bool = False  # keep the buffer in CPU memory (GPU runs whose buffer does not fit)


@dataclass
class SafeguardSection:
    # Choose the step length alpha of each update (w + alpha*dw, then the mask) by the loss
    # on a calibration batch of the training split. alpha = 0 is the mask alone, so a
    # step is never worse on that batch than update none. false = the update as it is.
    enabled: bool = True
    alphas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])
    calibration_samples: int = 1000  # drawn once per run (seeded); one forward per alpha
    # magnitude: also try magnitude pruning's mask (no update) and keep it when its loss is
    # lower, so a step is never worse than magnitude on that batch. none: the scores' mask.
    fallback: str = "magnitude"


@dataclass
class Config:
    name: str = "run"  # shown in reports
    seed: int = 0  # seeds torch, data splits and gradient sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: Optional[str] = None  # run directory; null = runs/<name>
    cache_dir: Optional[str] = None  # dense-model cache; null = $WFCORE_CACHE or ~/.cache/wfcore
    plugins: list[str] = field(default_factory=list)  # extra plugin modules to import
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    fisher: FisherSection = field(default_factory=FisherSection)
    safeguard: SafeguardSection = field(default_factory=SafeguardSection)
    estimator: dict[str, Any] = field(default_factory=lambda: {"name": "magnitude"})
    scorer: dict[str, Any] = field(default_factory=lambda: {"name": "obs"})
    allocator: dict[str, Any] = field(default_factory=lambda: {"name": "global"})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "oneshot"})
    export: Optional[dict[str, Any]] = None  # null = no export; else {name: onnx, ...}


CHOICES = {
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.lr_schedule": ("cosine", "step", "exponential", "constant"),
    "fisher.labels": ("empirical", "sampled"),
    "fisher.storage_dtype": ("float32", "float16", "bfloat16"),
    "safeguard.fallback": ("magnitude", "none"),
}


def _wrap(exc: OmegaConfBaseException, where: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if where and key and not key.startswith(where):
        key = f"{where}.{key}"
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return ConfigError(f"unknown config key '{key}'")
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def load(path: str | Path | None, overrides: list[str] = ()) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides. Errors name the offending key."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    items = []
    for item in overrides:
        try:
            items.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _wrap(exc) from None
        except Exception as exc:  # YAML syntax of the value
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"override '{item}' is not valid: {first}") from None
    if items:
        layers.append(OmegaConf.merge(*items))
    _switch_components(layers)
    try:
        cfg = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as exc:
        raise _wrap(exc) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(allowed)}")
    check_ranges(cfg)
    for section in COMPONENT_KINDS:
        value = cfg[section]
        if value is None:
            continue
        if not isinstance(value, DictConfig) or value.get("name") is None:
            raise ConfigError(f"config key '{section}' needs a 'name'")
    return cfg


def check_ranges(cfg: DictConfig) -> None:
    """Numeric keys whose range the schema cannot express."""
    if not 0.0 < cfg.data.train_fraction <= 1.0:
        raise ConfigError(f"config key 'data.train_fraction': {cfg.data.train_fraction} is not "
                          "in (0, 1]")
    if cfg.safeguard.calibration_samples < 1:
        raise ConfigError("config key 'safeguard.calibration_samples': must be >= 1")
    if any(not 0.0 <= a <= 1.0 for a in cfg.safeguard.alphas):
        raise ConfigError(f"config key 'safeguard.alphas': {list(cfg.safeguard.alphas)} are "
                          "not all in [0, 1]")


def _switch_components(layers: list[DictConfig]) -> None:
    """A later layer that names another component drops the earlier layers' options.

    ``estimator.name=magnitude`` on the command line, over a file whose estimator section
    is ``{name: woodfisher, damp: 1e-5}``, gives ``{name: magnitude}``: the options belong
    to the component they were written for (as with Hydra's config groups). Options given
    beside the new name in the same or later layers are kept.
    """
    for section in COMPONENT_KINDS:
        current = None
        for i, layer in enumerate(layers):
            node = layer.get(section) if isinstance(layer, DictConfig) else None
            if not isinstance(node, DictConfig) or node.get("name") is None:
                continue
            if current is not None and node.name != current:
                for earlier in layers[:i]:
                    if isinstance(earlier.get(section), DictConfig):
                        earlier[section] = {"name": node.name}
            current = node.name


def component_options(section: str, cfg: DictConfig, options_class: type | None) -> Any:
    """Validate ``cfg[section]`` (less ``name``) against ``options_class``.

    Returns an instance of the dataclass, or {} when the component takes no options.
    """
    values = OmegaConf.to_container(cfg[section], resolve=True)
    values.pop("name", None)
    return validate_options(section, values, options_class)


def validate_options(where: str, values: dict[str, Any], options_class: type | None) -> Any:
    """``values`` checked against the dataclass ``options_class``; errors name ``where.key``."""
    if options_class is None:
        if values:
            raise ConfigError(f"unknown config key '{where}.{next(iter(values))}'")
        return {}
    if not dataclasses.is_dataclass(options_class):
        raise ConfigError(f"{where}: the plugin's Options is not a dataclass")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_class), values)
        options = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, where) from None
    check = getattr(options, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return options


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def digest(*sections: Any) -> str:
    """A short stable hash of config sections (for caches and resume checks)."""
    payload = json.dumps([to_dict(s) if isinstance(s, (DictConfig, ListConfig)) else s
                          for s in sections], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
