"""run(config): model -> data -> dense -> pruning steps -> report -> export."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wfcore import (
    checkpoint,
    distributed,
    files,
    inmemory,
    manager,
    prunable,
    rundir,
    runs,
    structured_run,
    targets,
)
from wfcore import config as config_mod
from wfcore.batchnorm import RunningStats
from wfcore.degenerate import DegeneracyCheck
from wfcore.dense_fit import DenseFit
from wfcore.errors import ConfigError, WfcoreError
from wfcore.gradients import GradientSampler
from wfcore.interfaces import (
    Allocator,
    DataBundle,
    Exporter,
    HessianEstimator,
    LayerwiseEstimator,
    Loss,
    PruningProblem,
    Scheduler,
    Scorer,
)
from wfcore.masks import Masks, block_scores, select_params, whole_blocks
from wfcore.nm import nm_keep, parse_pattern
from wfcore.plan import Plan, make_plan, store_place
from wfcore.prepare import (  # noqa: F401  (the setup of a run, re-exported here)
    build,
    build_model,
    cache_dir,
    data_fingerprint,
    dense_cache_path,
    dense_model,
    dense_provenance,
    hook_options,
    instantiate,
    load_data,
    load_state,
    loss_function,
    pruning_subset,
    resolve_device,
    versions,
)
from wfcore.report import Report, number
from wfcore.runner import Runner
from wfcore.safeguard import Safeguard, calibration_batch, magnitude_scores
from wfcore.safeguard_plan import safeguard_cost
from wfcore.store import STORAGE_DTYPES, GradientStore, store_bytes
from wfcore.training import evaluate

log = logging.getLogger(__name__)


@dataclass
class Components:
    estimator: HessianEstimator
    scorer: Scorer
    allocator: Allocator
    scheduler: Scheduler
    exporter: Exporter | None
    hooks: dict[str, Any] = field(default_factory=dict)  # {name: options} of the event hooks

    def need_gradients(self) -> bool:
        """Whether a pruning step samples the m gradients (for the estimator or the scorer)."""
        return self.estimator.needs_gradients or self.scorer.needs_gradient


def resolved_config(cfg: DictConfig, plugins: manager.Plugins) -> DictConfig:
    """The config with every component's options validated and their defaults filled in
    (``wfcore config``)."""
    out = OmegaConf.create(config_mod.to_dict(cfg))
    for section, kind in config_mod.COMPONENT_KINDS.items():
        if cfg[section] is None:
            continue
        entry, _ = plugins.registry(kind).lookup(cfg[section].name, f"{section}.name")
        options = config_mod.component_options(section, cfg, entry.options_class)
        values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
        out[section] = {"name": cfg[section].name, **values}
    for section, kind in (("model", "models"), ("data", "datasets")):
        entry, _ = plugins.registry(kind).lookup(cfg[section].name, f"{section}.name")
        options = config_mod.validate_options(f"{section}.options",
                                              config_mod.to_dict(cfg[section].options),
                                              entry.options_class)
        if dataclasses.is_dataclass(options):
            out[section].options = dataclasses.asdict(options)
    out.hooks = {name: dataclasses.asdict(options)
                 for name, options in hook_options(cfg, plugins).items()}
    return out


def build_components(cfg: DictConfig, plugins: manager.Plugins) -> Components:
    """The configured components; an estimator's ``paired_scorer`` replaces the configured
    scorer (which is still built, so that its section is checked)."""
    made = {s: instantiate(cfg, s, plugins) for s in ("estimator", "scorer", "allocator",
                                                     "scheduler")}
    paired = made["estimator"].paired_scorer()
    if paired is not None:
        log.info("estimator '%s' scores with its own %s (scorer.name=%s is not used)",
                 cfg.estimator.name, type(paired).__name__, cfg.scorer.name)
        made["scorer"] = paired
    if isinstance(made["estimator"], LayerwiseEstimator):
        bind_guide(made["estimator"], cfg.seed, plugins)
    exporter = instantiate(cfg, "export", plugins) if cfg.export is not None else None
    return Components(exporter=exporter, hooks=hook_options(cfg, plugins), **made)


def bind_guide(estimator: LayerwiseEstimator, seed: int, plugins: manager.Plugins) -> None:
    """Build the estimator a layer-wise estimator's ``guide`` option names (its options
    validated as ``estimator.guide``) and hand it over."""
    spec = estimator.guide()
    if spec is None:
        return
    values = dict(spec)
    name = values.pop("name")
    entry, extra = plugins.registry("estimators").lookup(name, "estimator.guide.name")
    options = config_mod.validate_options("estimator.guide", values, entry.options_class)
    estimator.set_guide(build(entry, "estimator.guide.name", name, options, seed=seed,
                              **extra))


def store_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Where an on-disk gradient store goes: ``fisher.store_dir``, else the run directory."""
    return Path(cfg.fisher.store_dir or run_dir).expanduser()


