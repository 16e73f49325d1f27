"""The setup of a run: the device, the data, the model and its dense weights (loaded,
trained or cached), the provenance of what made them, and the components a config names.
Nothing here prunes or keeps run state: ``wfcore.run.pipeline`` builds a run from these
pieces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, Subset

from wfcore import __version__, files, inmemory, manager, specs
from wfcore import config as config_mod
from wfcore.errors import ConfigError, WfcoreError
from wfcore.interfaces import (
    Allocator,
    DataBundle,
    Exporter,
    HessianEstimator,
    Loss,
    Scheduler,
    Scorer,
    dataset_size,
)
from wfcore.run import states
from wfcore.run.training import train

if TYPE_CHECKING:
    from wfcore.fisher.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The components a config names, built (``wfcore.run.pipeline.build_components``)."""

    estimator: HessianEstimator
    scorer: Scorer
    allocator: Allocator
    scheduler: Scheduler
    exporter: Exporter | None
    hooks: dict[str, Any] = field(default_factory=dict)  # {name: options} of the event hooks

    def need_gradients(self) -> bool:
        """Whether a pruning step samples the m gradients (for the estimator or the scorer)."""
        return self.estimator.needs_gradients or self.scorer.needs_gradient


@dataclass(frozen=True)
class RunSetup:
    """What a run is built from, once (``wfcore.run.pipeline.set_up``), before any step: handed
    to the steps (``wfcore.run.pruning.Pruning``) and to the report, never changed after."""

    cfg: DictConfig
    plugins: manager.Plugins
    components: Components
    run_dir: Path
    device: torch.device
    data: DataBundle
    loss_fn: Loss
    model: nn.Module  # the run's model object, holding the dense weights when set up
    params: dict[str, nn.Parameter]  # its prunable parameters
    plan: Plan
    store_dir: Path  # where an on-disk gradient store goes
    dense_source: str  # where the dense weights came from (checkpoint, cache, trained)
    provenance: dict[str, str]  # what made them besides the config (``dense_provenance``)
    dense_state: dict[str, torch.Tensor]  # the dense weights, for steps from the dense model
    pool: Dataset  # the part of the training split that pruning sees
    pool_record: dict[str, Any]  # its record for the report (``pruning_subset``)
    finetune_data: Dataset  # what fine-tuning trains on (the pool, or the whole split)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': '{name}' is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': '{name}' asked for, but CUDA is not available")
    return device


def load_data(cfg: DictConfig, plugins: manager.Plugins) -> DataBundle:
    return plugins.create("datasets", manager.Section.nested(cfg.data, "data"), data=cfg.data,
                          seed=cfg.seed)


def loss_function(cfg: DictConfig, data: DataBundle) -> Loss:
    """The run's loss: the data set's own (``DataBundle.loss``), else cross-entropy.

    Sampled labels are class indices drawn from a classifier's softmax: with a loss of the
    data set's own, ``fisher.labels: sampled`` is an error.
    """
    if data.loss is None:
        return nn.CrossEntropyLoss()
    if cfg.fisher.labels == "sampled":
        raise ConfigError(f"config key 'fisher.labels': sampled labels are class indices drawn "
                          f"from a classifier's softmax, but data set '{cfg.data.name}' gives "
                          "a loss of its own; use fisher.labels=empirical")
    return data.loss


@dataclass
class DataShapes:
    """What a model is built for (a DataBundle gives both): one sample's shape and the
    number of classes."""

    input_shape: tuple[int, ...]
    num_classes: int


def build_model(cfg: DictConfig, plugins: manager.Plugins,
                data: DataBundle | DataShapes) -> nn.Module:
    section = manager.Section.nested(cfg.model, "model")
    chosen = plugins.choose("models", section)  # options checked before the seed is set
    torch.manual_seed(cfg.seed)
    return chosen.build(num_classes=data.num_classes, input_shape=data.input_shape,
                        seed=cfg.seed)


def instantiate(cfg: DictConfig, section: str, plugins: manager.Plugins) -> Any:
    """The component that ``cfg[section]`` names, built from its validated options."""
    return plugins.create(config_mod.COMPONENT_KINDS[section],
                          manager.Section.of(cfg[section], section), seed=cfg.seed)


def hook_options(cfg: DictConfig, plugins: manager.Plugins) -> dict[str, Any]:
    """``{name: options}`` for every name that ``wfcore_hooks`` registers: the config's
    ``hooks.<name>`` checked against its dataclass, defaults for a name it leaves out. A
    section for a name nobody registers is a one-line error."""
    registry = plugins.registry("hooks")
    for name in cfg.hooks:
        registry.lookup(name, f"hooks.{name}")
    values = config_mod.to_dict(cfg.hooks)
    return {name: plugins.choose("hooks", manager.Section(name, values.get(name) or {},
                                                          f"hooks.{name}",
                                                          f"hooks.{name}")).options
            for name in registry.names()}


