"""INT8 static quantization of an exported ONNX model, with the pruned zeros kept.

ONNX Runtime's ``quantize_static`` rewrites a float ONNX file (one that passed the
exporter's checks) into an INT8 one:

- weights symmetric, signed int8: the zero point is 0, so a weight that is 0.0 in
  PyTorch is exactly the integer 0 in the file (and a sparse engine still sees the zeros);
- activations unsigned int8 (asymmetric), their ranges calibrated (MinMax) by running a
  stated number of **training** samples through the float model; the test set is never
  used for calibration.

The file is laid out for one engine (``LAYOUTS``):

- ``onnxruntime``: QDQ (QuantizeLinear / DequantizeLinear around the float operators,
  which ONNX Runtime fuses into integer kernels), weights per output channel, every
  operator the quantizer knows. ONNX's portable form, and the more accurate one.
- ``deepsparse``: what DeepSparse 1.8 compiles. It runs no QDQ graph and no per-channel
  weights (``Engine.fraction_of_supported_ops`` is 0.0 for both: every node would fall
  back to its bundled ONNX Runtime) and not the contrib QGemm; it does compile QLinearConv,
  QLinearAdd, QLinearMatMul and the quantized pools with per-tensor weights (1.0). So:
  operator format, weights per tensor, those operators only, each Gemm rewritten as
  MatMul + Add first so that it becomes a QLinearMatMul.

Two checks follow, and the file is written under its name only if both pass: every
PyTorch zero is still zero in the quantized file, an integer 0 for every weight stored
as int8 (the zero check of export/checks.py, which follows DequantizeLinear back to the
int8 initializer), and every int8 weight's zero point is 0. ``onnx_top1`` measures the
top-1 accuracy of an ONNX file with ONNX Runtime, for the float and the INT8 model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from wfcore import WfcoreError, dataset_size, files
from wfcore.choices import QUANTIZE_MODES

from . import checks

log = logging.getLogger(__name__)

MODES = QUANTIZE_MODES


@dataclass(frozen=True)
class Layout:
    """How an INT8 file is laid out for one engine (see the module doc)."""

    qdq: bool  # QuantizeLinear/DequantizeLinear pairs, else quantized operators (QLinearConv)
    per_channel: bool  # one weight scale per output channel, else one per tensor
    ops: tuple[str, ...] | None  # the operators quantized; None = all the quantizer knows
    matmul: bool = False  # rewrite Gemm as MatMul + Add first (QLinearMatMul, not QGemm)


LAYOUTS = {
    "onnxruntime": Layout(qdq=True, per_channel=True, ops=None),
    "deepsparse": Layout(qdq=False, per_channel=False,
                         ops=("Conv", "Add", "MatMul", "GlobalAveragePool", "MaxPool",
                              "AveragePool"), matmul=True),
}
INSTALL = "pip install 'onnxruntime>=1.16' 'ml_dtypes>=0.5'"


# onnx < 1.16 (DeepSparse 1.8 pins onnx < 1.15) lacks these TensorProto data types, which
# onnxruntime's quantization tools name at import; they use them for 4-bit types only.
# Their numbers are onnx's own (onnx.proto: UINT4 = 21, INT4 = 22).
MISSING_ONNX_TYPES = {"UINT4": 21, "INT4": 22}


def quantization_tools() -> Any:
    """``onnxruntime.quantization``; a missing piece is refused in one line."""
    from onnx import TensorProto

    for name, value in MISSING_ONNX_TYPES.items():
        if not hasattr(TensorProto, name):
            setattr(TensorProto, name, value)
    try:
        import onnxruntime.quantization as ortq
    except ImportError as exc:  # e.g. ml_dtypes, which the quantization tools import
        raise WfcoreError(f"INT8 quantization needs onnxruntime's quantization tools, which "
                          f"cannot be imported ({exc}); install them: {INSTALL}") from None
    return ortq


class _NoPreprocessingAdvice(logging.Filter):
    """Drops the quantizer's advice to pre-process: it would only optimise the graph (the
    exporter already folds constants and BatchNorm) and names no problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def calibration_inputs(dataset: Dataset, count: int, seed: int = 0) -> np.ndarray:
    """``count`` inputs drawn (seeded, without replacement) from ``dataset``: (count, ...)."""
    if count < 1:
        raise WfcoreError(f"calibration needs at least 1 sample, got {count}")
    if count > dataset_size(dataset):
        raise WfcoreError(f"calibration asks for {count} samples, but the training set holds "
                          f"{dataset_size(dataset)}")
    order = torch.randperm(dataset_size(dataset), generator=torch.Generator().manual_seed(seed))
    picked = Subset(dataset, order[:count].tolist())
    batches = [x for x, _ in DataLoader(picked, batch_size=64)]
    return torch.cat(batches).float().numpy()


