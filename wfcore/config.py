"""The config schema, loading, dot-list overrides and per-plugin validation.

Overriding a component's name (``estimator.name=kfac``) drops the options written for the
component it replaces (see ``_switch_components``).

Top-level sections have a fixed schema (below). Component sections (estimator, scorer,
allocator, scheduler, export) hold ``name`` plus that component's options; they are
validated against the options dataclass of the plugin that registered the name.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wfcore import choices
from wfcore.errors import ConfigError, first_line
from wfcore.factories import Validated

COMPONENT_KINDS = {
    "estimator": "estimators",
    "scorer": "scorers",
    "allocator": "allocators",
    "scheduler": "schedulers",
    "export": "exporters",
}


@dataclass
class ModelSection:
    # a registered model, torchvision:<name>, timm:<name>, or a factory of your own:
    # path/to/file.py:function or package.module:function (docs/your_model.md)
    name: str = "mlpnet"
    checkpoint: Optional[str] = None  # state_dict of the dense model; null = train it (cached)
    # model.checkpoint may hold a whole pickled module (torch.save(model)); reading one runs
    # code from the file (torch.load weights_only=False), so only with this set to true
    trust_checkpoint: bool = False
    # true: the model as built already holds its dense weights (pretrained timm weights, a
    # factory that loads its own): it is pruned as it is, never trained. null = true for a
    # model given to wfcore.prune (model.name in_memory), false otherwise
    trained: Optional[bool] = None
    params: Optional[list[str]] = None  # globs over parameter names; null = by model.prunable
    # layer kinds whose weights are pruned when params is null (wfcore/prunable.py):
    # linear, conv (any groups), conv_transpose, attention (nn.MultiheadAttention's
    # in-projection); opt-in: embedding, norm
    prunable: list[str] = field(
        default_factory=lambda: ["linear", "conv", "conv_transpose", "attention"])
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
    # where the step's (m, d) gradient store lives: auto = in memory when it fits in a
    # quarter of the free memory, else a file on disk (removed when the step ends)
    store: str = "auto"  # auto | memory | disk
    store_dir: Optional[str] = None  # directory of an on-disk store; null = the run directory
    # how per-sample gradients are taken: auto = timed once on the model at hand (vmap at
    # a few chunk sizes, or the plain loop; wfcore/fisher/grad_calibration.py); vmap | loop fixes
    # it (vmap rows are the same bit for bit at any chunk; the loop's only to rounding)
    grad_method: str = "auto"
    # steps that start from the dense model (every oneshot target) reuse the gradients and
    # curvature of the first one (wfcore/run/dense_fit.py); false: sample and fit every step
    reuse_dense: bool = True


@dataclass
class DistributedSection:
    """Runs started by torchrun (see wfcore/distributed.py); ignored in one process."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # seconds any collective may wait for the other ranks: a rank that died leaves the
    # rest waiting at most this long (torchrun also stops them when one rank fails)
    timeout_s: float = 1800.0


@dataclass
class AnalyzeSection:
    """`wfcore analyze`: exact curvatures against each estimator (see wfcore/tools/analyze.py)."""

    params: Optional[list[str]] = None  # globs over parameter names; null = model.params
    # registered estimators compared with the exact curvatures (plugins included)
    estimators: list[str] = field(default_factory=lambda: ["woodfisher", "diag_fisher", "kfac"])
    # {estimator: {option: value}}; unset: the estimator section's options when it names
    # the same estimator, else the estimator's defaults
    options: dict[str, Any] = field(default_factory=dict)
    num_grads: list[int] = field(default_factory=lambda: [10, 100, 1000])  # m of each fit
    samples: Optional[int] = 1000  # training samples of the exact H, Fishers and losses; null=all
    damp: float = 1e-5  # added to the exact curvatures before inverting (the paper's MNIST damp)
    psd: bool = True  # clip the Hessian's negative eigenvalues before inverting it
    directions: int = 20  # random directions, and as many gradient directions, for the IHVPs
    num_weights: Optional[int] = 500  # single weights of the OBS question (random); null = all
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])  # pruned sets
    batch_size: int = 256  # samples per torch.func call: bounds the memory of the exact parts
    heatmap_param: Optional[str] = None  # the heatmaps show its first weights; null = the first
    heatmap_size: int = 40  # weights in the heatmap block (the paper's Figure 1 shows ~20-50)
    max_memory_gb: Optional[float] = None  # refuse above this; null = half the machine's memory
    max_minutes: float = 30.0  # refuse an exact Hessian estimated to take longer


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
    # Candidates are first compared on this many of the calibration samples; only those
    # within the noise of the best (3 standard errors of the paired difference over
    # chunks) are compared on all of them. 0 = every candidate on all the samples.
    screen_samples: int = 256