def plan_run(cfg: DictConfig, components: Components, model: nn.Module,
             params: dict[str, nn.Parameter], data: DataBundle, loss_fn: Loss,
             device: torch.device, store_dir: Path, calibrate: bool = True,
             nproc: int = 1) -> Plan:
    """The plan of the run's first pruning step (``wfcore.plan``) for ``nproc`` processes."""
    item = data.train[0]
    example = item[0] if isinstance(item, (tuple, list)) else item
    # unlabelled data (sampled labels): class 0 stands in for the label
    target = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else 0
    needs = components.need_gradients()
    plan = make_plan(model=model, params=params, example=example.unsqueeze(0).to(device),
                     target=torch.as_tensor(target).unsqueeze(0), loss_fn=loss_fn,
                     estimator=components.estimator, estimator_name=cfg.estimator.name,
                     needs_gradients=needs, fisher=cfg.fisher, store_dir=store_dir,
                     device=device, calibrate=calibrate, nproc=nproc)
    guard = safeguard_cost(cfg, model, example.unsqueeze(0).to(device),
                           components.estimator.baseline or components.scorer.baseline,
                           calibrate)
    plan.safeguard_seconds = guard.seconds
    plan.notes.append(guard.line())
    plan.notes = prunable.summary_lines(prunable_summary(cfg, model, params)) + plan.notes
    if components.exporter is not None:  # exportability, before anything is trained
        line = components.exporter.check(model, example.unsqueeze(0))
        plan.notes += [line] if line else []
    return plan


