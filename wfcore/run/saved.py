"""A finished run directory, read back: its model rebuilt from config.yaml, a step's
weights, the step at a target sparsity, and ``wfcore export RUN``, which drives the
run's exporter (``export.name``; ``onnx`` when the run names none) on a saved step and
on the dense model.

The exporter only turns a given model into a file and checks it; what is about the run
(which step, which files may be replaced, what the file records of its run, the run's
report) is here.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wfcore import config as config_mod
from wfcore import files, inmemory, manager
from wfcore.errors import ConfigError, WfcoreError, first_line
from wfcore.interfaces import DataBundle, Exporter
from wfcore.masks import select_params
from wfcore.run import directory as rundir
from wfcore.run import states
from wfcore.run.prepare import DataShapes, build_model, load_data
from wfcore.run.report import markdown

log = logging.getLogger(__name__)

DEFAULT_EXPORTER = "onnx"  # what `wfcore export` drives for a run whose config has no export


@dataclass
class Rebuilt:
    """A run's model (its architecture, weights not loaded), rebuilt from its config.yaml."""

    cfg: DictConfig
    plugins: manager.Plugins
    model: nn.Module
    params: dict[str, torch.Tensor]  # the prunable parameters
    data: DataBundle | None  # None when only the shapes were given


def rebuild(run_dir: Path, shapes: tuple[tuple[int, ...], int] | None = None,
            plugins: manager.Plugins | None = None) -> Rebuilt:
    """The model of a run, from its config.yaml.

    ``shapes``: (input shape, number of classes) when known (from an ONNX file); then the
    data set is not loaded. ``plugins``: the loaded plugins to build with (default: the
    installed ones and the run's ``plugins:`` modules).
    """
    cfg_path = rundir.RunDirectory(run_dir).config
    if not cfg_path.is_file():
        raise WfcoreError(f"{run_dir} is not a run directory: no config.yaml")
    cfg = config_mod.load(cfg_path)
    plugins = plugins or manager.build(cfg.plugins, inmemory.run_dir_plugins(cfg, run_dir),
                                       base_dir=cfg.base_dir)
    if shapes is None:
        data = load_data(cfg, plugins)
        model = build_model(cfg, plugins, data)
    else:
        data = None
        model = build_model(
            cfg, plugins, DataShapes(input_shape=tuple(shapes[0]), num_classes=shapes[1]))
    params = select_params(model, cfg.model.params, cfg.model.prunable)
    return Rebuilt(cfg, plugins, model, dict(params), data)


def load_model(run_dir: str | os.PathLike, state: str | os.PathLike | None = None, *,
               shapes: tuple[tuple[int, ...], int] | None = None,
               run_plugins: bool = True, what: str = "wfcore.load_model") -> nn.Module:
    """The model of a run directory, rebuilt from its config.yaml, with the weights of
    ``state`` (default: the run's last step), in eval mode (``wfcore.load_model``).

    ``shapes``: (input shape, number of classes) when known, so that the data set is not
    loaded. ``run_plugins=False`` refuses (WfcoreError) a run whose config names
    ``plugins:`` modules instead of importing them: a caller that found the run through a
    file it did not write imports nothing that file names. ``what`` names the caller in
    the one-line error of a state that does not fit.
    """
    run_dir = Path(run_dir)
    plugins = None
    if not run_plugins:
        named = config_mod.load(run_dir / "config.yaml").plugins
        if named:
            raise WfcoreError(f"its run imports plugins ({', '.join(named)}), and nothing "
                              "that a model file names is imported")
        plugins = manager.build()
    rebuilt = rebuild(run_dir, shapes, plugins=plugins)
    if state is None:
        steps = steps_in(run_dir)
        if not steps:
            raise WfcoreError(f"{run_dir}: no pruned model (model_step*.pt) to load")
        load_step(rebuilt.model, run_dir, steps[-1], what)
    else:
        states.load_state(rebuilt.model, Path(state), what)
    return rebuilt.model.eval()


def step_state(run_dir: Path, step: int) -> Path:
    """The state_dict file of step ``step`` of a run (``RunDirectory.step_state``)."""
    return rundir.RunDirectory(run_dir).step_state(step)


def load_step(model: nn.Module, run_dir: Path, step: int, what: str = "wfcore export") -> Path:
    """Load step ``step``'s weights into ``model``; returns the file read."""
    path = step_state(run_dir, step)
    states.load_state(model, path, what)
    return path


def steps_in(run_dir: Path) -> list[int]:
    """The step indices with a saved model in ``run_dir``, ascending."""
    return rundir.RunDirectory(run_dir).steps()


def report_steps(run_dir: Path) -> set[int] | None:
    """The step indices in the run's report.json; None when it has no readable one."""
    return rundir.RunDirectory(run_dir).report_steps()


