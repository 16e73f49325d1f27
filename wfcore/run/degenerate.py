"""No silent degeneration: a pruning step that empties a layer, or leaves a model whose
output no longer depends on its input, is a warning in the log and in the step's record,
and stops the run unless the config allows it (``degenerate.allow_empty_layers``,
``degenerate.allow_constant_output``).

An empty layer is one whose prunable weights are all zero (100% sparsity): whatever
follows it sees only biases. A constant output is measured on a fixed probe batch of
training samples: the model's outputs on distinct inputs agree to within ``CONSTANT_RTOL``
of their scale, where the dense model's differed. Global thresholds produce both on
models whose layers' scores live on different scales (the global allocator keeps a floor
per layer by default for this reason: plugins/allocators.py).

``collect_warnings`` gathers the warnings logged during a step (the allocator's, an
estimator's, these checks') so that the report shows them beside the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from wfcore.errors import WfcoreError
from wfcore.masks import Masks

log = logging.getLogger(__name__)

CONSTANT_RTOL = 1e-6  # outputs within this x their largest magnitude count as equal


class _Collector(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def collect_warnings(logger: str = "wfcore") -> Iterator[list[str]]:
    """The messages of the warnings logged under ``logger`` inside the block, in order."""
    found: list[str] = []
    handler = _Collector(found)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield found
    finally:
        target.removeHandler(handler)


def empty_layers(masks: Masks) -> list[str]:
    """The prunable parameters whose every weight is pruned."""
    return [n for n, k in masks.keep.items() if k.numel() and not bool(k.any())]


@torch.no_grad()
def output_spread(model: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """(max |output_i - output_0| over the batch, max |output|), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = model(inputs)
    finally:
        model.train(was_training)
    if isinstance(out, dict):
        out = next(iter(out.values()), None)
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not torch.is_tensor(out) or out.dim() == 0 or out.shape[0] != len(inputs):
        return float("inf"), float("inf")  # not one output per input: nothing to judge
    out = out.detach().double()
    return float((out - out[:1]).abs().max()), float(out.abs().max())


def is_constant(spread: float, scale: float) -> bool:
    """Whether outputs with this spread and scale are all equal (to ``CONSTANT_RTOL``); NaN
    outputs count as constant (nothing of the input is left in them)."""
    if spread == float("inf"):
        return False
    return not spread > CONSTANT_RTOL * max(scale, 1e-30)


class DegeneracyCheck:
    """The checks of every pruning step against the dense model's behaviour on ``inputs``
    (a probe batch of at least two distinct training samples)."""

    def __init__(self, inputs: torch.Tensor, allow_empty_layers: bool = False,
                 allow_constant_output: bool = False):
        self.inputs = inputs
        self.allow_empty = allow_empty_layers
        self.allow_constant = allow_constant_output
        self.dense_varies: bool | None = None  # set by ``dense``

    def dense(self, model: nn.Module) -> None:
        """Record whether the dense model's outputs differ on the probe batch (if they do
        not, a constant output after pruning is not pruning's doing)."""
        if len(self.inputs) < 2:
            self.dense_varies = False
            return
        self.dense_varies = not is_constant(*output_spread(model, self.inputs))

    def check(self, model: nn.Module, masks: Masks, target: float) -> None:
        """Warn about (and, unless allowed, refuse) the degenerate results of a step to
        ``target``: raises a one-line WfcoreError naming the key that allows it."""
        empty = empty_layers(masks)
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            log.warning("pruning to %.4g emptied %d layer(s) (100%% of their weights): %s",
                        target, len(empty), shown)
            if not self.allow_empty:
                raise WfcoreError(
                    f"pruning to {target:.4g} emptied {len(empty)} layer(s): {shown}; keep a "
                    "per-layer floor (allocator.floor) or allow it with "
                    "degenerate.allow_empty_layers=true")
        if self.dense_varies is False:  # constant already: not pruning's doing
            return
        spread, scale = output_spread(model, self.inputs)
        if is_constant(spread, scale):
            log.warning("pruning to %.4g left a model whose output does not depend on its "
                        "input (max spread %.3g over %d probe samples, outputs up to %.3g)",
                        target, spread, len(self.inputs), scale)
            if not self.allow_constant:
                raise WfcoreError(
                    f"pruning to {target:.4g} left a model whose output does not depend on "
                    "its input; lower the sparsity, keep a per-layer floor (allocator.floor) "
                    "or allow it with degenerate.allow_constant_output=true")
