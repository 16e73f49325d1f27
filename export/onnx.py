"""The ``onnx`` exporter: a pruned model to ONNX, with its zeros and outputs checked.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) writes the model in
eval mode with the batch dimension dynamic. Two checks follow, and the export fails
with a one-line error if either does not hold:

- every weight that is zero in PyTorch is zero in the ONNX initializers (a
  per-initializer sparsity table; see export/checks.py for how weights are found);
- ONNX Runtime's outputs match PyTorch's on a batch (max abs difference <= ``atol``).

``export_run`` does the same for a finished run directory (``wfcore export``): it
rebuilds the model from the run's config.yaml, loads ``model_step<N>.pt`` and exports
the dense model (``dense.pt``) beside it for comparison.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from wfcore import hookimpl
from wfcore.errors import WfcoreError
from wfcore.interfaces import DataBundle, Exporter

from . import checks
from . import quantize as quantize_module

log = logging.getLogger(__name__)

MIN_OPSET = 13


@dataclass
class OnnxOptions:
    opset: int = 13  # ONNX opset (13 or newer); 13 is the widest supported by DeepSparse 1.8
    atol: float = 1e-4  # parity: max |ONNX Runtime - PyTorch| allowed on the check batch
    parity_batch: int = 8  # inputs in the parity batch (the example repeated plus noise)
    step: Optional[int] = None  # pipeline: the step whose model is exported; null = last step
    dense: bool = True  # pipeline: also export the dense model as dense.onnx beside it
    # INT8: none, or int8 = also write <name>.int8.onnx beside each export, statically
    # quantized with its zeros kept (export/quantize.py), and its top-1 in the report
    quantize: str = "none"
    # the engine the INT8 file is laid out for: onnxruntime (QDQ, per-channel weights) |
    # deepsparse (QLinearConv etc., per-tensor weights: all DeepSparse 1.8 compiles)
    quantize_for: str = "onnxruntime"
    calibration_samples: int = 256  # training samples (never test) calibrating activations

    def validate(self) -> None:
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset must be {MIN_OPSET} or newer, got {self.opset}")
        if not self.atol > 0:
            raise ValueError("atol must be positive")
        if self.parity_batch < 1:
            raise ValueError("parity_batch must be at least 1")
        if self.quantize not in quantize_module.MODES:
            raise ValueError(f"quantize must be one of {', '.join(quantize_module.MODES)}, "
                             f"got '{self.quantize}'")
        if self.quantize_for not in quantize_module.LAYOUTS:
            raise ValueError(f"quantize_for must be one of "
                             f"{', '.join(quantize_module.LAYOUTS)}, got '{self.quantize_for}'")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be at least 1")


def conv_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of every Conv and Linear layer: what pruning zeroes and ONNX must keep."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {f"{name}.weight" if name else "weight": m.weight.detach()
            for name, m in model.named_modules() if isinstance(m, kinds)}


def parity_inputs(example: torch.Tensor, batch: int, seed: int = 0) -> torch.Tensor:
    """A batch for the parity check: the example's first item, then noise of its scale."""
    g = torch.Generator().manual_seed(seed)
    one = example[:1].detach().float().cpu()  # (1, ...)
    scale = float(one.std()) if one.numel() > 1 and float(one.std()) > 0 else 1.0
    noise = torch.randn((batch - 1, *one.shape[1:]), generator=g) * scale
    return torch.cat([one, noise + float(one.mean())])  # (batch, ...)


def torch_to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                  opset: int = 13) -> Path:
    """Write ``model`` (eval mode, CPU) to ``path`` with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["output"], do_constant_folding=True,
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def export_checked(model: nn.Module, example: torch.Tensor, path: str | Path,
                   options: OnnxOptions | None = None,
                   params: dict[str, torch.Tensor] | None = None,
                   metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Export, then check zeros and parity; returns the checks for the report.

    ``params``: the weights whose zeros must survive (default: every Conv/Linear weight).
    ``metadata``: strings stored in the ONNX file (``wfcore.*`` keys), e.g. the run.
    """
    import onnx

    options = options or OnnxOptions()
    model = model.cpu().eval()
    example = example.detach().float().cpu()[:1]
    path = Path(path)
    # Checked under a temporary name: ``path`` only ever holds a file that passed.
    tmp = torch_to_onnx(model, example, path.with_name(f".{path.stem}.unchecked.onnx"),
                        options.opset)
    proto = onnx.load(str(tmp))
    if metadata:
        for key, value in metadata.items():
            proto.metadata_props.add(key=f"wfcore.{key}", value=str(value))
        onnx.save(proto, str(tmp))
    params = params if params is not None else conv_linear_weights(model)
    try:
        table = checks.check_zeros(proto, params)
        parity = checks.check_parity(str(tmp), model,
                                     parity_inputs(example, options.parity_batch), options.atol)
    except WfcoreError as exc:
        failed = tmp.replace(path.with_name(f"{path.stem}.failed.onnx"))
        raise WfcoreError(f"{path}: {exc} (the export is kept as {failed})") from None
    tmp.replace(path)
    path.with_name(f"{path.stem}.failed.onnx").unlink(missing_ok=True)
    log.info("exported %s: opset %d, %d/%d weights zero (all kept), parity max diff %.2g",
             path, options.opset, table["torch_zeros"], table["numel"], parity["max_abs_diff"])
    log.debug("ONNX sparsity:\n%s", checks.format_sparsity(table))
    return {
        "path": str(path),
        "opset": options.opset,
        "sparsity": table["torch_zeros"] / max(table["numel"], 1),
        "zeros": {k: table[k] for k in ("numel", "torch_zeros", "onnx_zeros", "kept_zeros")},
        "initializers": table["rows"],
        "parity": parity,
    }