def step_for_sparsity(run_dir: Path, target: float) -> int:
    """The last step of the run's report.json whose target sparsity is ``target``."""
    try:
        steps = (rundir.read_report(run_dir) or {})["steps"]
    except KeyError:
        raise WfcoreError(f"{run_dir}: no readable report.json to find sparsity {target} in") \
            from None
    found = [s["index"] for s in steps if abs(s["target_sparsity"] - target) < 1e-9]
    if not found:
        targets = sorted({s["target_sparsity"] for s in steps})
        raise WfcoreError(f"{run_dir} has no step with target sparsity {target}; targets: "
                          f"{', '.join(map(str, targets))}")
    return found[-1]


def choose_step(run_dir: Path, step: int | None = None, sparsity: float | None = None) -> int:
    """The saved step to export: ``step``, or the last one at target ``sparsity``, else the
    last one saved. It must be a step of the run's report.json when there is one."""
    if not run_dir.is_dir():
        raise WfcoreError(f"run directory not found: {run_dir}")
    steps = steps_in(run_dir)
    if not steps:
        raise WfcoreError(f"{run_dir} holds no model_step<N>.pt: has the run pruned anything?")
    if sparsity is not None:
        if step is not None:
            raise WfcoreError("give a step or a sparsity, not both")
        step = step_for_sparsity(run_dir, sparsity)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise WfcoreError(f"{run_dir} has no step {step}; saved steps: "
                          f"{', '.join(map(str, steps))}")
    reported = report_steps(run_dir)
    if reported is not None and step not in reported:
        raise WfcoreError(f"{run_dir}: model_step{step}.pt is not a step of the run's "
                          "report.json (left by another run?); steps reported: "
                          f"{', '.join(map(str, sorted(reported))) or 'none'}")
    return step


def run_of(path: Path) -> Path | None:
    """The run directory that an ONNX file written by ``wfcore export`` names (resolved
    against the file's own directory), or None for any other file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: certainly not one of ours
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    run_dir = meta.get("wfcore.run_dir")
    return (path.parent / run_dir).resolve() if run_dir else None


def refuse_foreign(path: Path, run_dir: Path) -> None:
    """``path`` may be written: it is missing, a file the run wrote in its own directory,
    or an earlier ``wfcore export`` of this run. Anything else is kept."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise WfcoreError(f"{path} is a directory; give the ONNX file's name")
    if path.parent.resolve() == run_dir.resolve() and rundir.is_owned(run_dir) \
            and path.resolve() in {p.resolve() for p in rundir.owned_files(run_dir)}:
        return
    if run_of(path) != run_dir.resolve():
        raise WfcoreError(f"{path} exists and is not an export of {run_dir}; wfcore export "
                          "replaces only its own files: remove it or choose another -o")