def _reader(ortq: Any, inputs: np.ndarray, input_name: str, batch_size: int) -> Any:
    """A CalibrationDataReader over ``inputs`` in batches, with a progress bar."""

    class ArrayReader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                tqdm([inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)],
                     desc="calibration", unit="batch", leave=False))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    return ArrayReader()


def unshare_initializers(proto: Any) -> int:
    """Replace each Identity of an initializer by a copy of it, in place; returns how many.

    The TorchScript exporter shares identical initializers (e.g. the zero biases that
    BatchNorm folding leaves) through Identity nodes; the quantizer needs every weight and
    bias to be an initializer of its own, since each gets its own scale.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    copies = []
    for node in proto.graph.node:
        source = inits.get(node.input[0]) if node.op_type == "Identity" else None
        if source is not None:
            copy = type(source)()
            copy.CopyFrom(source)
            copy.name = node.output[0]
            inits[copy.name] = copy
            copies.append(node)
    for node in copies:
        proto.graph.node.remove(node)
        proto.graph.initializer.append(inits[node.output[0]])
    return len(copies)


def gemm_to_matmul(proto: Any) -> int:
    """Rewrite each plain Gemm (Y = A B^T + C, B an initializer) as MatMul then Add, in place,
    with B stored transposed; returns how many. DeepSparse compiles QLinearMatMul, not QGemm.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes = list(proto.graph.node)
    done = 0
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight.T.copy(),
                                                                  node.input[1]))
        scope = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        at = list(proto.graph.node).index(node)
        proto.graph.node.remove(node)
        if len(node.input) > 2 and node.input[2]:
            product = f"{node.output[0]}_matmul"
            replacement = [
                helper.make_node("MatMul", list(node.input[:2]), [product],
                                 name=f"{scope}/MatMul"),
                helper.make_node("Add", [product, node.input[2]], list(node.output),
                                 name=f"{scope}/Add")]
        else:
            replacement = [helper.make_node("MatMul", list(node.input[:2]), list(node.output),
                                            name=f"{scope}/MatMul")]
        for offset, new in enumerate(replacement):
            proto.graph.node.insert(at + offset, new)
        done += 1
    return done


def weight_zero_points(proto: Any, mapped: dict[str, checks.Mapped]) -> dict[str, int]:
    """{parameter: largest |zero point|} of each mapped weight's quantization (0 = symmetric)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    zero_point_of: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2:
            zero_point_of[node.input[0]] = node.input[2]
        elif node.op_type in checks.QUANTIZED_WEIGHT_OPS and len(node.input) > 5:
            zero_point_of[node.input[3]] = node.input[5]  # (x, x_s, x_zp, w, w_s, w_zp, ...)
    out = {}
    for name, m in mapped.items():
        zp = zero_point_of.get(m.initializer)
        if zp is None or zp not in inits:
            raise WfcoreError(f"INT8 check: no zero point found for weight '{name}' "
                              f"(initializer '{m.initializer}')")
        out[name] = int(np.abs(numpy_helper.to_array(inits[zp]).astype(np.int64)).max())
    return out


def check_quantized(proto: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The zero check on the quantized file; every int8 weight symmetric (zero point 0).

    Returns the zero check's table, each row with ``int8`` (the weight is stored as 8-bit
    integers, so its zeros are integer zeros) and ``int8_weights`` (how many are).
    """
    from onnx import TensorProto

    table = checks.check_zeros(proto, params)
    dtypes = {i.name: i.data_type for i in proto.graph.initializer}
    for r in table["rows"]:
        r["int8"] = dtypes[r["initializer"]] in (TensorProto.INT8, TensorProto.UINT8)
    mapped = checks.map_weights(proto, params)
    int8 = {n: m for n, m in mapped.items() if dtypes[m.initializer] in
            (TensorProto.INT8, TensorProto.UINT8)}
    if not int8:
        raise WfcoreError("INT8 check: no weight is stored as 8-bit integers")
    shifted = [n for n, zp in weight_zero_points(proto, int8).items() if zp != 0]
    if shifted:
        raise WfcoreError(f"INT8 check: weight '{shifted[0]}' is quantized with a non-zero "
                          f"zero point, so its pruned weights are not the integer 0")
    table["int8_weights"] = sum(r["numel"] for r in table["rows"] if r["int8"])
    return table


