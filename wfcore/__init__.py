"""wfcore: second-order pruning of PyTorch models (WoodFisher, OBS) with sparse ONNX export.

The public surface, for users and plugin authors alike, is what ``__all__`` names:

- the Python API: ``prune``, ``export``, ``bench``, the ``Result`` of a run and
  ``load_model``, the model of a run directory;
- the contracts a plugin implements (``HessianEstimator``, ``LayerwiseEstimator``,
  ``Curvature``, ``Scorer``, ``Allocator``, ``Scheduler``, ``Exporter``, ...) and what they
  are given (``PruningProblem``, ``GradientRows``, ``DataBundle``, ``ParamLayout``,
  ``PruneStep``, ...);
- ``hookimpl``, the marker of plugin hooks;
- the errors a user sees as one line (``WfcoreError``, ``ConfigError``, ``PluginError``)
  and ``first_line``, the one line of any other exception, to quote in one of them;
- ``available_memory``, the free bytes a component may plan its own memory by;
- the public submodules: ``testing`` (the contract checks),
  ``masks`` (``select_params``, ``to_groups``, ...), ``progress`` (the ``wfcore -q``
  switch of progress bars), ``distributed`` (the collectives a component shares its work
  across ranks with) and ``rounds`` (timing in interleaved rounds).

Plugins (plugins/), the exporters and ``wfcore bench`` (export/) and the docs import
only these (benchmarks/ too, but for the machinery some measure directly);
tests/test_architecture.py keeps it so. Everything else
(``wfcore.run.pipeline``, ``wfcore.manager``, ...) is machinery that may change. Names are
imported on first use, so ``import wfcore`` (and the ``wfcore`` command's start) does not
load torch.
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
    "Result": "wfcore.api", "load_model": "wfcore.run.saved",
    "DataBundle": "wfcore.interfaces", "Loss": "wfcore.interfaces",
    "Tensors": "wfcore.interfaces", "UPDATE_MODES": "wfcore.interfaces",
    "DAMP_MODES": "wfcore.interfaces", "GradientRows": "wfcore.interfaces",
    "GradientSource": "wfcore.interfaces", "EstimatorCost": "wfcore.interfaces",
    "PruningProblem": "wfcore.interfaces", "Curvature": "wfcore.interfaces",
    "Stateful": "wfcore.interfaces", "HessianEstimator": "wfcore.interfaces",
    "LayerwiseEstimator": "wfcore.interfaces",
    "Scorer": "wfcore.interfaces", "Allocator": "wfcore.interfaces",
    "PruneStep": "wfcore.interfaces", "Scheduler": "wfcore.interfaces",
    "Exporter": "wfcore.interfaces", "dataset_size": "wfcore.interfaces",
    "declare_options": "wfcore.interfaces",
    "ParamLayout": "wfcore.fisher.gradients", "Masks": "wfcore.masks",
    "WfcoreError": "wfcore.errors", "ConfigError": "wfcore.errors",
    "PluginError": "wfcore.errors", "first_line": "wfcore.errors",
    "available_memory": "wfcore.fisher.plan",
    "RunDirectory": "wfcore.run.directory",
}
# public submodules (their functions and classes): ``from wfcore.testing import check_curvature``;
# ``wfcore.choices``: the names each choice setting takes
_MODULES = ("testing", "masks", "progress", "distributed", "rounds", "choices", "files",
            "structured", "group_obs")

__all__ = [  # _LAZY and _MODULES, spelled out for linters and readers
    "__version__", "hookimpl", "testing", "masks", "progress", "distributed", "rounds",
    "choices", "files", "structured", "group_obs", "prune", "export", "bench", "Result",
    "load_model",
    "DataBundle", "Loss", "Tensors", "UPDATE_MODES", "DAMP_MODES", "GradientRows",
    "GradientSource", "EstimatorCost", "PruningProblem", "Curvature", "Stateful",
    "HessianEstimator", "LayerwiseEstimator", "Scorer", "Allocator", "PruneStep",
    "Scheduler", "Exporter", "ParamLayout", "Masks", "available_memory",
    "WfcoreError", "ConfigError", "PluginError", "first_line", "dataset_size", "RunDirectory",
    "declare_options",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from wfcore import (
        choices,
        distributed,
        files,
        group_obs,
        masks,
        progress,
        rounds,
        structured,
        testing,
    )
    from wfcore.api import Result, bench, export, prune
    from wfcore.errors import ConfigError, PluginError, WfcoreError, first_line
    from wfcore.fisher.gradients import ParamLayout
    from wfcore.fisher.plan import available_memory
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
        LayerwiseEstimator,
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
    from wfcore.run.directory import RunDirectory
    from wfcore.run.saved import load_model


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