def export_overrides(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``export.KEY=VALUE`` dot-list arguments of ``wfcore export`` as {KEY: value}: only
    the export section may change (the rest of the config made the run's weights)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.startswith("export.") or key == "export.":
            raise ConfigError(f"wfcore export: '{item}' is not an export.KEY=VALUE override "
                              "(only the export section may change after a run)")
        try:
            parsed = OmegaConf.from_dotlist([item])
        except Exception as exc:  # OmegaConf's grammar errors
            raise ConfigError(f"wfcore export: '{item}': {first_line(exc)}") from None
        out.update(config_mod.to_dict(parsed.export))
    return out


def run_exporter(cfg: DictConfig, plugins: manager.Plugins,
                 quantize: str | None = None, opset: int | None = None,
                 overrides: dict[str, Any] | None = None) -> Exporter:
    """The exporter the run's ``export`` section names (``onnx`` with its defaults when it
    names none), with ``overrides`` (``export_overrides``), then ``quantize`` and ``opset``,
    in place of its options when given."""
    section = config_mod.to_dict(cfg.export) if cfg.export is not None \
        else {"name": DEFAULT_EXPORTER}
    if overrides and "name" in overrides and overrides["name"] != section.get("name"):
        section = {}  # another exporter: the run's options are not its options
    given = {**(overrides or {}),
             **{k: v for k, v in (("quantize", quantize), ("opset", opset)) if v is not None}}
    section.update(given)
    try:
        return plugins.create("exporters", manager.Section.of(section, "export"), seed=cfg.seed)
    except ConfigError as exc:
        if not given:
            raise
        raise ConfigError(f"wfcore export {' '.join(f'export.{k}' for k in given)}: "
                          f"{first_line(exc)}") from None


def export_run(run_dir: str | Path, step: int | None = None, output: str | Path | None = None,
               dense: bool = True, sparsity: float | None = None,
               quantize: str | None = None, opset: int | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Export step ``step`` of a run (or the last step at target ``sparsity``; default: the
    last step), and its dense model beside it, with the run's exporter.

    The sparse model goes to ``output`` (default ``RUN_DIR/model_step<N>.onnx``), the
    dense one to ``dense.onnx`` in the same directory. ``quantize``: none | int8 (default:
    the run's ``export.quantize``). ``opset``: the ONNX opset (default: the run's
    ``export.opset``, else the lowest that exports the model). ``overrides``:
    ``export.KEY=VALUE`` in place of the run's export options, checked (with the export's
    data needs) before anything is written. The run directory is locked meanwhile: a run
    in progress there, or another export of it, is refused. Returns both exports'
    checks, which also go into the run's report (``export``).
    """
    run_dir = Path(run_dir)
    given = export_overrides(overrides)  # before anything is read
    if run_dir.is_dir():
        rundir.refuse_in_use(run_dir)  # a run in progress: its steps are not all there yet
    choose_step(run_dir, step, sparsity)  # a run directory with the step (read again, locked)
    with rundir.RunLock(run_dir, check=False):  # the files it replaces: refuse_foreign
        return _export_locked(run_dir, step, output, dense, sparsity, quantize, opset, given)


def _export_locked(run_dir: Path, step: int | None, output: str | Path | None, dense: bool,
                   sparsity: float | None, quantize: str | None, opset: int | None,
                   given: dict[str, Any]) -> dict[str, Any]:
    step = choose_step(run_dir, step, sparsity)
    output = Path(output) if output else rundir.RunDirectory(run_dir).step_onnx(step)
    targets = [output, output.with_name("dense.onnx")] if dense else [output]
    for target in targets:  # before anything is loaded
        refuse_foreign(target, run_dir)
    run = rebuild(run_dir)
    exporter = run_exporter(run.cfg, run.plugins, quantize, opset, given)
    if run.data is not None:  # its data needs (INT8 calibration samples), before writing
        exporter.check_data(run.data)
    for target in targets:  # and the files each export writes beside it (INT8)
        for path in exporter.outputs(str(target)):
            refuse_foreign(Path(path), run_dir)
    assert run.data is not None  # rebuilt without given shapes: with its data
    result = export_states(exporter, run_dir, step, output, lambda: copy.deepcopy(run.model),
                           run.data, list(run.params), targets[1] if dense else None)
    record_in_report(run_dir, result)
    return result


def record_in_report(run_dir: Path, result: dict[str, Any]) -> None:
    """Put ``wfcore export``'s checks into the run's report (``export``, as the pipeline's)."""
    path = rundir.RunDirectory(run_dir).report_path
    report = rundir.read_report(run_dir)
    if report is None:
        log.warning("%s: no readable report.json; the export is not recorded in it", run_dir)
        return
    report["export"] = {**result["sparse"], "step": result["step"]}
    if "dense" in result:
        report["export"]["dense"] = result["dense"]
    files.write_json(path, report)
    files.write_text(run_dir / "report.md", markdown(report))


def export_states(exporter: Exporter, run_dir: Path, step: int, output: Path,
                  architecture: Callable[[], nn.Module], data: DataBundle, names: list[str],
                  dense: Path | None = None) -> dict[str, Any]:
    """Step ``step``'s saved weights (``model_step<N>.pt``) exported to ``output`` and, with
    ``dense``, the dense weights (``dense.pt``) to ``dense``: each loaded into a fresh
    ``architecture()`` (a shrunk one rebuilt from its state), the zeros of the weights
    ``names`` checked, the file naming its run and state (``metadata``, paths relative to
    the file: what ``wfcore bench`` rebuilds the PyTorch model from). The one export of a
    run: ``wfcore export`` and the pipeline's export stage."""
    example = data.test[0][0].unsqueeze(0)
    where = output.parent.resolve()  # paths relative to the file: nothing of the machine
    result: dict[str, Any] = {"step": step}
    made = [("sparse", output, step_state(run_dir, step), str(step), "wfcore export")]
    if dense is not None:
        made.append(("dense", dense, run_dir / "dense.pt", "dense",
                       "wfcore export (dense model)"))
    for label, path, state, tag, what in made:
        model = architecture()
        states.load_state(model, state, what)
        meta = {"run_dir": os.path.relpath(run_dir.resolve(), where),
                "state": os.path.relpath(state.resolve(), where), "step": tag}
        params = {n: p.detach() for n, p in model.named_parameters() if n in names}
        result[label] = exporter.export(model.cpu().eval(), example, str(path), data=data,
                                        params=params, metadata=meta)
    return result


def export_stage(exporter: Exporter, run_dir: Path, step: int,
                 architecture: Callable[[], nn.Module], data: DataBundle, names: list[str],
                 report: Any) -> str | None:
    """The pipeline's export stage: ``export_states`` of step ``step`` (``export.step``,
    else the last) to ``model.onnx`` and, with ``export.dense``, of the dense model to
    ``dense.onnx``; the checks go into the report (``wfcore.run.report.Report``).

    A failure leaves the pruned steps usable: it is recorded in the report (``export.error``)
    and returned as one line, for the run to finish first and then say.
    """
    try:
        result = export_states(exporter, run_dir, step, run_dir / "model.onnx", architecture,
                               data, names, run_dir / "dense.onnx" if exporter.dense else None)
        report.data["export"] = result["sparse"]
        if "dense" in result:
            report.data["export"]["dense"] = result["dense"]
    except Exception as exc:  # the pruned steps stay usable: the run still finishes
        log.debug("export failed", exc_info=True)
        report.data["export"] = {"error": first_line(exc),
                                 "redo": f"wfcore export {run_dir} [--opset N]"}
        return first_line(exc)
    return None
