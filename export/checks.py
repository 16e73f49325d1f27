"""Checks on an exported ONNX model: the zeros are kept, and ONNX Runtime agrees with PyTorch.

The TorchScript exporter renames, deduplicates and folds weights: in eval mode it fuses
BatchNorm into the preceding Conv (the weight is scaled per output channel, so values
change but zeros stay zero), a Linear on N-d inputs becomes a MatMul on the transposed
weight, and identical initializers are shared through Identity nodes. So the zero check
first maps each PyTorch weight to the initializer that carries it:

1. an initializer with the parameter's own name (``fc.weight``);
2. the weight input of the Conv / Gemm / MatMul node whose scope is the parameter's
   module (node ``/layer1/layer1.0/conv1/Conv`` is module ``layer1.0.conv1``), following
   Identity nodes (and, in an INT8 model, DequantizeLinear) back to their initializer;
   the QLinearConv / QGemm / QLinearMatMul of an INT8 model count as their float ops;
3. the one remaining initializer of the same shape, when exactly one is left.

A weight that maps to nothing, or to an initializer of another shape, is an error: a
check that cannot see a weight does not pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wfcore.errors import WfcoreError

log = logging.getLogger(__name__)

WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> weight input
# INT8 operators (QOperator format): (x, x_scale, x_zero_point, w, w_scale, w_zero_point, ...)
QUANTIZED_WEIGHT_OPS = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}
# Operators a weight passes through on its way from its initializer (QDQ format: the int8
# initializer, then DequantizeLinear).
PASS_THROUGH = ("Identity", "DequantizeLinear")


@dataclass
class Mapped:
    """Where one PyTorch weight lives in the ONNX graph."""

    param: str
    initializer: str
    transposed: bool  # the initializer holds the weight transposed (MatMul, Gemm transB=0)
    how: str  # name | scope | shape


def scope_to_module(node_name: str) -> str:
    """``/layer1/layer1.0/downsample/downsample.0/Conv`` -> ``layer1.0.downsample.0``.

    Each scope part is the child's name, and a Sequential child repeats its parent's
    name (``layer1`` then ``layer1.0``), so a part that extends the previous one replaces it.
    """
    parts = [p for p in node_name.split("/") if p][:-1]  # drop the op's own name
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def _resolve_identity(graph: Any, initializers: set[str]) -> dict[str, str]:
    """Value name -> initializer name, through chains of Identity (and DequantizeLinear)."""
    source = {name: name for name in initializers}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type in PASS_THROUGH and node.input[0] in source:
                if node.output[0] not in source:
                    source[node.output[0]] = source[node.input[0]]
                    changed = True
    return source


def map_weights(model_proto: Any, params: dict[str, torch.Tensor]) -> dict[str, Mapped]:
    """Map every parameter in ``params`` to the initializer that carries it (see module doc)."""
    graph = model_proto.graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    source = _resolve_identity(graph, set(shapes))
    by_module: dict[str, tuple[str, bool]] = {}
    for node in graph.node:
        slot = WEIGHT_OPS.get(node.op_type, QUANTIZED_WEIGHT_OPS.get(node.op_type))
        if slot is None or len(node.input) <= slot or node.input[slot] not in source:
            continue
        transposed = node.op_type in ("MatMul", "QLinearMatMul")
        if node.op_type in ("Gemm", "QGemm"):
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            transposed = trans_b == 0
        by_module.setdefault(scope_to_module(node.name), (source[node.input[slot]], transposed))
    mapped: dict[str, Mapped] = {}
    for name in params:
        if name in shapes:
            mapped[name] = Mapped(name, name, False, "name")
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if name.endswith(".weight") and module in by_module:
            init, transposed = by_module[module]
            mapped[name] = Mapped(name, init, transposed, "scope")
    used = {m.initializer for m in mapped.values()}
    for name, p in params.items():
        if name in mapped:
            continue
        shape = tuple(p.shape)
        flipped = tuple(reversed(shape)) if p.dim() == 2 else None
        same = [i for i, s in shapes.items() if i not in used and s == shape]
        flip = [i for i, s in shapes.items() if i not in used and flipped and s == flipped]
        if len(same) + len(flip) == 1:
            init = (same or flip)[0]
            mapped[name] = Mapped(name, init, bool(flip), "shape")
            used.add(init)
            log.warning("ONNX check: mapped %s to initializer %s by shape alone", name, init)
        else:
            raise WfcoreError(f"ONNX zero check: cannot find the initializer of weight '{name}' "
                              f"{list(shape)} in the exported graph")
    for m in mapped.values():
        want = tuple(params[m.param].shape)
        got = shapes[m.initializer]
        if (tuple(reversed(got)) if m.transposed else got) != want:
            raise WfcoreError(f"ONNX zero check: weight '{m.param}' {list(want)} maps to "
                              f"initializer '{m.initializer}' of shape {list(got)}")
    return mapped


def sparsity_table(model_proto: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-initializer zeros: PyTorch's, ONNX's, and PyTorch zeros that stayed zero.

    Returns ``{"rows": [...], "torch_zeros", "onnx_zeros", "kept_zeros", "numel"}``;
    the zeros are kept when ``kept_zeros == torch_zeros``.
    """
    from onnx import numpy_helper

    mapped = map_weights(model_proto, params)
    arrays = {i.name: i for i in model_proto.graph.initializer}
    rows, cache = [], {}
    for name, m in mapped.items():
        if m.initializer not in cache:
            cache[m.initializer] = numpy_helper.to_array(arrays[m.initializer])
        value = cache[m.initializer]
        value = value.T if m.transposed else value
        w = params[name].detach().cpu().numpy()
        torch_zero = w == 0
        onnx_zero = value == 0
        rows.append({
            "initializer": m.initializer,
            "param": name,
            "numel": int(w.size),
            "torch_zeros": int(torch_zero.sum()),
            "onnx_zeros": int(onnx_zero.sum()),
            "kept_zeros": int((torch_zero & onnx_zero).sum()),
            "mapped_by": m.how,
        })
    totals = {k: sum(r[k] for r in rows) for k in ("numel", "torch_zeros", "onnx_zeros",
                                                      "kept_zeros")}
    return {"rows": rows, **totals}


