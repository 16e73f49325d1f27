"""Checks on an exported ONNX model: the zeros are kept, and ONNX Runtime agrees with PyTorch.

The TorchScript exporter renames, deduplicates, splits and folds weights: in eval mode it
fuses BatchNorm into the preceding Conv (the weight is scaled per output channel, so values
change but zeros stay zero), a Linear on N-d inputs becomes a MatMul on the transposed
weight, the packed Q/K/V in-projection of ``nn.MultiheadAttention`` becomes one transposed
MatMul weight (or three, one per slice, when queries, keys and values differ), and
identical initializers are shared through Identity nodes. So the zero check first traces
each prunable parameter to the initializer(s) that carry it, whatever op consumes them:

1. an initializer with the parameter's own name (``fc.weight``, an Embedding's table),
   or that name with ``_quantized`` (ONNX Runtime's int8 copy);
2. the weight input of the Conv / ConvTranspose / Gemm / MatMul / Gather node whose scope
   is the parameter's module (node ``/layer1/layer1.0/conv1/Conv`` is module
   ``layer1.0.conv1``), following Identity nodes (and, in an INT8 model, DequantizeLinear)
   back to their initializer; the QLinearConv / QGemm / QLinearMatMul of an INT8 model
   count as their float ops (a candidate of the wrong shape is not taken; a parameter
   other than ``weight``, e.g. ``in_proj_weight``, only when one candidate fits);
3. by value: float initializers that equal the parameter, or a block of its rows, as they
   are or transposed, compared on the parameter's non-zero weights only (so a pruned zero
   that turned non-zero in the file is still traced, and then fails the check); the blocks
   must cover every row (the attention's packed in-projection split in three);
4. the one remaining initializer of the same shape, when exactly one is left.

A parameter that cannot be traced is named in the check's ``untraced`` list and in a
warning: its zeros are not verified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from wfcore import WfcoreError

log = logging.getLogger(__name__)

# op -> the input that carries the weight
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
# INT8 operators (QOperator format): (x, x_scale, x_zero_point, w, w_scale, w_zero_point, ...)
QUANTIZED_WEIGHT_OPS = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}
# Operators a weight passes through on its way from its initializer (QDQ format: the int8
# initializer, then DequantizeLinear).
PASS_THROUGH = ("Identity", "DequantizeLinear")
VALUE_RTOL = 1e-6  # value tracing: |initializer - weight| <= this x max |weight| (non-zeros)


@dataclass
class Part:
    """Rows ``start:stop`` of a parameter, held by one initializer (transposed or not)."""

    initializer: str
    transposed: bool
    start: int
    stop: int


@dataclass
class Mapped:
    """Where one PyTorch weight lives in the ONNX graph."""

    param: str
    initializer: str  # the (first) initializer
    transposed: bool  # it holds the weight transposed (MatMul, Gemm transB=0)
    how: str  # name | scope | value | shape
    parts: list[Part] = field(default_factory=list)  # every initializer, by rows

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = [Part(self.initializer, self.transposed, 0, -1)]


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


def _scope_weights(graph: Any, source: dict[str, str],
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, bool]]]:
    """Module name -> [(initializer, transposed)] of the weight ops in its scope."""
    by_module: dict[str, list[tuple[str, bool]]] = {}
    for node in graph.node:
        slot = WEIGHT_OPS.get(node.op_type, QUANTIZED_WEIGHT_OPS.get(node.op_type))
        if slot is None or len(node.input) <= slot or node.input[slot] not in source:
            continue
        transposed = node.op_type in ("MatMul", "QLinearMatMul")
        if node.op_type in ("Gemm", "QGemm"):
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            transposed = trans_b == 0
        init = source[node.input[slot]]
        transposed = transposed and len(shapes[init]) == 2
        by_module.setdefault(scope_to_module(node.name), []).append((init, transposed))
    return by_module


def _fits(got: tuple[int, ...], transposed: bool, want: tuple[int, ...]) -> bool:
    return (tuple(reversed(got)) if transposed else got) == want


def _value_parts(name: str, w: np.ndarray, arrays: dict[str, np.ndarray]) -> list[Part] | None:
    """Initializers whose values are blocks of rows of ``w`` (as they are or transposed),
    compared on ``w``'s non-zero entries, covering every row; None when they do not."""
    if w.ndim == 0 or not np.any(w):
        return None
    live = w != 0
    tol = VALUE_RTOL * float(np.abs(w).max())
    rows = w.shape[0]
    found: dict[int, Part] = {}
    for init, a in arrays.items():
        views = [(a, False)] + ([(a.T, True)] if a.ndim == 2 and w.ndim == 2 else [])
        for view, transposed in views:
            if view.ndim != w.ndim or view.shape[1:] != w.shape[1:] or view.shape[0] > rows:
                continue
            n = view.shape[0]
            first = np.where(live, np.abs(w - view[:1]) <= tol, True)  # (rows, ...)
            for start in np.flatnonzero(first.reshape(rows, -1).all(1)):
                if start + n > rows or start in found:
                    continue
                block = slice(start, start + n)
                if np.all(np.where(live[block], np.abs(w[block] - view) <= tol, True)):
                    found[int(start)] = Part(init, transposed, int(start), int(start + n))
                    break
    covered, parts = 0, []
    while covered < rows and covered in found:
        parts.append(found[covered])
        covered = found[covered].stop
    return parts if covered == rows else None


