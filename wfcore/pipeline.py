"""run(config): model -> data -> dense -> pruning steps -> report -> export."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from wfcore import checkpoint, files, manager
from wfcore import config as config_mod
from wfcore.errors import ConfigError, WfcoreError
from wfcore.gradients import GradientSampler
from wfcore.interfaces import (
    Allocator,
    DataBundle,
    Exporter,
    HessianEstimator,
    PruningProblem,
    Scheduler,
    Scorer,
)
from wfcore.masks import Masks, select_params
from wfcore.report import Report
from wfcore.runner import Runner
from wfcore.training import evaluate, train

log = logging.getLogger(__name__)


@dataclass
class Components:
    estimator: HessianEstimator
    scorer: Scorer
    allocator: Allocator
    scheduler: Scheduler
    exporter: Exporter | None


def instantiate(cfg: DictConfig, section: str, plugins: manager.Plugins) -> Any:
    """The component that ``cfg[section]`` names, built from its validated options."""
    kind = config_mod.COMPONENT_KINDS[section]
    entry, extra = plugins.registry(kind).lookup(cfg[section].name, f"{section}.name")
    options = config_mod.component_options(section, cfg, entry.options_class)
    return entry.factory(options, **extra)


def build_components(cfg: DictConfig, plugins: manager.Plugins) -> Components:
    made = {s: instantiate(cfg, s, plugins) for s in ("estimator", "scorer", "allocator",
                                                     "scheduler")}
    exporter = instantiate(cfg, "export", plugins) if cfg.export is not None else None
    return Components(exporter=exporter, **made)


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
    entry, extra = plugins.registry("datasets").lookup(cfg.data.name, "data.name")
    options = config_mod.validate_options("data.options", config_mod.to_dict(cfg.data.options),
                                          entry.options_class)
    return entry.factory(options, cfg.data, **extra)


def build_model(cfg: DictConfig, plugins: manager.Plugins, data: DataBundle) -> nn.Module:
    entry, extra = plugins.registry("models").lookup(cfg.model.name, "model.name")
    options = config_mod.validate_options("model.options", config_mod.to_dict(cfg.model.options),
                                          entry.options_class)
    torch.manual_seed(cfg.seed)
    return entry.factory(options, num_classes=data.num_classes, input_shape=data.input_shape,
                         **extra)


def cache_dir(cfg: DictConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("WFCORE_CACHE") or "~/.cache/wfcore"
    return Path(root).expanduser()


def dense_cache_path(cfg: DictConfig) -> Path:
    """Where the dense model trained for this model/data/train config is cached."""
    key = config_mod.digest(cfg.model.name, cfg.model.options, cfg.data.name, cfg.data.root,
                            cfg.data.options, cfg.data.batch_size, cfg.train, cfg.seed)
    stem = f"{cfg.model.name}-{cfg.data.name}".replace(":", "_").replace("/", "_")
    return cache_dir(cfg) / "dense" / f"{stem}-{key}.pt"


def load_state(model: nn.Module, path: Path, what: str) -> None:
    if not path.is_file():
        raise WfcoreError(f"{what}: file not found: {path}")
    try:
        state = files.load_torch(path)
        model.load_state_dict(state)
    except Exception as exc:
        raise WfcoreError(f"{what}: cannot load {path}: {str(exc).splitlines()[0]}") from None


def dense_model(cfg: DictConfig, model: nn.Module, data: DataBundle, device: torch.device,
                loss_fn: nn.Module) -> str:
    """Load or train the dense model in place; returns where it came from."""
    if cfg.model.checkpoint:
        load_state(model, Path(cfg.model.checkpoint).expanduser(), "model.checkpoint")
        return str(cfg.model.checkpoint)
    path = dense_cache_path(cfg)
    if path.is_file():
        log.info("dense model: cached %s", path)
        load_state(model, path, "dense model cache")
        return str(path)
    log.info("dense model: training %s for %d epochs", cfg.model.name, cfg.train.epochs)
    train(model, data.train, cfg.train, epochs=cfg.train.epochs, batch_size=cfg.data.batch_size,
          loss_fn=loss_fn, device=device, seed=cfg.seed, num_workers=cfg.data.num_workers,
          desc="dense")
    files.save_torch(path, {k: v.cpu() for k, v in model.state_dict().items()})
    log.info("dense model cached at %s", path)
    return str(path)


class Pruning:
    """One pruning run: the model, its masks, and how to prune it to a target."""

    def __init__(self, cfg: DictConfig, plugins: manager.Plugins, components: Components,
                 run_dir: Path):
        self.cfg = cfg
        self.plugins = plugins
        self.c = components
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg, plugins)
        self.model = build_model(cfg, plugins, self.data).to(self.device)
        self.loss_fn = nn.CrossEntropyLoss()
        self.dense_source = dense_model(cfg, self.model, self.data, self.device, self.loss_fn)
        self.params = select_params(self.model, cfg.model.params)
        if not self.params:
            raise ConfigError("config key 'model.params': no prunable parameters selected")
        self.masks = Masks(self.params)
        self.dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        fisher = cfg.fisher
        self.sampler = GradientSampler(
            self.model, self.params, self.masks.keep, self.data.train, self.loss_fn,
            num_grads=fisher.num_grads, grad_batch=fisher.grad_batch, labels=fisher.labels,
            seed=cfg.seed, device=self.device, dtype=fisher.storage_dtype,
            offload=fisher.offload)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test, batch_size=self.cfg.data.batch_size,
                        loss_fn=self.loss_fn, device=self.device,
                        num_workers=self.cfg.data.num_workers)

    def restore_dense(self) -> None:
        """The dense model, no masks, and the gradient sampler back at its seed."""
        self.model.load_state_dict(self.dense_state)
        self.masks.reset()
        self.sampler.reset()

    def prune_to(self, target: float, timings: dict[str, float]) -> None:
        """Estimate, score, allocate and update: the model ends at ``target`` sparsity."""
        c, sampler = self.c, self.sampler
        sampler.seconds, sampler.last = 0.0, None
        problem = PruningProblem(self.model, self.params, self.masks, sampler, self.loss_fn,
                                 self.device)
        start = time.perf_counter()
        curvature = c.estimator.fit(problem)
        gradient = sampler.mean_gradient() if c.scorer.needs_gradient else None
        timings["gradients"] += sampler.seconds
        timings["estimate"] += time.perf_counter() - start - sampler.seconds
        start = time.perf_counter()
        weights = problem.weights()
        scores = c.scorer.scores(weights, curvature, gradient)
        for n, s in scores.items():
            if s.shape != weights[n].shape or not torch.isfinite(s[self.masks.keep[n]]).all():
                raise WfcoreError(f"scorer '{self.cfg.scorer.name}' gave non-finite or "
                                  f"misshapen scores for '{n}'")
        new_keep = c.allocator.allocate(scores, dict(self.masks.keep), target)
        prune_mask = {n: self.masks.keep[n] & ~new_keep[n] for n in new_keep}
        update = c.scorer.update(weights, curvature, prune_mask, gradient)
        if update is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.add_(update[n].to(device=p.device, dtype=p.dtype))
        self.masks.set(new_keep)
        sampler.last = None
        timings["prune"] += time.perf_counter() - start

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the report of a finished run."""
    try:
        return bool(json.loads((run_dir / "report.json").read_text()).get("finished", False))
    except (OSError, ValueError, AttributeError):
        return False


