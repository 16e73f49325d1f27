"""run(config): setup (model, data, plan, dense weights) -> pruning steps -> report ->
export.

``set_up`` builds what a run is made from once (``wfcore.run.prepare.RunSetup``); the steps
(``wfcore.run.pruning.Pruning``) are driven by the Runner (``wfcore.run.runner``) through methods
that return their results; ``run_plan`` writes the report and the export.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wfcore import config as config_mod
from wfcore import distributed, files, inmemory, manager, prunable
from wfcore.errors import ConfigError, WfcoreError
from wfcore.fisher.plan import Plan, make_plan
from wfcore.interfaces import (
    DataBundle,
    LayerwiseEstimator,
    Loss,
    PruneStep,
    dataset_size,
)
from wfcore.masks import select_params
from wfcore.run import admission, checkpoint
from wfcore.run import directory as rundir
from wfcore.run import saved as runs
from wfcore.run.prepare import (  # noqa: F401  (the setup of a run, re-exported here)
    Components,
    RunSetup,
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
    pool_size,
    pruning_subset,
    resolve_device,
    versions,
)
from wfcore.run.pruning import Pruning
from wfcore.run.report import Report, number
from wfcore.run.runner import Runner
from wfcore.run.safeguard_plan import safeguard_cost

log = logging.getLogger(__name__)


def resolved_config(cfg: DictConfig, plugins: manager.Plugins) -> DictConfig:
    """The config with every component's options validated and their defaults filled in
    (``wfcore config``)."""
    out = OmegaConf.create(config_mod.to_dict(cfg))
    for section, kind in config_mod.COMPONENT_KINDS.items():
        if cfg[section] is None:
            continue
        options = plugins.choose(kind, manager.Section.of(cfg[section], section)).options
        values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) \
            and not isinstance(options, type) else {}
        out[section] = {"name": cfg[section].name, **values}
    for section, kind in (("model", "models"), ("data", "datasets")):
        options = plugins.choose(kind, manager.Section.nested(cfg[section], section)).options
        if dataclasses.is_dataclass(options) and not isinstance(options, type):
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
    estimator.set_guide(plugins.create("estimators",
                                       manager.Section.of(spec, "estimator.guide"), seed=seed))


def store_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Where an on-disk gradient store goes: ``fisher.store_dir``, else the run directory."""
    return Path(cfg.fisher.store_dir or run_dir).expanduser()


def plan_run(cfg: DictConfig, components: Components, model: nn.Module,
             params: dict[str, nn.Parameter], data: DataBundle, loss_fn: Loss,
             device: torch.device, store_dir: Path, calibrate: bool = True,
             nproc: int = 1) -> Plan:
    """The plan of the run's first pruning step (``wfcore.fisher.plan``) for ``nproc`` processes."""
    item = data.train[0]
    example = item[0] if isinstance(item, (tuple, list)) else item
    # unlabelled data (sampled labels): class 0 stands in for the label
    target = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else 0
    needs = components.need_gradients()
    plan = make_plan(model=model, params=params, example=example.unsqueeze(0).to(device),
                     target=torch.as_tensor(target).unsqueeze(0), loss_fn=loss_fn,
                     estimator=components.estimator, estimator_name=cfg.estimator.name,
                     needs_gradients=needs, fisher=cfg.fisher, store_dir=store_dir,
                     device=device, calibrate=calibrate, nproc=nproc,
                     block=cfg.structure.block,
                     shared_host=nproc > 1 and distributed.one_machine())
    pool = pool_size(dataset_size(data.train), cfg.data.train_fraction)
    guard = safeguard_cost(cfg, model, example.unsqueeze(0).to(device),
                           components.estimator.baseline or components.scorer.baseline,
                           calibrate, pool)
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
        stand_in = cast(DictConfig, OmegaConf.merge(cfg, {"data": {"name": "fake",
                                                                    "options": {}}}))
        data = load_data(stand_in, plugins)
        notes.append(f"data: {exc}; planned on stand-in data of shape "
                     f"{'x'.join(map(str, data.input_shape))} with {data.num_classes} classes")
    model = build_model(cfg, plugins, data).to(device)
    params = select_params(model, cfg.model.params, cfg.model.prunable)
    if not params:
        raise ConfigError("config key 'model.params': no prunable parameters selected")
    admission.admit(cfg, components.scheduler.plan(), params, None if notes else data,
                    components.allocator, components.exporter, components.need_gradients())
    run_dir = run_dir_of(cfg)
    plan = plan_run(cfg, components, model, params, data, loss_function(cfg, data), device,
                    store_dir(cfg, run_dir), nproc=nproc)
    plan.notes += notes
    return plan