def prunable_summary(cfg: DictConfig, model: nn.Module,
                     params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """What is prunable and what is excluded, with why (``wfcore.prunable.summary``)."""
    return prunable.summary(model, params, cfg.model.params, cfg.model.prunable)


def plan_config(cfg: DictConfig, plugins: manager.Plugins | None = None,
                nproc: int = 1) -> Plan:
    """The plan of a config without running it: the model is built, not trained or loaded.
    ``nproc``: processes of a torchrun run (each rank's share is shown).

    Data that cannot be read here (an ImageNet root on another machine) is replaced by a
    stand-in of the fake data set's default shape (3 x 224 x 224, 1000 classes), said in
    the plan's notes.
    """
    plugins = plugins or manager.build(cfg.plugins, base_dir=cfg.base_dir)
    components = build_components(cfg, plugins)
    device = resolve_device(cfg.device)
    notes = []
    try:
        data = load_data(cfg, plugins)
    except WfcoreError as exc:
        stand_in = OmegaConf.merge(cfg, {"data": {"name": "fake", "options": {}}})
        data = load_data(stand_in, plugins)
        notes.append(f"data: {exc}; planned on stand-in data of shape "
                     f"{'x'.join(map(str, data.input_shape))} with {data.num_classes} classes")
    model = build_model(cfg, plugins, data).to(device)
    params = select_params(model, cfg.model.params, cfg.model.prunable)
    if not params:
        raise ConfigError("config key 'model.params': no prunable parameters selected")
    targets.check(components.scheduler.plan(), params, cfg.allocator.name)
    run_dir = Path(cfg.output or Path("runs") / cfg.name)
    plan = plan_run(cfg, components, model, params, data, loss_function(cfg, data), device,
                    store_dir(cfg, run_dir), nproc=nproc)
    plan.notes += notes
    return plan


class Pruning:
    """One pruning run: the model, its masks, and how to prune it to a target."""

    def __init__(self, cfg: DictConfig, plugins: manager.Plugins, components: Components,
                 run_dir: Path):
        self.cfg = cfg
        self.plugins = plugins
        self.c = components
        self.run_dir = run_dir
        self.device = resolve_device(distributed.local_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg, plugins)
        self.model = build_model(cfg, plugins, self.data).to(self.device)
        self.loss_fn = loss_function(cfg, self.data)
        self.params = select_params(self.model, cfg.model.params, cfg.model.prunable)
        if not self.params:
            raise ConfigError("config key 'model.params': no prunable parameters selected")
        targets.check(components.scheduler.plan(), self.params, cfg.allocator.name)
        if components.exporter is not None:  # the export's limits, before anything is pruned
            components.exporter.check_data(self.data)
        if cfg.fisher.grad_batch > len(self.data.train):
            raise ConfigError(f"config key 'fisher.grad_batch': {cfg.fisher.grad_batch} is more "
                              f"than the {len(self.data.train)} training samples")
        self.store_dir = store_dir(cfg, run_dir)
        self.plan = plan_run(cfg, components, self.model, self.params, self.data, self.loss_fn,
                             self.device, self.store_dir, nproc=distributed.world())
        for line in self.plan.lines():
            log.info("plan: %s", line)
        # before the dense model is trained or any gradient sampled; on every rank
        distributed.agree(self.plan.check)
        # rank 0 loads or trains the dense model (and alone writes the cache); every rank
        # then holds its weights
        provenance = dense_provenance(cfg, plugins, self.data)
        self.dense_source = distributed.on_main(
            lambda: dense_model(cfg, self.model, self.data, self.device, self.loss_fn,
                                provenance))
        distributed.broadcast_module(self.model)
        self.masks = Masks(self.params)
        self.pristine: nn.Module | None = None  # the dense architecture (structure.unit: channel)
        self.dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        subset_seed = cfg.seed if cfg.data.subset_seed is None else cfg.data.subset_seed
        pool, self.pool_record = pruning_subset(self.data.train, cfg.data.train_fraction,
                                                subset_seed)
        self.pool_record["finetune"] = "subset" if cfg.data.finetune_subset else "all"
        self.finetune_data = pool if cfg.data.finetune_subset else self.data.train
        bn = cfg.batchnorm  # running statistics re-estimated on the pool (wfcore/batchnorm.py)
        self.stats = RunningStats.from_pool(self.model, pool, bn.samples, cfg.seed + 2,
                                            self.device, enabled=bn.recalibrate,
                                            chunk=cfg.data.batch_size)
        self.pool_record["batchnorm"] = self.stats.record()
        degenerate = cfg.degenerate
        self.degeneracy = DegeneracyCheck(
            calibration_batch(pool, degenerate.probe_samples, cfg.seed + 2, self.device).x,
            degenerate.allow_empty_layers, degenerate.allow_constant_output)
        self.degeneracy.dense(self.model)
        guard = cfg.safeguard
        self.safeguard = Safeguard(
            self.model, self.params,
            calibration_batch(pool, guard.calibration_samples, cfg.seed + 1, self.device),
            alphas=list(guard.alphas), enabled=guard.enabled,
            fallback=guard.fallback == "magnitude", labels=cfg.fisher.labels,
            chunk=cfg.data.batch_size, loss_fn=self.loss_fn, screen=guard.screen_samples,
            stats=self.stats)
        # a baseline's own mask is its result: the safeguard never replaces it
        self.baseline = components.estimator.baseline or components.scorer.baseline
        self.dense_fit = DenseFit(components.estimator, cfg.fisher.reuse_dense)
        fisher = cfg.fisher
        self.sampler = GradientSampler(
            self.model, self.params, self.masks.keep, pool, self.loss_fn,
            num_grads=fisher.num_grads, grad_batch=fisher.grad_batch, labels=fisher.labels,
            seed=cfg.seed, device=self.device, dtype=fisher.storage_dtype,
            offload=fisher.offload, method=fisher.grad_method)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test, batch_size=self.cfg.data.batch_size,
                        loss_fn=self.loss_fn, device=self.device,
                        num_workers=self.cfg.data.num_workers)

    def restore_dense(self) -> None:
        """The dense model, no masks, and the gradient sampler back at its seed."""
        structured_run.restore_dense(self)
        self.model.load_state_dict(self.dense_state)
        self.masks.reset()
        self.sampler.reset()
        self.dense_fit.restored()

    def gradient_store(self) -> GradientStore:
        """An empty store for this step's m gradient rows, where the plan puts it."""
        fisher, layout = self.cfg.fisher, self.sampler.layout
        dtype = STORAGE_DTYPES[fisher.storage_dtype]
        place = store_place(fisher.store, store_bytes(fisher.num_grads, layout.d, dtype))
        host = torch.device("cpu") if fisher.offload else self.device
        if distributed.world() > 1 and distributed.one_machine() and host.type == "cpu":
            return GradientStore.shared_by_ranks(fisher.num_grads, layout.d, dtype=dtype,
                                                 place=place, directory=self.store_dir)
        return GradientStore(fisher.num_grads, layout.d, dtype=dtype, place=place,
                             directory=self.store_dir, device=host,
                             pin=fisher.offload and self.device.type == "cuda")

    def prune_to(self, target: float, timings: dict[str, float]) -> dict[str, Any]:
        """gradients -> estimate -> score -> allocate -> update (safeguarded): the model ends
        at ``target`` sparsity. Each stage is timed; the gradient store lives for this step
        only (it is closed, and an on-disk one removed, also on an error or Ctrl-C).

        Returns the safeguard's record of the step (damp, alpha, loss increases).
        """
        if self.cfg.structure.unit in ("channel", "head"):
            return structured_run.prune_to(self, target, timings)
        c = self.c
        needs, block = c.need_gradients(), self.cfg.structure.block
        stats_before = self.stats.mark()
        pattern = parse_pattern(self.cfg.structure.pattern)  # N:M: the masks' own rule
        with ExitStack() as stack:
            gradients, curvature = self.dense_fit.take() or (None, None)
            if needs and curvature is None:
                start = time.perf_counter()
                owner = self.dense_fit.stack if self.dense_fit.keeps() else stack
                gradients = owner.enter_context(self.gradient_store())
                self.sampler.sample_into(gradients)
                timings["gradients"] += time.perf_counter() - start
            problem = PruningProblem(self.model, self.params, self.masks, self.sampler,
                                     self.loss_fn, self.device,
                                     gradients if c.estimator.needs_gradients else None)
            if curvature is None:
                start = time.perf_counter()
                curvature = c.estimator.fit(problem)
                timings["estimate"] += time.perf_counter() - start
                self.dense_fit.put(gradients, curvature)
            start = time.perf_counter()
            gradient = (self.sampler.layout.unflatten(gradients.mean().to(self.device))
                        if c.scorer.needs_gradient else None)
            weights = problem.weights()
            scores = c.scorer.block_scores(weights, curvature, gradient, self.masks.keep, block)
            for n, s in scores.items():
                if s.shape != weights[n].shape or not torch.isfinite(s[self.masks.keep[n]]).all():
                    raise WfcoreError(f"scorer '{self.cfg.scorer.name}' gave non-finite or "
                                      f"misshapen scores for '{n}'")
            new_keep = (nm_keep(scores, self.masks.keep, pattern) if pattern is not None
                        else c.allocator.allocate(scores, dict(self.masks.keep), target))
            new_keep = distributed.broadcast_masks(new_keep)  # rank 0's threshold everywhere
            prune_mask = {n: self.masks.keep[n] & ~new_keep[n] for n in new_keep}
            del scores
            if isinstance(c.estimator, LayerwiseEstimator):  # each layer's own mask and update
                update, new_keep = c.estimator.prune_layers(problem, new_keep, pattern)
            else:
                update = c.scorer.update(weights, curvature, prune_mask, gradient)
            update, new_keep, record = self.safeguard.choose(
                weights, update, new_keep, curvature, gradient,
                magnitude_keep=None if self.baseline else lambda: nm_keep(
                    magnitude_scores(weights), self.masks.keep, pattern) if pattern is not None
                else c.allocator.allocate(
                    block_scores(magnitude_scores(weights), self.masks.keep, block),
                    dict(self.masks.keep), target))
            if update is not None:
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.add_(update[n].to(device=p.device, dtype=p.dtype))
            self.masks.set(new_keep)
            distributed.broadcast_module(self.model)  # every rank ends with rank 0's weights
            self.stats.refresh()  # fresh running statistics for the pruned weights
            self.dense_fit.step_done()
            timings["prune"] += time.perf_counter() - start
        record["batchnorm"] = self.stats.record(since=stats_before)
        if block > 1:
            record["whole_blocks"] = whole_blocks(self.masks.keep, block)
        if self.sampler.choice is not None:  # how per-sample gradients were taken, and why
            record["gradient_method"] = self.sampler.choice.record()
        self.degeneracy.check(self.model, self.masks, target)  # warns, or refuses
        return {"target_sparsity": target, **record}

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


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.output or Path("runs") / cfg.name).expanduser()