def refuse_finished_resume(run_dir: Path) -> None:
    if is_finished(run_dir):
        raise WfcoreError(f"--resume {run_dir}: the run there is finished; nothing to resume "
                          "(use --force without --resume to run it again)")


def prepare_run_dir(cfg: DictConfig, force: bool = False, resume: bool = False) -> Path:
    """The run directory. A finished or interrupted run in it is kept unless ``force``;
    ``resume`` expects an unfinished run there (its checkpoint is checked by the caller).
    """
    run_dir = Path(cfg.output or Path("runs") / cfg.name).expanduser()
    if resume:
        refuse_finished_resume(run_dir)
        return run_dir
    if not force and is_finished(run_dir):
        raise WfcoreError(f"{run_dir} holds a finished run; use --force to overwrite it "
                          "or choose another output=")
    if checkpoint.path(run_dir).is_file():
        if not force:
            raise WfcoreError(f"{run_dir} holds an interrupted run; continue it with "
                              f"--resume {run_dir} or start over with --force")
        checkpoint.path(run_dir).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_config(run_dir: str | Path, config_path: str | None = None,
                  overrides: list[str] = ()) -> DictConfig:
    """The config to resume ``run_dir`` with: the run's own config.yaml unless a config
    file is given, with the overrides applied and ``output`` set to ``run_dir``.
    """
    run_dir = Path(run_dir).expanduser()
    overrides = list(overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).is_file():
        overrides.insert(0, config_path)  # `prune --resume DIR key=value`: no config given
        config_path = None
    refuse_finished_resume(run_dir)
    checkpoint.require(run_dir)
    if config_path is None:
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise WfcoreError(f"--resume {run_dir}: config.yaml is missing; give the run's "
                              "config file as well")
    cfg = config_mod.load(config_path, overrides)
    cfg.output = str(run_dir)
    return cfg