def quantize_int8(float_path: str | Path, path: str | Path, calibration: np.ndarray,
                  params: dict[str, torch.Tensor], layout: str = "onnxruntime",
                  batch_size: int = 16, metadata: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """Write the INT8 model of ``float_path`` to ``path`` and check it (see module doc).

    ``calibration``: (N, ...) float inputs, training samples; ``params``: the PyTorch
    weights whose zeros must stay zeros; ``layout``: a key of ``LAYOUTS``. Returns the
    checks for the report.
    """
    import onnx

    if layout not in LAYOUTS:
        raise WfcoreError(f"unknown INT8 layout '{layout}'; choose from {', '.join(LAYOUTS)}")
    how = LAYOUTS[layout]
    ortq = quantization_tools()
    float_path, path = Path(float_path), Path(path)
    source = onnx.load(str(float_path))
    unshare_initializers(source)
    if how.matmul:
        gemm_to_matmul(source)
    input_name = source.graph.input[0].name
    with files.temporary(path, ".unchecked.onnx") as tmp:
        advice = _NoPreprocessingAdvice()
        logging.getLogger().addFilter(advice)  # the quantizer logs on the root logger
        try:
            ortq.quantize_static(
                source, str(tmp), _reader(ortq, calibration, input_name, batch_size),
                quant_format=ortq.QuantFormat.QDQ if how.qdq else ortq.QuantFormat.QOperator,
                op_types_to_quantize=list(how.ops) if how.ops else None,
                per_channel=how.per_channel, reduce_range=False,
                activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                calibrate_method=ortq.CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        finally:
            logging.getLogger().removeFilter(advice)
        proto = onnx.load(str(tmp))
        for key, value in {**(metadata or {}), "quantize": f"int8-{layout}"}.items():
            proto.metadata_props.add(key=f"wfcore.{key}", value=str(value))
        onnx.save(proto, str(tmp))
        try:
            table = check_quantized(proto, params)
            _runs_on_onnxruntime(str(tmp), calibration[:1])
        except WfcoreError as exc:
            failed = tmp.replace(path.with_name(f"{path.stem}.failed.onnx"))
            raise WfcoreError(f"{path}: {exc} (the quantized model is kept as {failed})") from None
        tmp.replace(path)
    path.with_name(f"{path.stem}.failed.onnx").unlink(missing_ok=True)
    log.info("quantized %s: INT8 for %s, %d calibration samples, %d/%d weights int8, "
             "all %d PyTorch zeros kept", path, layout, len(calibration),
             table["int8_weights"], table["numel"], table["torch_zeros"])
    return {
        "path": str(path),
        "layout": layout,
        "weights": "int8, symmetric (zero point 0), per "
                   + ("channel" if how.per_channel else "tensor"),
        "activations": "uint8, per tensor, MinMax",
        "calibration_samples": int(len(calibration)),
        "int8_weights": table["int8_weights"],
        "zeros": {k: table[k] for k in ("numel", "torch_zeros", "onnx_zeros", "kept_zeros")},
        "initializers": table["rows"],
    }


def _runs_on_onnxruntime(path: str, x: np.ndarray) -> None:
    """ONNX Runtime loads the quantized file and gives finite outputs on ``x``."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    except Exception as exc:
        raise WfcoreError(f"ONNX Runtime cannot run the quantized model: "
                          f"{str(exc).splitlines()[0][:160]}") from None
    if not np.isfinite(out).all():
        raise WfcoreError("ONNX Runtime gives non-finite outputs for the quantized model")


def onnx_top1(path: str | Path, dataset: Dataset, batch_size: int = 64,
              threads: int | None = None) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on ``dataset``, run by ONNX Runtime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc=f"top-1 {Path(path).name}",
                     unit="batch", leave=False):
        logits = session.run(None, {name: x.float().numpy()})[0]
        correct += int((logits.argmax(1) == np.asarray(y)).sum())
        total += len(y)
    return correct / max(total, 1)