def int8_path(path: str | Path) -> Path:
    """Where the INT8 model of ``path`` goes: ``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def export_int8(result: dict[str, Any], params: dict[str, torch.Tensor],
                data: DataBundle | None, options: OnnxOptions,
                metadata: dict[str, str] | None = None, seed: int = 0) -> None:
    """Quantize the checked export ``result`` to INT8 beside it; in place, the float and the
    INT8 model's top-1 (ONNX Runtime, test set) into ``result`` (``top1``, ``quantized``).

    Calibration: ``options.calibration_samples`` of ``data.train``, drawn with ``seed``.
    """
    if data is None:
        raise WfcoreError("export.quantize=int8 needs the run's data set (training samples "
                          "to calibrate, the test set for top-1)")
    calibration = quantize_module.calibration_inputs(data.train, options.calibration_samples,
                                                     seed)
    quantized = quantize_module.quantize_int8(result["path"], int8_path(result["path"]),
                                              calibration, params, options.quantize_for,
                                              metadata=metadata)
    result["top1"] = quantize_module.onnx_top1(result["path"], data.test)
    quantized["top1"] = quantize_module.onnx_top1(quantized["path"], data.test)
    result["quantized"] = quantized
    log.info("top-1 on the test set (ONNX Runtime): float %.2f%%, INT8 %.2f%% (%s)",
             100 * result["top1"], 100 * quantized["top1"], Path(quantized["path"]).name)


class OnnxExporter(Exporter):
    """The registered exporter: ``export: {name: onnx, opset: 13, ...}``."""

    def __init__(self, options: OnnxOptions | dict | None = None):
        self.options = options if isinstance(options, OnnxOptions) else OnnxOptions()
        self.step = self.options.step  # read by the pipeline's export stage
        self.dense = self.options.dense
        if self.options.quantize == "int8":
            quantize_module.quantization_tools()  # a missing piece: refused before the run

    def export(self, model: nn.Module, example: torch.Tensor, path: str,
               data: DataBundle | None = None) -> dict[str, Any]:
        params = conv_linear_weights(model)
        result = export_checked(model, example, path, self.options, params)
        if self.options.quantize == "int8":
            export_int8(result, params, data, self.options)
        return result


OnnxExporter.Options = OnnxOptions


# -- run directories (wfcore export) -----------------------------------------------------

def steps_in(run_dir: Path) -> list[int]:
    """The step indices with a saved model in ``run_dir``, ascending."""
    found = (re.fullmatch(r"model_step(\d+)\.pt", p.name) for p in run_dir.glob("model_step*.pt"))
    return sorted(int(m.group(1)) for m in found if m)


@dataclass
class Rebuilt:
    """A run's model (its architecture, weights not loaded), rebuilt from its config.yaml."""

    cfg: Any
    model: nn.Module
    params: dict[str, torch.Tensor]  # the prunable parameters
    data: DataBundle | None  # None when only the shapes were given


def rebuild(run_dir: Path, shapes: tuple[tuple[int, ...], int] | None = None,
            plugins: Any = None) -> Rebuilt:
    """The model of a run, from its config.yaml.

    ``shapes``: (input shape, number of classes) when known (from an ONNX file); then the
    data set is not loaded. ``plugins``: the loaded plugins to build with (default: the
    installed ones and the run's ``plugins:`` modules).
    """
    from types import SimpleNamespace

    from wfcore import config as config_mod
    from wfcore import manager, pipeline
    from wfcore.masks import select_params

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise WfcoreError(f"{run_dir} is not a run directory: no config.yaml")
    cfg = config_mod.load(cfg_path)
    plugins = plugins or manager.build(cfg.plugins)
    if shapes is None:
        data = pipeline.load_data(cfg, plugins)
        model = pipeline.build_model(cfg, plugins, data)
    else:
        data = None
        model = pipeline.build_model(
            cfg, plugins, SimpleNamespace(input_shape=tuple(shapes[0]), num_classes=shapes[1]))
    return Rebuilt(cfg, model, dict(select_params(model, cfg.model.params)), data)


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
    from wfcore import rundir

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