def run(cfg: DictConfig, *, force: bool = False, resume: bool = False,
        plugins: manager.Plugins | None = None) -> dict[str, Any]:
    """Run the whole pipeline for a loaded config; returns the report.

    ``resume``: continue the interrupted run in ``cfg.output`` from its last checkpoint.
    """
    plugins = plugins or manager.build(cfg.plugins)
    components = build_components(cfg, plugins)
    plan = components.scheduler.plan()
    run_dir = prepare_run_dir(cfg, force, resume)
    saved = checkpoint.load(run_dir, cfg) if resume else None
    files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
    pruning = Pruning(cfg, plugins, components, run_dir)
    report = Report(run_dir, config_mod.to_dict(cfg))
    overrides = getattr(components.scheduler, "train_overrides", dict)()
    runner = Runner(pruning, plan, report, overrides)
    if saved is not None:
        runner.restore(saved)
    else:
        files.save_torch(run_dir / "dense.pt", pruning.model_state())
        dense = pruning.evaluate()
        report.set_dense(accuracy=dense["accuracy"], loss=dense["loss"],
                         params=sum(p.numel() for p in pruning.model.parameters()),
                         prunable=pruning.masks.numel(), source=pruning.dense_source)
        log.info("dense: top-1 %.4f, loss %.4f", dense["accuracy"], dense["loss"])
        runner.save()
    runner.run()
    if components.exporter is not None:
        example = pruning.data.test[0][0].unsqueeze(0)
        model = pruning.model.cpu().eval()
        step = getattr(components.exporter, "step", None)  # export.step; None = the last step
        if step is not None:
            load_state(model, run_dir / f"model_step{step}.pt", "config key 'export.step'")
        report.data["export"] = components.exporter.export(model, example,
                                                           str(run_dir / "model.onnx"),
                                                           data=pruning.data)
        if getattr(components.exporter, "dense", False):  # export.dense: dense.onnx beside it
            load_state(model, run_dir / "dense.pt", "dense model")
            report.data["export"]["dense"] = components.exporter.export(
                model, example, str(run_dir / "dense.onnx"), data=pruning.data)
    report.finish()
    checkpoint.path(run_dir).unlink(missing_ok=True)  # finished: nothing left to resume
    plugins.hook.wfcore_run_end(report=report.data, run_dir=str(run_dir))
    return report.data