def map_weights(model_proto: Any, params: dict[str, torch.Tensor],
                untraced: list[str] | None = None) -> dict[str, Mapped]:
    """Trace every parameter in ``params`` to the initializer(s) that carry it (see module
    doc). A parameter that cannot be traced is appended to ``untraced`` and warned about;
    without that list it is an error."""
    from onnx import numpy_helper

    graph = model_proto.graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    source = _resolve_identity(graph, set(shapes))
    by_module = _scope_weights(graph, source, shapes)
    mapped: dict[str, Mapped] = {}
    for name, p in params.items():
        want = tuple(p.shape)
        named = [i for i in (name, f"{name}_quantized") if shapes.get(i) == want]
        if named:  # its own name, or the name ONNX Runtime's quantizer gives its int8 copy
            mapped[name] = Mapped(name, named[0], False, "name")
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        fit = [(i, t) for i, t in by_module.get(module, []) if _fits(shapes[i], t, want)]
        # a module's ``weight`` is its first weight op's; another parameter of the module
        # (an attention's in_proj_weight) only when no other weight there has its shape
        if fit and (name.endswith(".weight") or len(fit) == 1):
            mapped[name] = Mapped(name, *fit[0], "scope")
    left = [n for n in params if n not in mapped]
    if left:
        floats = {i.name: numpy_helper.to_array(i) for i in graph.initializer
                  if i.data_type in (1, 10, 11, 16)}  # float, float16, double, bfloat16
        for name in left:
            parts = _value_parts(name, params[name].detach().cpu().numpy(), floats)
            if parts:
                mapped[name] = Mapped(name, parts[0].initializer, parts[0].transposed, "value",
                                      parts)
    used = {part.initializer for m in mapped.values() for part in m.parts}
    missing = []
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
            missing.append(name)
    if missing and untraced is None:
        raise WfcoreError(f"ONNX zero check: cannot find the initializer of weight "
                          f"'{missing[0]}' {list(params[missing[0]].shape)} in the exported graph")
    if missing and untraced is not None:
        untraced.extend(missing)
        log.warning("ONNX zero check: %d prunable parameter(s) cannot be traced to an "
                    "initializer, their zeros are not verified: %s", len(missing),
                    ", ".join(missing))
    return mapped


def onnx_value(m: Mapped, arrays: dict[str, Any], shape: tuple[int, ...],
               cache: dict[str, np.ndarray]) -> np.ndarray:
    """The parameter as the ONNX file holds it: its parts put back in row order."""
    from onnx import numpy_helper

    out = np.zeros(shape, dtype=np.float64)
    for part in m.parts:
        if part.initializer not in cache:
            cache[part.initializer] = numpy_helper.to_array(arrays[part.initializer])
        value = cache[part.initializer]
        value = value.T if part.transposed else value
        if part.stop < 0:
            out = value.reshape(shape) if value.shape != shape else value
        else:
            out[part.start:part.stop] = value
    return out


def sparsity_table(model_proto: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-parameter zeros: PyTorch's, ONNX's, and PyTorch zeros that stayed zero.

    Returns ``{"rows": [...], "torch_zeros", "onnx_zeros", "kept_zeros", "numel",
    "untraced"}``; the zeros are kept when ``kept_zeros == torch_zeros``; ``untraced``
    names the parameters no initializer was found for (not counted).
    """
    untraced: list[str] = []
    mapped = map_weights(model_proto, params, untraced)
    arrays = {i.name: i for i in model_proto.graph.initializer}
    rows: list[dict[str, Any]] = []
    cache: dict[str, np.ndarray] = {}
    for name in (n for n in params if n in mapped):
        m = mapped[name]
        w = params[name].detach().cpu().numpy()
        value = onnx_value(m, arrays, w.shape, cache)
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
            **({"initializers": [p.initializer for p in m.parts]} if len(m.parts) > 1 else {}),
        })
    totals = {k: sum(r[k] for r in rows) for k in ("numel", "torch_zeros", "onnx_zeros",
                                                      "kept_zeros")}
    return {"rows": rows, **totals, "untraced": untraced}


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
    spread = float(np.abs(want.astype(np.float64) - want[:1].astype(np.float64)).max())
    distinct = len(inputs) > 1 and spread > 1e-6 * max(scale, 1e-30)
    if not distinct:
        log.warning("ONNX parity check: the model gives the same output for all %d inputs "
                    "(spread %.3g): it does not depend on its input, and parity only shows "
                    "that the constant agrees", len(inputs), spread)
    if not diff <= atol:  # also catches NaN
        raise WfcoreError(f"ONNX parity check failed: max |ONNX Runtime - PyTorch| = {diff:.3g}"
                          f" > {atol:g} on a batch of {len(inputs)} (outputs up to {scale:.3g})")
    return {"max_abs_diff": diff, "max_abs_output": scale, "batch": int(len(inputs)),
            "atol": atol, "output_spread": spread, "distinct_outputs": distinct}