def exporter_options(cfg: Any) -> OnnxOptions:
    """The run's ``export`` options when it names this exporter, else the defaults."""
    from wfcore import config as config_mod

    if cfg.export is None or cfg.export.name != "onnx":
        return OnnxOptions()
    return config_mod.component_options("export", cfg, OnnxOptions)


def step_for_sparsity(run_dir: Path, target: float) -> int:
    """The last step of the run's report.json whose target sparsity is ``target``."""
    import json

    try:
        steps = json.loads((run_dir / "report.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        raise WfcoreError(f"{run_dir}: no readable report.json to find sparsity {target} in") \
            from None
    found = [s["index"] for s in steps if abs(s["target_sparsity"] - target) < 1e-9]
    if not found:
        targets = sorted({s["target_sparsity"] for s in steps})
        raise WfcoreError(f"{run_dir} has no step with target sparsity {target}; targets: "
                          f"{', '.join(map(str, targets))}")
    return found[-1]


def export_run(run_dir: str | Path, step: int | None = None, output: str | Path | None = None,
               dense: bool = True, sparsity: float | None = None,
               quantize: str | None = None) -> dict[str, Any]:
    """Export step ``step`` of a run (or the last step at target ``sparsity``; default: the
    last step), and its dense model beside it.

    The sparse model goes to ``output`` (default ``RUN_DIR/model_step<N>.onnx``), the
    dense one to ``dense.onnx`` in the same directory. ``quantize``: none | int8 (default:
    the run's ``export.quantize``); int8 also writes ``<name>.int8.onnx`` beside each. Returns
    both exports' checks, which also go into the run's report (``export``).
    """
    from wfcore.pipeline import load_state

    run_dir = Path(run_dir)
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
    output = Path(output) if output else run_dir / f"model_step{step}.onnx"
    dense_output = output.with_name("dense.onnx")
    for target in (output, dense_output) if dense else (output,):
        refuse_foreign(target, run_dir)
    run = rebuild(run_dir)
    options = exporter_options(run.cfg)
    if quantize is not None:
        options.quantize = quantize
        try:
            options.validate()
        except ValueError as exc:
            raise WfcoreError(f"--quantize: {exc}") from None
    if options.quantize == "int8":
        quantize_module.quantization_tools()  # refuse a missing piece before exporting
        for target in (output, dense_output) if dense else (output,):
            refuse_foreign(int8_path(target), run_dir)
    model, data = run.model, run.data
    example = data.test[0][0].unsqueeze(0)
    state_path = run_dir / f"model_step{step}.pt"
    load_state(model, state_path, "wfcore export")
    # Paths relative to the ONNX file: nothing of the machine that made it is kept.
    where = output.parent.resolve()
    meta = {"run_dir": os.path.relpath(run_dir.resolve(), where),
            "state": os.path.relpath(state_path.resolve(), where), "step": str(step)}
    params = {n: p.detach() for n, p in run.params.items()}
    result = {"step": step, "sparse": export_checked(model, example, output, options, params,
                                                     meta)}
    if options.quantize == "int8":
        export_int8(result["sparse"], params, data, options, meta)
    if dense:
        dense_path = run_dir / "dense.pt"
        dense_model = copy.deepcopy(model)
        load_state(dense_model, dense_path, "wfcore export (dense model)")
        meta = {**meta, "state": os.path.relpath(dense_path.resolve(), where), "step": "dense"}
        dense_params = {n: p.detach() for n, p in dense_model.named_parameters() if n in params}
        result["dense"] = export_checked(dense_model, example, dense_output, options,
                                         dense_params, meta)
        if options.quantize == "int8":
            export_int8(result["dense"], dense_params, data, options, meta)
    record_in_report(run_dir, result)
    return result


def report_steps(run_dir: Path) -> set[int] | None:
    """The step indices in the run's report.json; None when it has no readable one."""
    import json

    try:
        report = json.loads((run_dir / "report.json").read_text())
        return {int(s["index"]) for s in report["steps"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
def record_in_report(run_dir: Path, result: dict[str, Any]) -> None:
    """Put ``wfcore export``'s checks into the run's report (``export``, as the pipeline's)."""
    import json

    from wfcore import files
    from wfcore.report import markdown

    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s: no readable report.json; the export is not recorded in it", run_dir)
        return
    report["export"] = {**result["sparse"], "step": result["step"]}
    if "dense" in result:
        report["export"]["dense"] = result["dense"]
    files.write_json(path, report)
    files.write_text(run_dir / "report.md", markdown(report))


@hookimpl
def wfcore_exporters():
    return {"onnx": OnnxExporter}