@dataclass
class BatchNormSection:
    # Re-estimate the running statistics (BatchNorm, tracked InstanceNorm) after every
    # pruning step and for every candidate the safeguard judges (wfcore/run/batchnorm.py).
    recalibrate: bool = True  # false: keep the statistics of the dense model / fine-tuning
    samples: int = 1000  # training samples of the pruning pool (seeded), never the test set


@dataclass
class DegenerateSection:
    """Degenerate pruning results (wfcore/run/degenerate.py): each is a warning in the log and
    the report, and stops the run unless allowed here."""

    allow_empty_layers: bool = False  # a layer pruned to 100% (only its bias is left)
    # a model whose output no longer depends on its input (on a probe batch of training
    # samples where the dense model's outputs differ)
    allow_constant_output: bool = False
    probe_samples: int = 16  # training samples of that probe batch (seeded)


@dataclass
class StructureSection:
    # Weights pruned in blocks of this many consecutive input channels (at one output
    # channel and kernel position); 1 = unstructured. 4 is the layout DeepSparse's INT8
    # kernels (AVX-512 VNNI) run fastest: see docs/export.md.
    block: int = 1
    # N:M semi-structured: N weights kept of every M consecutive input channels (at one
    # output channel and kernel position), e.g. "2:4" (sparse tensor cores); null = none.
    # The pattern sets each step's masks (the target sparsity is not used).
    pattern: Optional[str] = None
    # weight: single weights or blocks (above). channel: whole output channels with
    # everything coupled to them (BatchNorm, next layers' inputs, residual additions,
    # concatenations; Torch-Pruning's DependencyGraph), removed from the modules: the
    # model gets smaller and faster on any runtime. head: whole attention heads of
    # nn.MultiheadAttention (Q, K, V rows and out_proj columns; num_heads shrinks). See
    # docs/structured.md.
    unit: str = "weight"
    target: str = "flops"  # channel: a step's target is the share of flops | params removed
    min_keep: float = 0.1  # channel: every group keeps at least this share (and one channel)
    # channel: every group keeps a multiple of this many channels (or all of them): ONNX
    # Runtime's and oneDNN's conv kernels work on blocks of 8 (AVX2) or 16 (AVX-512)
    # channels, and a layer left with 45 runs like one with 48 or slower. 1 = any count.
    round_to: int = 8
    # channel: order of removal: saliency (loss increase) | per_cost (saliency per FLOP or
    # parameter the channel costs)
    rank: str = "saliency"
    # channel: auto = the estimator's group OBS (woodfisher: the whole Fisher in the dual
    # form; other curvatures: their diagonal and their own update) | magnitude (group L2) |
    # taylor ((g.w)^2 of the group) | random | tp_magnitude (Torch-Pruning's group magnitude
    # importance, mean-normalised within each group, no update; channels only)
    scores: str = "auto"
    # mean: each group's scores divided by their mean (Torch-Pruning's default normaliser),
    # so that the global allocation compares channels against their own group's, whatever
    # its size (a residual stream tied over many layers scores high as a whole); on the BN
    # CNN at 50% FLOPs it took group OBS from 57.5% to 63.2% one-shot and from 93.7% to
    # 95.9% fine-tuned (docs/structured.md, "Accuracy") | none: the scores as they are
    # (group OBS: each channel's predicted loss increase)
    normalize: str = "mean"
    recalibrate: int = 1024  # channel: training samples that re-estimate BatchNorm statistics