def check_run_dir(run_dir: Path, force: bool = False, resume: bool = False) -> None:
    """Refuse what this run may not touch: a directory that is not a run's (``rundir``),
    a finished or interrupted run unless ``force``, a finished run to ``resume``.
    Reads only: nothing is written.
    """
    rundir.check_usable(run_dir)
    if resume:
        refuse_finished_resume(run_dir)
        return
    if force:
        return
    if is_finished(run_dir):
        raise WfcoreError(f"{run_dir} holds a finished run; use --force to overwrite it "
                          "or choose another output=")
    if checkpoint.path(run_dir).is_file():
        raise WfcoreError(f"{run_dir} holds an interrupted run; continue it with "
                          f"--resume {run_dir} or start over with --force")


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
    Everything that can be checked (components, plan, data, model, dense model, run
    directory) is checked before a file of the run directory is written or removed; the
    directory is locked for the whole run.
    """
    group = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_s)
    if group.world > 1:
        log.info("distributed: %d processes (%s)", group.world, group.backend)

    def prepare() -> tuple[manager.Plugins, Components, list[Any], Path]:
        plugs = plugins or manager.build(cfg.plugins,
                                         inmemory.run_dir_plugins(cfg, run_dir_of(cfg)),
                                         base_dir=cfg.base_dir)
        components = build_components(cfg, plugs)
        plan = components.scheduler.plan()
        step = components.exporter.step if components.exporter is not None else None
        if step is not None and not 0 <= step < len(plan):
            raise ConfigError(f"config key 'export.step': {step} is not a step of the plan "
                              f"(0..{len(plan) - 1})")
        run_dir = run_dir_of(cfg)
        check_run_dir(run_dir, force, resume)
        return plugs, components, plan, run_dir

    plugins, components, plan, run_dir = distributed.agree(prepare)
    with ExitStack() as stack:  # rank 0 alone locks, reads and writes the run directory

        def lock_and_load() -> dict[str, Any] | None:
            stack.enter_context(rundir.RunLock(run_dir))
            check_run_dir(run_dir, force, resume)  # again: another run may have ended
            return checkpoint.load(run_dir, cfg) if resume else None

        saved = distributed.on_main(lock_and_load)
        pruning = Pruning(cfg, plugins, components, run_dir)

        def start() -> None:
            if saved is None:
                rundir.clear(run_dir)  # no step, report or export of an earlier run stays
            rundir.claim(run_dir)
            files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))

        distributed.on_main(start)
        return run_plan(pruning, plan, saved)


def run_plan(pruning: Pruning, plan: list[Any], saved: dict[str, Any] | None) -> dict[str, Any]:
    """The steps, the export and the report of a prepared run."""
    cfg, components, run_dir = pruning.cfg, pruning.c, pruning.run_dir
    report = Report(run_dir, config_mod.to_dict(cfg), write=distributed.is_main())
    report.data["pruning_data"] = pruning.pool_record
    overrides = components.scheduler.train_overrides()
    runner = Runner(pruning, plan, report, overrides)
    if saved is not None:
        runner.restore(saved)
    # the processes of this part of the run (and of the parts before a --resume)
    parts = report.data.get("distributed", {}).get("parts", []) + [distributed.provenance()]
    report.data["distributed"] = {**distributed.provenance(), "parts": parts}
    if saved is None:
        report.data["plan"] = pruning.plan.as_dict()
        report.data["prunable"] = prunable_summary(cfg, pruning.model, pruning.params)
        report.data["versions"] = versions(pruning.plugins)
        if distributed.is_main():
            files.save_torch(run_dir / "dense.pt", pruning.model_state())
        dense = pruning.evaluate()
        report.set_dense(accuracy=dense["accuracy"], loss=dense["loss"],
                         params=sum(p.numel() for p in pruning.model.parameters()),
                         prunable=pruning.masks.numel(), source=pruning.dense_source)
        log.info("dense: top-1 %s, loss %s", number(dense["accuracy"], ".4f"),
                 number(dense["loss"], ".4f"))
        runner.save()
    try:
        runner.run()
    finally:  # the dense fit kept for oneshot's targets (an on-disk store is removed)
        pruning.dense_fit.close()
    # whether every rank ended with the same model, bit for bit
    report.data["distributed"]["replicas_equal"] = distributed.same_on_every_rank(
        pruning.model.state_dict())
    if not distributed.is_main():  # rank 0 alone exports and writes the report
        return report.data
    failed = None
    if components.exporter is not None:
        failed = runs.export_stage(pruning, report)  # None, or why it failed (one line)
    report.finish()
    checkpoint.path(run_dir).unlink(missing_ok=True)  # finished: nothing left to resume
    pruning.plugins.hook.wfcore_run_end(report=report.data, run_dir=str(run_dir),
                                        options=components.hooks)
    if failed is not None:
        raise WfcoreError(f"export failed: {failed}; the pruned steps are saved in {run_dir}: "
                          f"wfcore export {run_dir} [--opset N] exports them")
    return report.data
