"""The ``onnx`` exporter: a pruned model to ONNX, with its zeros and outputs checked.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) writes the model in
eval mode with the batch dimension dynamic. Two checks follow, and the export fails
with a one-line error if either does not hold:

- every weight that is zero in PyTorch is zero in the ONNX initializers (a
  per-initializer sparsity table; see export/checks.py for how weights are found);
- ONNX Runtime's outputs match PyTorch's on a batch (max abs difference <= ``atol``).

The exporter converts the model it is given; ``wfcore export RUN`` (wfcore/runs.py)
rebuilds a run's model, loads a step's weights and drives it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from wfcore import hookimpl
from wfcore.errors import ConfigError, WfcoreError
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
               data: DataBundle | None = None, params: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        params = params if params is not None else conv_linear_weights(model)
        result = export_checked(model, example, path, self.options, params, metadata)
        if self.options.quantize == "int8":
            export_int8(result, params, data, self.options, metadata)
        return result

    def outputs(self, path: str) -> list[str]:
        return [path, *([str(int8_path(path))] if self.options.quantize == "int8" else [])]

    def check_data(self, data: DataBundle) -> None:
        """INT8 calibrates on ``calibration_samples`` training samples: they must exist."""
        count, available = self.options.calibration_samples, len(data.train)
        if self.options.quantize == "int8" and count > available:
            raise ConfigError(f"config key 'export.calibration_samples': {count} is more than "
                              f"the {available} training samples")


OnnxExporter.Options = OnnxOptions


@hookimpl
def wfcore_exporters():
    return {"onnx": OnnxExporter}