@dataclass
class Config:
    name: str = "run"  # shown in reports
    seed: int = 0  # seeds torch, data splits and gradient sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: Optional[str] = None  # run directory; null = runs/<name>
    cache_dir: Optional[str] = None  # dense-model cache; null = $WFCORE_CACHE or ~/.cache/wfcore
    plugins: list[str] = field(default_factory=list)  # extra plugin modules to import
    # the folder that file specs (model.name / data.name: path/to/file.py:function),
    # model.checkpoint and plugins: resolve against before the current directory; null =
    # the config file's folder when loaded from a file, else the current directory
    base_dir: Optional[str] = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    fisher: FisherSection = field(default_factory=FisherSection)
    safeguard: SafeguardSection = field(default_factory=SafeguardSection)
    structure: StructureSection = field(default_factory=StructureSection)
    degenerate: DegenerateSection = field(default_factory=DegenerateSection)
    batchnorm: BatchNormSection = field(default_factory=BatchNormSection)  # running stats
    distributed: DistributedSection = field(default_factory=DistributedSection)  # torchrun
    estimator: dict[str, Any] = field(default_factory=lambda: {"name": "magnitude"})
    scorer: dict[str, Any] = field(default_factory=lambda: {"name": "obs"})
    allocator: dict[str, Any] = field(default_factory=lambda: {"name": "global"})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "oneshot"})
    export: Optional[dict[str, Any]] = None  # null = no export; else {name: onnx, ...}
    # {name: {option: value}} for event-hook plugins that declare options (wfcore_hooks)
    hooks: dict[str, Any] = field(default_factory=dict)
    analyze: AnalyzeSection = field(default_factory=AnalyzeSection)  # `wfcore analyze` only


CHOICES: dict[str, tuple[str, ...]] = {
    "train.optimizer": choices.OPTIMIZERS,
    "train.lr_schedule": choices.LR_SCHEDULES,
    "fisher.labels": choices.LABELS,
    "fisher.storage_dtype": choices.STORAGE_DTYPE_NAMES,
    "fisher.store": choices.STORE_CHOICES,
    "fisher.grad_method": choices.GRAD_METHODS,
    "safeguard.fallback": choices.FALLBACKS,
    "distributed.backend": choices.BACKENDS,
    "structure.unit": choices.UNITS,
    "structure.target": choices.METRICS,
    "structure.rank": choices.RANKS,
    "structure.scores": choices.GROUP_SCORES,
    "structure.normalize": choices.NORMALIZE,
}


# Checked when the config is loaded, before anything runs.
MINIMUMS = {
    "data.batch_size": 1,
    "data.num_workers": 0,
    "train.epochs": 0,
    "fisher.num_grads": 1,
    "fisher.grad_batch": 1,
    "structure.block": 1,
    "structure.round_to": 1,
    "degenerate.probe_samples": 2,
    "batchnorm.samples": 1,
    "safeguard.screen_samples": 0,
    "structure.recalibrate": 0,
}


