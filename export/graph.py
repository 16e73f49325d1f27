"""An ONNX file read for timing: its graph, its one input and its shape, and the signature
that says whether two files take and give the same tensors (``wfcore bench`` and the
provenance of a file, export/provenance.py, read files through it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wfcore import WfcoreError, first_line


def read_onnx(path: str | Path) -> Any:
    """The ONNX model at ``path``; a missing or non-ONNX file is a one-line error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise WfcoreError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise WfcoreError(f"{path} is not an ONNX model: {first_line(exc)[:120]}") \
            from None
    if not proto.graph.node or not proto.graph.input:
        raise WfcoreError(f"{path} is not an ONNX model: no graph")
    return proto


def graph_inputs(proto: Any) -> list[Any]:
    """The graph's inputs that are fed at run time (not initializers)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]


def check_benchable(proto: Any, path: str | Path) -> None:
    """One float32 input: what every engine here is fed (random normal data)."""
    import onnx

    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise WfcoreError(f"{path}: the model has {len(inputs)} inputs ({names}); bench times "
                          "models with one float32 input")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(elem).lower() if elem else "not a tensor"
        raise WfcoreError(f"{path}: input '{inputs[0].name}' is {kind}; bench times models "
                          "with one float32 input")


def signature(proto: Any) -> tuple[Any, ...]:
    """Input and output shapes (less the batch dimension) and element types."""
    def shape(value: Any) -> tuple[Any, ...]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value or d.dim_param for d in tensor.shape.dim[1:])
        return (tensor.elem_type, dims)

    return (tuple(shape(i) for i in graph_inputs(proto)),
            tuple(shape(o) for o in proto.graph.output))


def input_shape(proto: Any, batch_size: int) -> tuple[int, ...]:
    """The input's shape with the batch dimension set (dynamic dims -> error)."""
    dims = graph_inputs(proto)[0].type.tensor_type.shape.dim
    shape = [batch_size] + [d.dim_value for d in dims[1:]]
    if dims and dims[0].dim_value and dims[0].dim_value != batch_size:
        raise WfcoreError(f"the model's batch dimension is fixed at {dims[0].dim_value}; "
                          f"export it with a dynamic batch to bench batch {batch_size}")
    if any(s <= 0 for s in shape[1:]):
        raise WfcoreError(f"the model's input has dynamic dimensions besides the batch: {shape}")
    return tuple(shape)