def format_sparsity(table: dict[str, Any]) -> str:
    """The sparsity table as fixed-width text."""
    head = f"{'parameter':<36} {'initializer':<22} {'numel':>9} {'torch 0':>9} {'onnx 0':>9}"
    lines = [head, "-" * len(head)]
    for r in table["rows"]:
        lines.append(f"{r['param'][:36]:<36} {r['initializer'][:22]:<22} {r['numel']:>9} "
                     f"{r['torch_zeros']:>9} {r['onnx_zeros']:>9}")
    sp = table["torch_zeros"] / max(table["numel"], 1)
    lines.append(f"{'total':<36} {'':<22} {table['numel']:>9} {table['torch_zeros']:>9} "
                 f"{table['onnx_zeros']:>9}   sparsity {sp:.4f}")
    return "\n".join(lines)


def check_zeros(model_proto: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The sparsity table; raises WfcoreError when a PyTorch zero is non-zero in ONNX."""
    table = sparsity_table(model_proto, params)
    lost = [r for r in table["rows"] if r["kept_zeros"] != r["torch_zeros"]]
    if lost:
        worst = ", ".join(f"{r['param']} ({r['torch_zeros'] - r['kept_zeros']} of "
                          f"{r['torch_zeros']})" for r in lost[:3])
        raise WfcoreError(f"ONNX zero check failed: {table['torch_zeros'] - table['kept_zeros']}"
                          f" weights that are zero in PyTorch are non-zero in the ONNX file: "
                          f"{worst}")
    return table


def check_parity(path: str, model: nn.Module, inputs: torch.Tensor,
                 atol: float = 1e-4) -> dict[str, float]:
    """Run ``inputs`` through ONNX Runtime and PyTorch; raise when max |diff| > ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    got = session.run(None, feed)[0]
    with torch.inference_mode():
        want = model(inputs).detach().cpu().numpy()
    if got.shape != want.shape:
        raise WfcoreError(f"ONNX parity check failed: ONNX Runtime gives shape {got.shape}, "
                          f"PyTorch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    scale = float(np.abs(want).max())
    if not diff <= atol:  # also catches NaN
        raise WfcoreError(f"ONNX parity check failed: max |ONNX Runtime - PyTorch| = {diff:.3g}"
                          f" > {atol:g} on a batch of {len(inputs)} (outputs up to {scale:.3g})")
    return {"max_abs_diff": diff, "max_abs_output": scale, "batch": int(len(inputs)),
            "atol": atol}