def unknown_key(key: str, known: Iterable[str] = ()) -> ConfigError:
    """"unknown config key 'a.b'", with the closest of ``known`` (the keys beside it, or
    the schema's when not given) suggested."""
    parent, _, last = key.rpartition(".")
    if not known:
        node = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else \
            OmegaConf.structured(Config)
        known = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(last, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _wrap(exc: OmegaConfBaseException, where: str = "", known: Iterable[str] = ()) \
        -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if where and key and not key.startswith(where):
        key = f"{where}.{key}"
    msg = first_line(exc)
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return unknown_key(key, known)
    if "ListConfig" in msg or "to List[" in msg:
        msg = "a list is expected, e.g. [a, b]"
    elif "to Dict[" in msg or "DictConfig" in msg:
        msg = "a mapping of keys is expected, e.g. {name: x}"
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def load(path: str | Path | None, overrides: Sequence[str] = (),
         layers: Sequence[DictConfig] = ()) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides <- ``layers`` (mappings, e.g. the keyword
    settings of ``wfcore.prune``). Errors name the offending key. A config read from a file
    gets that file's folder as ``base_dir`` unless it sets one."""
    schema = OmegaConf.structured(Config)
    extra, merged = list(layers), list[DictConfig]()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {first_line(exc)}") \
                from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path}: the top level must be a mapping of "
                              "config keys, not a list")
        merged.append(layer)
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
            raise ConfigError(f"override '{item}' is not valid: {first_line(exc)}") from None
    if items:
        merged.append(cast(DictConfig, OmegaConf.merge(*items)))  # of mappings: a mapping
    merged += extra
    _switch_components(merged)
    try:
        cfg = cast(DictConfig, OmegaConf.merge(schema, *merged))  # onto the schema's mapping
    except OmegaConfBaseException as exc:
        raise _wrap(exc) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(allowed)}")
    for key, least in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value < least:
            raise ConfigError(f"config key '{key}': {value} is less than {least}")
    check_ranges(cfg)
    if path is not None and cfg.base_dir is None:
        cfg.base_dir = str(Path(path).resolve().parent)
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
    if cfg.structure.pattern is not None:
        from wfcore.nm import parse_pattern

        parse_pattern(cfg.structure.pattern)
        if cfg.structure.block > 1:
            raise ConfigError("config keys 'structure.block' and 'structure.pattern': "
                              "choose one")
    if cfg.structure.scores == "tp_magnitude" and cfg.structure.unit == "head":
        raise ConfigError("config key 'structure.scores': tp_magnitude scores channels "
                          "(structure.unit: channel), not attention heads")
    if any(not 0.0 <= a <= 1.0 for a in cfg.safeguard.alphas):
        raise ConfigError(f"config key 'safeguard.alphas': {list(cfg.safeguard.alphas)} are "
                          "not all in [0, 1]")


def _switch_components(layers: list[DictConfig]) -> None:
    """A later layer that names another component drops the earlier layers' options.

    ``estimator.name=magnitude`` on the command line, over a file whose estimator section
    is ``{name: woodfisher, damp: 1e-5}``, gives ``{name: magnitude}``: the options belong
    to the component they were written for (as with Hydra's config groups). Options given
    beside the new name in the same or later layers are kept. For ``model`` and ``data``
    the dropped part is their ``options``.
    """

    def drop_options(node: DictConfig, section: str) -> None:
        if section in COMPONENT_KINDS:
            node[section] = {"name": node[section].name}
        else:  # model and data: their plugins' options live under `options`
            node[section].pop("options", None)

    for section in (*COMPONENT_KINDS, "model", "data"):
        current = None
        for i, layer in enumerate(layers):
            node = layer.get(section) if isinstance(layer, DictConfig) else None
            if not isinstance(node, DictConfig) or node.get("name") is None:
                continue
            if current is not None and node.name != current:
                for earlier in layers[:i]:
                    if isinstance(earlier.get(section), DictConfig):
                        drop_options(earlier, section)
            current = node.name


def describe_options(options_class: type | None) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, comment) of each option: the comments are those of the
    dataclass's source, beside the field or on the lines just above it."""
    if options_class is None or not dataclasses.is_dataclass(options_class):
        return []
    comments: dict[str, str] = {}
    lines = []
    for klass in reversed(options_class.__mro__):  # inherited fields keep their comments
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines += inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            pass
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "class ", "@")):
            comments[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
        above = []
    rows = []
    for f in dataclasses.fields(options_class):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
        rows.append((f.name, str(type_name), default, comments.get(f.name, "")))
    return rows


def validate_options(where: str, values: dict[str, Any], options_class: type | None) -> Any:
    """``values`` checked against the dataclass ``options_class``; errors name ``where.key``."""
    if options_class is None:
        if values:
            raise unknown_key(f"{where}.{next(iter(values))}", ["name"])
        return {}
    if not dataclasses.is_dataclass(options_class):
        raise ConfigError(f"{where}: the plugin's Options is not a dataclass")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_class), values)
        options = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, where, [f.name for f in dataclasses.fields(options_class)]) \
            from None
    if isinstance(options, Validated):  # the Options convention (wfcore.factories)
        try:
            options.validate()
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