def cache_dir(cfg: DictConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("WFCORE_CACHE") or "~/.cache/wfcore"
    return Path(root).expanduser()


def data_fingerprint(data: DataBundle, samples: int = 8) -> str:
    """A short hash of a data set: its sizes, classes, input shape and a few evenly spaced
    training samples (the labels only, when the inputs come out differently each time they
    are read, as with random augmentation). The test split is never read."""
    h = hashlib.sha256(repr((dataset_size(data.train), dataset_size(data.test), data.num_classes,
                             tuple(data.input_shape))).encode())

    def parts(i: int) -> list[torch.Tensor]:
        item = data.train[i]
        return [torch.as_tensor(p).detach().cpu().contiguous()
                for p in (item if isinstance(item, (tuple, list)) else (item,))]

    count = dataset_size(data.train)
    if not count:
        return h.hexdigest()[:16]
    first, again = parts(0), parts(0)
    inputs_stable = all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for i in sorted({round(k * (count - 1) / max(samples - 1, 1)) for k in range(samples)}):
        item = parts(i)
        for t in item if inputs_stable else item[1:]:
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def dense_provenance(cfg: DictConfig, plugins: manager.Plugins, data: DataBundle) \
        -> dict[str, str]:
    """What made the dense model besides the config: the versions of the plugins that
    registered the model and the data set, and the data's fingerprint. Part of the cache
    key: a plugin reinstalled with other data trains a new dense model."""
    out = {"data": data_fingerprint(data)}
    for section, kind in (("model", "models"), ("data", "datasets")):
        entry, _ = plugins.registry(kind).lookup(cfg[section].name, f"{section}.name")
        info = plugins.info.get(entry.plugin)
        out[f"{section}_plugin"] = f"{entry.plugin} {info.version if info else ''}".strip()
    return out


def dense_cache_path(cfg: DictConfig, provenance: dict[str, str] | None = None) -> Path:
    """Where the dense model trained for this model/data/train config is cached
    (``provenance``: ``dense_provenance``; None leaves it out of the key)."""
    key = config_mod.digest(cfg.model.name, cfg.model.options, cfg.data.name, cfg.data.root,
                            cfg.data.options, cfg.data.batch_size, cfg.train, cfg.seed,
                            *([provenance] if provenance else []))
    stem = f"{cfg.model.name}-{cfg.data.name}".replace(":", "_").replace("/", "_")
    return cache_dir(cfg) / "dense" / f"{stem}-{key}.pt"


def load_state(model: nn.Module, path: Path, what: str) -> None:
    """Load a state_dict file into ``model`` (see ``wfcore.run.states``: one-line errors)."""
    states.load_state(model, path, what)


def dense_model(cfg: DictConfig, model: nn.Module, data: DataBundle, device: torch.device,
                loss_fn: Loss, provenance: dict[str, str] | None = None) -> str:
    """Load or train the dense model in place; returns where it came from."""
    if cfg.model.checkpoint:
        checkpoint = specs.checkpoint_path(cfg.model.checkpoint, cfg.base_dir)
        specs.load_checkpoint(model, checkpoint, cfg.model.trust_checkpoint)
        return str(cfg.model.checkpoint)
    given = cfg.model.name == inmemory.NAME  # a model object given to wfcore.prune
    trained = given if cfg.model.trained is None else cfg.model.trained
    if trained:  # a model given with its weights: pruned as it is
        log.info("dense model: %s as built (model.trained)", cfg.model.name)
        return "as built"
    # an object's architecture is not in the config, so the cache key cannot tell two apart
    path = None if given else dense_cache_path(cfg, provenance)
    if path is not None and path.is_file():
        log.info("dense model: cached %s", path)
        try:
            load_state(model, path, "dense model cache")
        except WfcoreError as exc:
            raise WfcoreError(f"{exc}; delete it to train the dense model again") from None
        return str(path)
    log.info("dense model: training %s for %d epochs", cfg.model.name, cfg.train.epochs)
    train(model, data.train, cfg.train, epochs=cfg.train.epochs, batch_size=cfg.data.batch_size,
          loss_fn=loss_fn, device=device, seed=cfg.seed, num_workers=cfg.data.num_workers,
          desc="dense")
    if path is None:
        return "trained (not cached)"
    files.save_torch(path, {k: v.cpu() for k, v in model.state_dict().items()})
    log.info("dense model cached at %s", path)
    return str(path)


def versions(plugins: manager.Plugins) -> dict[str, Any]:
    """Python, torch, wfcore and every plugin's version, for report.json."""
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "wfcore": __version__,
            "plugins": {name: info.version or info.source for name, info in plugins.info.items()
                        if info.source != "built-in"}}


def pool_size(total: int, fraction: float) -> int:
    """Samples of the pruning pool: ``fraction`` (``data.train_fraction``) of ``total``."""
    return total if fraction >= 1.0 else max(1, round(fraction * total))


def pruning_subset(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, dict[str, Any]]:
    """The part of the training split that pruning may see, and its record for the report."""
    total = dataset_size(train)
    if fraction >= 1.0:
        return train, {"train_fraction": 1.0, "samples": total, "of": total, "seed": None}
    count = pool_size(total, fraction)
    indices = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
    log.info("pruning sees %d of the %d training samples (data.train_fraction %g, seed %d)",
             count, total, fraction, seed)
    return Subset(train, indices.tolist()), {"train_fraction": fraction, "samples": count,
                                             "of": total, "seed": seed}