def set_up(cfg: DictConfig, plugins: manager.Plugins, components: Components,
           run_dir: Path) -> RunSetup:
    """The setup of a run, built once: data, model, plan, then (after the plan's checks,
    on every rank) the dense weights, loaded or trained by rank 0 and broadcast, and the
    part of the training split that pruning sees."""
    device = resolve_device(distributed.local_device(cfg.device))
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, plugins)
    model = build_model(cfg, plugins, data).to(device)
    loss_fn = loss_function(cfg, data)
    params = select_params(model, cfg.model.params, cfg.model.prunable)
    if not params:
        raise ConfigError("config key 'model.params': no prunable parameters selected")
    # every check that can fail the run, before --force removes anything or the dense
    # model is trained (wfcore/run/admission.py)
    admission.admit(cfg, components.scheduler.plan(), params, data, components.allocator,
                    components.exporter, components.need_gradients())
    where = store_dir(cfg, run_dir)
    plan = plan_run(cfg, components, model, params, data, loss_fn, device, where,
                    nproc=distributed.world())
    for line in plan.lines():
        log.info("plan: %s", line)
    # before the dense model is trained or any gradient sampled; on every rank
    distributed.agree(plan.check)
    # rank 0 loads or trains the dense model (and alone writes the cache); every rank
    # then holds its weights
    provenance = dense_provenance(cfg, plugins, data)
    dense_source = distributed.on_main(
        lambda: dense_model(cfg, model, data, device, loss_fn, provenance))
    distributed.broadcast_module(model)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    subset_seed = cfg.seed if cfg.data.subset_seed is None else cfg.data.subset_seed
    pool, pool_record = pruning_subset(data.train, cfg.data.train_fraction, subset_seed)
    pool_record["finetune"] = "subset" if cfg.data.finetune_subset else "all"
    return RunSetup(cfg=cfg, plugins=plugins, components=components, run_dir=run_dir,
                    device=device, data=data, loss_fn=loss_fn, model=model, params=params,
                    plan=plan, store_dir=where, dense_source=dense_source,
                    provenance=provenance, dense_state=dense_state, pool=pool,
                    pool_record=pool_record,
                    finetune_data=pool if cfg.data.finetune_subset else data.train)


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the report of a finished run (``RunDirectory``)."""
    return rundir.RunDirectory(run_dir).is_finished()


def refuse_finished_resume(run_dir: Path) -> None:
    if is_finished(run_dir):
        raise WfcoreError(f"--resume {run_dir}: the run there is finished; nothing to resume "
                          "(use --force without --resume to run it again)")


def run_dir_of(cfg: DictConfig) -> Path:
    """Where a run of ``cfg`` goes (``RunDirectory.of``)."""
    return rundir.RunDirectory.of(cfg).path


def check_run_dir(run_dir: Path, force: bool = False, resume: bool = False) -> None:
    """Refuse what this run may not touch: a directory that is not a run's (``rundir``),
    a finished or interrupted run unless ``force``, a finished run to ``resume``.
    Reads only: nothing is written.
    """
    directory = rundir.RunDirectory(run_dir)
    directory.check_usable()
    state = directory.state()  # the lock tells a run in progress from an interrupted one
    if state == "in progress":
        raise rundir.in_use(run_dir, directory.holder())
    if resume:
        refuse_finished_resume(run_dir)
        return
    if force:
        return
    if state == "finished":
        raise WfcoreError(f"{run_dir} holds a finished run; use --force to overwrite it "
                          "or choose another output=")
    if state == "interrupted":
        raise WfcoreError(f"{run_dir} holds an interrupted run; continue it with "
                          f"--resume {run_dir} or start over with --force")


def resume_config(run_dir: str | Path, config_path: str | None = None,
                  overrides: Sequence[str] = ()) -> DictConfig:
    """The config to resume ``run_dir`` with: the run's own config.yaml unless a config
    file is given, with the overrides applied and ``output`` set to ``run_dir``.
    """
    run_dir = Path(run_dir).expanduser()
    overrides = list(overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).is_file():
        overrides.insert(0, config_path)  # `prune --resume DIR key=value`: no config given
        config_path = None
    rundir.refuse_in_use(run_dir)  # running still: nothing to resume yet
    refuse_finished_resume(run_dir)
    checkpoint.require(run_dir)
    config = Path(config_path) if config_path is not None else run_dir / "config.yaml"
    if config_path is None and not config.is_file():
        raise WfcoreError(f"--resume {run_dir}: config.yaml is missing; give the run's "
                          "config file as well")
    cfg = config_mod.load(config, overrides)
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
        setup = set_up(cfg, plugins, components, run_dir)
        pruning = Pruning(setup)

        def start() -> None:
            if saved is None:
                rundir.clear(run_dir)  # no step, report or export of an earlier run stays
            rundir.claim(run_dir)
            files.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))

        distributed.on_main(start)
        with distributed.lost_rank(f"continue it with torchrun --nproc-per-node "
                                   f"{distributed.world()} -m wfcore prune --resume {run_dir}"):
            return run_plan(setup, pruning, plan, saved)


def run_plan(setup: RunSetup, pruning: Pruning, plan: list[PruneStep],
             saved: dict[str, Any] | None) -> dict[str, Any]:
    """The steps, the export and the report of a run set up."""
    cfg, components, run_dir = setup.cfg, setup.components, setup.run_dir
    report = Report(run_dir, config_mod.to_dict(cfg), write=distributed.is_main())
    report.data["pruning_data"] = pruning.pruning_data()
    overrides = components.scheduler.train_overrides()
    runner = Runner(pruning, plan, report, cfg, run_dir, overrides)
    if saved is not None:
        runner.restore(saved)
    # the processes of this part of the run (and of the parts before a --resume)
    parts = report.data.get("distributed", {}).get("parts", []) + [distributed.provenance()]
    report.data["distributed"] = {**distributed.provenance(), "parts": parts}
    if saved is None:
        report.data["plan"] = setup.plan.as_dict()
        report.data["prunable"] = prunable_summary(cfg, setup.model, setup.params)
        report.data["versions"] = versions(setup.plugins)
        if distributed.is_main():
            files.save_torch(run_dir / "dense.pt", pruning.model_state())
        dense = pruning.evaluate()
        report.set_dense(accuracy=dense["accuracy"], loss=dense["loss"],
                         params=sum(p.numel() for p in setup.model.parameters()),
                         prunable=sum(p.numel() for p in setup.params.values()),
                         source=setup.dense_source)
        log.info("dense: top-1 %s, loss %s", number(dense["accuracy"], ".4f"),
                 number(dense["loss"], ".4f"))
        runner.save()
    try:
        runner.run()
    finally:  # the dense fit kept for oneshot's targets (an on-disk store is removed)
        pruning.close()
    # whether every rank ended with the same model, bit for bit
    report.data["distributed"]["replicas_equal"] = distributed.same_on_every_rank(
        setup.model.state_dict())
    if not distributed.is_main():  # rank 0 alone exports and writes the report
        return report.data
    failed = None
    if components.exporter is not None:  # None, or why it failed (one line)
        step = components.exporter.step
        failed = runs.export_stage(components.exporter, run_dir,
                                   plan[-1].index if step is None else step,
                                   pruning.architecture, setup.data, list(setup.params), report)
    report.finish()
    checkpoint.path(run_dir).unlink(missing_ok=True)  # finished: nothing left to resume
    setup.plugins.hook.wfcore_run_end(report=report.data, run_dir=str(run_dir),
                                        options=components.hooks)
    if failed is not None:
        raise WfcoreError(f"export failed: {failed}; the pruned steps are saved in {run_dir}: "
                          f"wfcore export {run_dir} [--opset N] exports them")
    return report.data
