"""Every wfcore hook. Plugins implement them with ``@wfcore.hookimpl``.

Registration hooks return ``{name: factory}``. How a factory is called is declared once,
in ``wfcore.factories``: with the component's validated options (its ``Options``
dataclass attribute, with an optional ``validate()``), its kind's arguments, and
``seed=`` the run's seed (config key ``seed``) when its signature takes ``seed`` (or
``**kwargs``); ``wfcore.manager.Plugins.create`` is the one place that does it. Call
hooks with keyword arguments only.

Under torchrun the step hooks are called on every rank, ``wfcore_run_end`` on rank 0
alone (the rank that wrote the report); a hook that writes files checks
``wfcore.distributed.is_main()``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("wfcore")


@hookspec
def wfcore_estimators() -> dict[str, Any]:
    """Register Hessian estimators: ``{name: factory(options[, seed]) -> HessianEstimator}``.

    All results are collected; one name registered by two plugins is an error.
    """


@hookspec
def wfcore_scorers() -> dict[str, Any]:
    """Register saliency scorers: ``{name: factory(options[, seed]) -> Scorer}``.

    All results are collected; one name registered by two plugins is an error.
    """


@hookspec
def wfcore_allocators() -> dict[str, Any]:
    """Register sparsity allocators: ``{name: factory(options[, seed]) -> Allocator}``.

    All results are collected; one name registered by two plugins is an error.
    """


@hookspec
def wfcore_schedulers() -> dict[str, Any]:
    """Register pruning schedules: ``{name: factory(options[, seed]) -> Scheduler}``.

    All results are collected; one name registered by two plugins is an error.
    """


@hookspec
def wfcore_exporters() -> dict[str, Any]:
    """Register exporters: ``{name: factory(options[, seed]) -> Exporter}``.

    All results are collected; one name registered by two plugins is an error.
    """


@hookspec
def wfcore_models() -> dict[str, Any]:
    """Register models: ``{name: factory(options, num_classes, input_shape[, seed])
    -> nn.Module}``.

    A name ending in ``:`` is a prefix: ``torchvision:`` serves ``torchvision:resnet50`` and
    its factory receives ``target="resnet50"`` as well. All results are collected; one name
    registered by two plugins is an error.
    """


@hookspec
def wfcore_datasets() -> dict[str, Any]:
    """Register data sets: ``{name: factory(options, data[, seed]) -> DataBundle}``.

    ``data`` is the resolved ``data`` config section (root, batch_size, ...); ``seed``, when
    the factory takes it, the run's seed (for a random split or synthetic data). The
    bundle's ``loss`` (None = cross-entropy) is the loss of every stage. Prefix names
    work as for models. All results are collected; one name registered by two plugins is
    an error.
    """


@hookspec
def wfcore_hooks() -> dict[str, Any]:
    """Declare the options of event-hook plugins: ``{name: Options dataclass}``.

    The run's config section ``hooks.<name>`` is validated against the dataclass (an
    unknown key or name is a one-line error) and every event hook receives the instances,
    defaults filled in, as ``options[<name>]``. All results are collected; one name
    registered by two plugins is an error.
    """


@hookspec
def wfcore_step_start(step: Any, run_dir: str, options: dict) -> None:
    """Called before a pruning step runs.

    ``step`` is the scheduler's ``PruneStep``; ``run_dir`` the run directory; ``options``
    ``{name: options}`` of every name registered by ``wfcore_hooks`` (see there).
    All implementations are called; results are ignored. An implementation may take
    fewer of these arguments.
    """


@hookspec
def wfcore_step_end(step: Any, record: dict, run_dir: str, options: dict) -> None:
    """Called after a pruning step was evaluated.

    ``step`` is the ``PruneStep``; ``record`` the step's entry of report.json ``steps``;
    ``options`` as for ``wfcore_step_start``. All implementations are called; results are
    ignored.
    """


@hookspec
def wfcore_run_end(report: dict, run_dir: str, options: dict) -> None:
    """Called once the run's report is written.

    ``report`` is the content of report.json; ``options`` as for ``wfcore_step_start``.
    All implementations are called; results are ignored.
    """
