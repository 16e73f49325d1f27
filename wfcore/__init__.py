"""wfcore: second-order pruning of PyTorch models (WoodFisher, OBS) with sparse ONNX export.

The public surface, for users and plugin authors alike, is what ``__all__`` names:

- the Python API: ``prune``, ``export``, ``bench`` and the ``Result`` of a run;
- the contracts a plugin implements (``HessianEstimator``, ``Curvature``, ``Scorer``,
  ``Allocator``, ``Scheduler``, ``Exporter``, ...) and what they are given
  (``PruningProblem``, ``DataBundle``, ``ParamLayout``, ``PruneStep``, ...);
- ``hookimpl``, the marker of plugin hooks; ``testing``, the contract checks;
- the errors a user sees as one line (``WfcoreError``, ``ConfigError``, ``PluginError``).

Everything else (``wfcore.pipeline``, ``wfcore.manager``, ...) is machinery that may
change. Names are imported on first use, so ``import wfcore`` (and the ``wfcore``
command's start) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("wfcore")
"""Marker for plugin hook implementations: ``@wfcore.hookimpl``."""

# public name -> the module that defines it
_LAZY = {
    "prune": "wfcore.api", "export": "wfcore.api", "bench": "wfcore.api",
    "Result": "wfcore.api",
    "DataBundle": "wfcore.interfaces", "Loss": "wfcore.interfaces",
    "Tensors": "wfcore.interfaces", "UPDATE_MODES": "wfcore.interfaces",
    "DAMP_MODES": "wfcore.interfaces", "GradientRows": "wfcore.interfaces",
    "GradientSource": "wfcore.interfaces", "EstimatorCost": "wfcore.interfaces",
    "PruningProblem": "wfcore.interfaces", "Curvature": "wfcore.interfaces",
    "Stateful": "wfcore.interfaces", "HessianEstimator": "wfcore.interfaces",
    "Scorer": "wfcore.interfaces", "Allocator": "wfcore.interfaces",
    "PruneStep": "wfcore.interfaces", "Scheduler": "wfcore.interfaces",
    "Exporter": "wfcore.interfaces", "dataset_size": "wfcore.interfaces",
    "declare_options": "wfcore.interfaces",
    "ParamLayout": "wfcore.gradients", "Masks": "wfcore.masks",
    "WfcoreError": "wfcore.errors", "ConfigError": "wfcore.errors",
    "PluginError": "wfcore.errors",
}
# public submodules: ``from wfcore.testing import check_curvature``; ``wfcore.choices``:
# the names each choice setting takes
_MODULES = ("testing", "choices")

__all__ = [  # _LAZY and _MODULES, spelled out for linters and readers
    "__version__", "hookimpl", "testing", "choices",
    "prune", "export", "bench", "Result",
    "DataBundle", "Loss", "Tensors", "UPDATE_MODES", "DAMP_MODES", "GradientRows",
    "GradientSource", "EstimatorCost", "PruningProblem", "Curvature", "Stateful",
    "HessianEstimator", "Scorer", "Allocator", "PruneStep", "Scheduler", "Exporter",
    "ParamLayout", "Masks", "WfcoreError", "ConfigError", "PluginError", "dataset_size",
    "declare_options",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from wfcore import choices, testing
    from wfcore.api import Result, bench, export, prune
    from wfcore.errors import ConfigError, PluginError, WfcoreError
    from wfcore.gradients import ParamLayout
    from wfcore.interfaces import (
        DAMP_MODES,
        UPDATE_MODES,
        Allocator,
        Curvature,
        DataBundle,
        EstimatorCost,
        Exporter,
        GradientRows,
        GradientSource,
        HessianEstimator,
        Loss,
        PruneStep,
        PruningProblem,
        Scheduler,
        Scorer,
        Stateful,
        Tensors,
        dataset_size,
        declare_options,
    )
    from wfcore.masks import Masks


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"wfcore.{name}")
    else:
        raise AttributeError(f"module 'wfcore' has no attribute '{name}'")
    globals()[name] = value  # once: later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
