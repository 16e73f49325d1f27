"""Which ONNX opset a model exports at, found before anything heavy runs.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) refuses an operator the
opset lacks (``aten::scaled_dot_product_attention``, which ``nn.MultiheadAttention`` calls,
needs opset 14) with ``UnsupportedOperatorError``, whose message names the opset that added
it. ``export.opset: null`` picks the lowest opset from ``MIN_OPSET`` up that exports the
model (13 is the widest supported by DeepSparse 1.8, so a model that exports at 13 keeps
it); a configured opset is tried as it is. Either way a failure is one line that names the
operator and the opset that would work, and the exporter's own dump (pages of TorchScript
IR written straight to the process's stderr) is kept out of the terminal.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import nn

from wfcore import WfcoreError, first_line

log = logging.getLogger(__name__)

MIN_OPSET = 13
UNSUPPORTED = re.compile(r"operator '([^']+)' to ONNX opset version (\d+) is not supported"
                         r"(?:\. Support for this operator was added in version (\d+))?")


def max_opset() -> int:
    """The newest opset both the TorchScript exporter and the installed onnx support."""
    import onnx

    from_torch = getattr(getattr(torch.onnx, "_constants", None),
                         "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)
    return min(int(from_torch), int(onnx.defs.onnx_opset_version()))


@contextmanager
def captured_stderr() -> Iterator[IO[str]]:
    """File descriptors 1 and 2 into a temporary file for the block (the exporter's C++
    side writes there directly); yields the file to read back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield sink
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class ExportFailed(WfcoreError):
    """One failed export: the operator the opset lacks and the opset that added it, when
    the exporter says so."""

    def __init__(self, message: str, operator: str | None = None, needs: int | None = None):
        super().__init__(message)
        self.operator, self.needs = operator, needs


def to_onnx(model: nn.Module, example: torch.Tensor, target: str | Path | io.BytesIO,
            opset: int) -> None:
    """``torch.onnx.export`` of ``model`` (eval mode, CPU) with a dynamic batch dimension;
    any failure is an ``ExportFailed`` of one line."""
    with warnings.catch_warnings(), captured_stderr() as dump:
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(
                # a file object works too; the annotation names paths only
                model, (example,),
                target if isinstance(target, io.BytesIO) else str(target),  # type: ignore[arg-type]
                dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["output"], do_constant_folding=True,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            error = None
        except Exception as exc:
            error = exc
            dump.seek(0)
            output = dump.read()[-20000:]
    if error is not None:
        log.debug("the exporter's output at opset %d:\n%s", opset, output)
        match = UNSUPPORTED.search(str(error))
        if match:
            operator, needs = match.group(1), match.group(3)
            raise ExportFailed(f"operator {operator} does not export at opset {opset}",
                               operator, int(needs) if needs else None) from None
        raise ExportFailed(f"the model does not export at opset {opset}: "
                           f"{first_line(error)}") from None


def export_lowest(model: nn.Module, example: torch.Tensor, target: str | Path | io.BytesIO,
                  opset: int | None = None, key: str = "export.opset") -> tuple[int, str]:
    """Export at ``opset``, or (None) at the lowest opset from ``MIN_OPSET`` up that works.

    Returns (the opset used, a line saying why). A configured opset that fails is an error
    that names the operator and the lowest opset that exports the model (``key`` names the
    setting to change); so is a model no opset exports.
    """
    if opset is not None:
        try:
            to_onnx(model, example, target, opset)
            return opset, f"opset {opset} ({key})"
        except ExportFailed as exc:
            try:
                works, _ = export_lowest(model, example, io.BytesIO(), None, key)
            except WfcoreError:
                raise WfcoreError(f"{key}={opset}: {exc}") from None
            raise WfcoreError(f"{key}={opset}: {exc}; opset {works} exports this model "
                              f"(set {key}={works}, or null for the lowest that works)") \
                from None
    newest, tried, current = max_opset(), [], MIN_OPSET
    while current <= newest:
        try:
            to_onnx(model, example, target, current)
        except ExportFailed as exc:
            tried.append(f"{current}: {exc}")
            if exc.operator is None:
                raise WfcoreError(f"ONNX export: {exc}") from None
            current = max(current + 1, exc.needs or 0)
            continue
        why = "the lowest that exports this model" + \
            (f"; {tried[-1].split(': ', 1)[1]}" if tried else "")
        return current, f"opset {current} ({why})"
    raise WfcoreError(f"ONNX export: no opset from {MIN_OPSET} to {newest} exports the model; "
                      f"{tried[-1] if tried else ''}")


def check_exportable(model: nn.Module, example: torch.Tensor, opset: int | None,
                     key: str = "export.opset") -> tuple[int, str]:
    """Export a copy of ``model`` (CPU, eval) in memory: (the opset it exports at, why),
    or a one-line WfcoreError. For the plan, before any gradient is sampled."""
    import copy

    probe = copy.deepcopy(model).cpu().eval()
    x = example.detach().float().cpu()[:1]
    return export_lowest(probe, x, io.BytesIO(), opset, key)
