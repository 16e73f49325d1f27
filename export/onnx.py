"""The ``onnx`` exporter: a pruned model to ONNX, with its zeros and outputs checked.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) writes the model in
eval mode with the batch dimension dynamic. Two checks follow, and the export fails
with a one-line error if either does not hold:

- every weight that is zero in PyTorch is zero in the ONNX initializers (a
  per-initializer sparsity table; see export/checks.py for how weights are found);
- ONNX Runtime's outputs match PyTorch's on a batch (max abs difference <= ``atol``).

The exporter converts the model it is given; ``wfcore export RUN`` (wfcore/run/saved.py)
rebuilds a run's model, loads a step's weights and drives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from wfcore import ConfigError, DataBundle, Exporter, WfcoreError, dataset_size, files, hookimpl
from wfcore.masks import select_params

from . import checks, opsets
from . import quantize as quantize_module

log = logging.getLogger(__name__)

MIN_OPSET = opsets.MIN_OPSET


@dataclass
class OnnxOptions:
    # ONNX opset (13 or newer); null = the lowest from 13 up that exports the model (13 is
    # the widest supported by DeepSparse 1.8; attention needs 14), checked in the plan
    opset: Optional[int] = None
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
        if self.opset is not None and self.opset < MIN_OPSET:
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
    """The weights of the default prunable set (``wfcore.prunable``: Linear, Conv,
    ConvTranspose, attention in-projections): what pruning zeroes and ONNX must keep."""
    return {n: p.detach() for n, p in select_params(model, None).items()}


def parity_inputs(example: torch.Tensor, batch: int, seed: int = 0,
                  data: DataBundle | None = None) -> torch.Tensor:
    """A batch for the parity check: distinct samples of the test set when ``data`` is
    given (inputs on which a trained model's outputs differ from each other), else the
    example's first item, then noise of its scale."""
    if data is not None and dataset_size(data.test) >= 2:
        items = [data.test[i] for i in range(min(batch, dataset_size(data.test)))]
        return torch.stack([(it[0] if isinstance(it, (tuple, list)) else it).detach().float()
                            for it in items]).cpu()
    g = torch.Generator().manual_seed(seed)
    one = example[:1].detach().float().cpu()  # (1, ...)
    scale = float(one.std()) if one.numel() > 1 and float(one.std()) > 0 else 1.0
    noise = torch.randn((batch - 1, *one.shape[1:]), generator=g) * scale
    return torch.cat([one, noise + float(one.mean())])  # (batch, ...)


def torch_to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                  opset: int | None = None) -> Path:
    """Write ``model`` (eval mode, CPU) to ``path`` with a dynamic batch dimension, at
    ``opset`` or (None) the lowest that exports it (export/opsets.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opsets.export_lowest(model, example, path, opset)
    return path


def export_checked(model: nn.Module, example: torch.Tensor, path: str | Path,
                   options: OnnxOptions | None = None,
                   params: dict[str, torch.Tensor] | None = None,
                   metadata: dict[str, str] | None = None,
                   data: DataBundle | None = None) -> dict[str, Any]:
    """Export, then check zeros and parity; returns the checks for the report.

    ``params``: the weights whose zeros must survive (default: the default prunable set,
    ``wfcore.masks.select_params``). ``metadata``: strings stored in the ONNX file
    (``wfcore.*`` keys), e.g. the run. ``data``: parity runs on its test samples.
    """
    import onnx

    options = options or OnnxOptions()
    model = model.cpu().eval()
    example = example.detach().float().cpu()[:1]
    path = Path(path)
    # Checked under a temporary name: ``path`` only ever holds a file that passed.
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.temporary(path, ".unchecked.onnx") as tmp:
        opset, why = opsets.export_lowest(model, example, tmp, options.opset)
        proto = onnx.load(str(tmp))
        if metadata:
            for key, value in metadata.items():
                proto.metadata_props.add(key=f"wfcore.{key}", value=str(value))
            onnx.save(proto, str(tmp))
        params = params if params is not None else conv_linear_weights(model)
        try:
            table = checks.check_zeros(proto, params)
            parity = checks.check_parity(str(tmp), model,
                                         parity_inputs(example, options.parity_batch, data=data),
                                         options.atol)
        except WfcoreError as exc:
            failed = tmp.replace(path.with_name(f"{path.stem}.failed.onnx"))
            raise WfcoreError(f"{path}: {exc} (the export is kept as {failed})") from None
        tmp.replace(path)
    path.with_name(f"{path.stem}.failed.onnx").unlink(missing_ok=True)
    log.info("exported %s: %s, %d/%d weights zero (all kept), parity max diff %.2g",
             path, why, table["torch_zeros"], table["numel"], parity["max_abs_diff"])
    if table["untraced"]:
        log.warning("exported %s: the zeros of %s are not verified (no initializer traced)",
                    path, ", ".join(table["untraced"]))
    log.debug("ONNX sparsity:\n%s", checks.format_sparsity(table))
    return {
        "path": str(path),
        "opset": opset,
        "sparsity": table["torch_zeros"] / max(table["numel"], 1),
        "zeros": {k: table[k] for k in ("numel", "torch_zeros", "onnx_zeros", "kept_zeros")},
        "untraced": table["untraced"],
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

    Options = OnnxOptions

    def __init__(self, options: OnnxOptions | dict | None = None):
        self.options = options if isinstance(options, OnnxOptions) else OnnxOptions()
        self.step = self.options.step  # read by the pipeline's export stage
        self.dense = self.options.dense
        if self.options.quantize == "int8":
            quantize_module.quantization_tools()  # a missing piece: refused before the run

    def export(self, model: nn.Module, example: torch.Tensor, path: str,
               data: DataBundle | None = None, params: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        params = params if params is not None else conv_linear_weights(model)
        result = export_checked(model, example, path, self.options, params, metadata, data)
        if self.options.quantize == "int8":
            export_int8(result, params, data, self.options, metadata)
        return result

    def outputs(self, path: str) -> list[str]:
        return [path, *([str(int8_path(path))] if self.options.quantize == "int8" else [])]

    def check(self, model: nn.Module, example: torch.Tensor) -> str:
        """The opset the model exports at (``export.opset``, or the lowest that works)."""
        _, why = opsets.check_exportable(model, example, self.options.opset)
        return f"export: onnx, {why}"

    def check_data(self, data: DataBundle) -> None:
        """INT8 calibrates on ``calibration_samples`` training samples: they must exist."""
        count, available = self.options.calibration_samples, dataset_size(data.train)
        if self.options.quantize == "int8" and count > available:
            raise ConfigError(f"config key 'export.calibration_samples': {count} is more than "
                              f"the {available} training samples")


@hookimpl
def wfcore_exporters():
    return {"onnx": OnnxExporter}
