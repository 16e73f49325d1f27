"""The Python API: ``wfcore.prune``, ``wfcore.export`` and ``wfcore.bench``.

``prune`` is the pipeline of ``wfcore prune``, not a second one: the settings become a
config (the same schema, validation and one-line errors), the model object and the data
are registered as ``model.name: in_memory`` and ``data.name: in_memory`` by an in-process
plugin (``wfcore.inmemory``), and ``pipeline.run`` runs it. The ``wfcore prune`` command
is a client of ``run_config`` below.

    import wfcore
    pruned, result = wfcore.prune(model, (inputs, targets), estimator="woodfisher",
                                  scheduler={"sparsities": [0.9]}, fisher={"num_grads": 64})
    wfcore.export(pruned, "model.onnx", inputs[:1])
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from wfcore import config as config_mod
from wfcore import inmemory, manager
from wfcore.choices import ENGINES
from wfcore.errors import ConfigError, WfcoreError, first_line
from wfcore.interfaces import Loss
from wfcore.run import directory as rundir
from wfcore.run import pipeline
from wfcore.run.report import table

log = logging.getLogger(__name__)

# A config: a YAML file, a mapping of keys, or a dot-list (whose first item may be a file).
ConfigLike = str | os.PathLike | Mapping[str, Any] | Sequence[str] | DictConfig | None


@dataclass
class Result:
    """What a run of ``wfcore.prune`` gives besides the model: its report, as report.json.

    ``report`` keys: config (resolved), dense {accuracy, loss, params, prunable, source},
    plan, steps [{index, target_sparsity, sparsity, accuracy, loss, safeguard, timings,
    layers}], ... ``accuracy`` and ``loss`` are None without a test set.
    """

    report: dict[str, Any]
    run_dir: Path | None  # None when no output= was given (nothing was kept)

    @property
    def steps(self) -> list[dict[str, Any]]:
        """One record per pruning step: sparsity, accuracy, loss, safeguard, timings,
        layers {name: {numel, sparsity}}."""
        return self.report["steps"]

    @property
    def dense(self) -> dict[str, Any]:
        return self.report["dense"]

    @property
    def plan(self) -> dict[str, Any]:
        """The memory/disk/time plan the run was checked against before it started."""
        return self.report.get("plan", {})

    @property
    def config(self) -> dict[str, Any]:
        return self.report["config"]

    @property
    def sparsity(self) -> float:
        """The last step's sparsity (zeros among the prunable weights)."""
        return self.steps[-1]["sparsity"]

    @property
    def accuracy(self) -> float | None:
        """The last step's top-1 on the test set (None without one)."""
        return self.steps[-1]["accuracy"]

    def table(self) -> str:
        """The steps as a Markdown table, as ``wfcore prune`` prints them."""
        return table(self.report)


# -- settings -> config ---------------------------------------------------------------
def settings_layer(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword settings as a config mapping: the names are config keys (``seed=1``,
    ``fisher={"num_grads": 64}``, ``fisher__num_grads=64`` for a nested key); a string
    given to a section that is named (``estimator="woodfisher"``) is its name."""
    named = (*config_mod.COMPONENT_KINDS, "model", "data")
    out: dict[str, Any] = {}
    for key, value in settings.items():
        path = key.split("__")
        if len(path) == 1 and key in named and isinstance(value, str):
            value = {"name": value}
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def config_layers(config: ConfigLike) -> tuple[Path | None, list[str], list[Any]]:
    """(file, dot-list, mappings) of a ``config=`` argument."""
    if config is None:
        return None, [], []
    if isinstance(config, (str, os.PathLike)):
        return Path(config), [], []
    if isinstance(config, (Mapping, DictConfig)):
        return None, [], [OmegaConf.create(dict(config) if isinstance(config, Mapping)
                                           else config)]
    items = [str(i) for i in config]
    if items and "=" not in items[0]:
        return Path(items[0]), items[1:], []
    return None, items, []


def make_config(config: ConfigLike = None, settings: Mapping[str, Any] | None = None,
                given: Mapping[str, Any] | None = None) -> DictConfig:
    """The config of a call: schema <- ``config`` <- ``given`` (what the objects passed
    in imply) <- keyword ``settings``; validated as ``wfcore prune`` validates it."""
    path, overrides, layers = config_layers(config)
    layers = [*layers, *([OmegaConf.create(dict(given))] if given else []),
              *([OmegaConf.create(settings_layer(settings))] if settings else [])]
    return config_mod.load(path, overrides, layers=layers)


# -- output: logging, progress bars, quiet --------------------------------------------
@contextlib.contextmanager
def console(quiet: bool) -> Iterator[None]:
    """As the command prints: the plan and the steps (INFO log lines, unless the program
    configured logging itself) and progress bars. ``quiet``: nothing at all."""
    wf = logging.getLogger("wfcore")
    saved = wf.level, os.environ.get("TQDM_DISABLE")
    handler = None
    with warnings.catch_warnings():
        if quiet:
            os.environ["TQDM_DISABLE"] = "1"
            wf.setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
        elif not wf.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            wf.addHandler(handler)
            wf.setLevel(logging.INFO)
        try:
            if quiet:
                yield
            else:
                from tqdm.contrib.logging import logging_redirect_tqdm

                with logging_redirect_tqdm(loggers=[wf]):
                    yield
        finally:
            wf.setLevel(saved[0])
            if handler is not None:
                wf.removeHandler(handler)
            if quiet:
                if saved[1] is None:
                    os.environ.pop("TQDM_DISABLE", None)
                else:
                    os.environ["TQDM_DISABLE"] = saved[1]


# -- prune ----------------------------------------------------------------------------
def run_config(cfg: DictConfig, *, force: bool = False, resume: bool = False,
               plugins: manager.Plugins | None = None) -> Result:
    """Run a loaded config (``wfcore prune``): the pipeline, then its Result."""
    report = pipeline.run(cfg, force=force, resume=resume, plugins=plugins)
    return Result(report, pipeline.run_dir_of(cfg))


def prune(model: nn.Module | None = None, data: Any = None, *, test: Any = None,
          loss: Loss | None = None, config: ConfigLike = None,
          output: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
          inplace: bool = False, quiet: bool = False, **settings: Any) -> tuple[nn.Module, Result]:
    """Prune a trained model as ``wfcore prune`` does, and return it with the run's Result.

    ``model``: an ``nn.Module`` with its trained weights (it is not trained again unless
    the config says ``model.trained: false``); None = ``model.name`` of the config.
    ``data``: the training data the gradients and the safeguard's calibration batch come
    from: a Dataset, a DataLoader (its batch size becomes ``data.batch_size``) or
    ``(inputs, targets)`` tensors; None = ``data.name`` of the config. ``test``: the same
    kinds, for the accuracy and loss of each step (None: nothing is evaluated). ``loss``:
    ``(outputs, targets) -> scalar``; default cross-entropy.

    Settings: ``config`` (a YAML file, a dict or a dot-list) and keyword arguments with
    the config's names (``estimator="woodfisher"``, ``scheduler={"sparsities": [0.9]}``,
    ``fisher__num_grads=64``), keywords last. ``output``: a run directory to keep (the
    report, each step's weights, a checkpoint, ``wfcore export RUN`` and ``--resume``
    work on it); None = a temporary one. ``resume``/``force`` as on the command line.
    ``inplace``: prune ``model`` itself instead of a copy. ``quiet``: print nothing.
    """
    with console(quiet):
        if resume and output is None:
            raise ConfigError("resume=True needs the run's output= directory")
        if model is not None and not isinstance(model, nn.Module):
            raise WfcoreError(f"model: expected an nn.Module, got {type(model).__name__}")
        if data is None and (test is not None or loss is not None):
            raise WfcoreError("test= and loss= go with data=; a config's data set gives its "
                              "own test split and loss")
        given: dict[str, Any] = {}
        if model is not None:
            model = model if inplace else copied(model)
            given["model"] = {"name": inmemory.NAME}  # model.trained: null = as given
        bundle = None
        if data is not None:
            given["data"] = {"name": inmemory.NAME, "root": None}
            if isinstance(data, DataLoader) and "data" not in settings \
                    and "data__batch_size" not in settings:
                given["data"]["batch_size"] = data.batch_size or 1
        cfg = make_config(config, settings, given)
        for section, obj in (("model", model), ("data", data)):
            if obj is not None and cfg[section].name != inmemory.NAME:
                raise ConfigError(f"{section}.name: '{cfg[section].name}' is set, but a "
                                  f"{section} object is given to wfcore.prune; leave it out")
        if data is not None:
            train = inmemory.to_dataset(inmemory.split(data, test)[0], "data")
            example = inmemory.first_item(train, "data")[0]
            classes = inmemory.output_classes(model, example) if model is not None else None
            bundle = inmemory.as_bundle(data, test, loss, classes)
        temporary = output is None
        with contextlib.ExitStack() as stack:
            if temporary:
                output = stack.enter_context(tempfile.TemporaryDirectory(prefix="wfcore-"))
            cfg.output = str(output)
            run_dir = pipeline.run_dir_of(cfg)
            plugins = manager.build(cfg.plugins, [(inmemory.NAME,
                                                   inmemory.InMemory(model, bundle))],
                                    base_dir=cfg.base_dir)
            written = []
            if not resume and not temporary:  # for --resume and export from the command line
                pipeline.check_run_dir(run_dir, force)  # before anything is written there
                written = inmemory.write_snapshot(run_dir, model, bundle)
            try:
                result = run_config(cfg, force=force, resume=resume, plugins=plugins)
            except BaseException:
                if written and not rundir.is_owned(run_dir):  # refused before it began
                    for path in written:
                        path.unlink(missing_ok=True)
                raise
            if model is None:
                model = pruned_model(run_dir, plugins)
            if temporary:  # nothing of the directory stays
                result.run_dir = None
                result.report["config"]["output"] = None
        return model, result


def copied(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, to prune while the caller's stays as it was."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # a module holding something that cannot be copied
        raise WfcoreError(f"model: cannot be copied ({type(exc).__name__}: {first_line(exc)}); "
                          "pass inplace=True to prune it in place") from None


def pruned_model(run_dir: Path, plugins: manager.Plugins) -> nn.Module:
    """The model of a finished run at its last step (a model the config built)."""
    from wfcore.run import saved as runs

    rebuilt = runs.rebuild(run_dir, plugins=plugins)
    runs.load_step(rebuilt.model, run_dir, runs.steps_in(run_dir)[-1], "wfcore.prune")
    return rebuilt.model.eval()


# -- export, bench --------------------------------------------------------------------
def export(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | None = None,
           *, input_shape: Sequence[int] | None = None, quantize: str | None = None,
           data: Any = None, test: Any = None, params: Sequence[str] | None = None,
           exporter: str = "onnx", quiet: bool = False, **options: Any) -> dict[str, Any]:
    """Export ``model`` with a registered exporter (``onnx``) and return its checked record:
    zeros kept (every weight zero in PyTorch is zero in the file) and parity (the file's
    outputs against PyTorch's), as ``wfcore export`` reports them.

    ``example_input``: a batch the model takes (its first item is used), or
    ``input_shape``: one item's shape (random values). ``quantize="int8"`` also writes
    ``<name>.int8.onnx``, calibrated on ``data`` (a Dataset, DataLoader or (inputs,
    targets) tensors) with top-1 on ``test`` (default: ``data``). ``params``: globs of
    the weights whose zeros are checked (default: the prunable set, as ``model.params``).
    ``options``: the exporter's (``opset``, ``atol``, ``quantize_for``, ...).
    """
    from wfcore.masks import select_params

    with console(quiet):
        if example_input is None:
            if input_shape is None:
                raise WfcoreError("wfcore.export needs example_input or input_shape")
            example_input = torch.randn(1, *input_shape)
        section = {"name": exporter, **options, **({"quantize": quantize} if quantize else {})}
        made = manager.build().create("exporters", manager.Section.of(section, "export"),
                                      seed=0)
        bundle = None
        if data is not None:
            bundle = inmemory.as_bundle(data, test if test is not None else data)
        model = model.cpu().eval()
        chosen = select_params(model, list(params) if params is not None else None)
        try:
            return made.export(model, example_input, str(path), data=bundle,
                               params={n: p.detach() for n, p in chosen.items()})
        except WfcoreError:
            raise
        except Exception as exc:  # the converter's refusal (an operator, an opset): one line
            raise WfcoreError(f"wfcore.export: exporter '{exporter}' failed on {path}: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None


def bench(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
          dense: str | os.PathLike[str] | None = None, batch_size: int = 1,
          engines: Sequence[str] = ENGINES,
          torch_models: Mapping[str, nn.Module] | None = None, quiet: bool = False,
          **kwargs: Any) -> list[dict[str, Any]]:
    """Time ONNX files on every installed engine, as ``wfcore bench``; one row per file and
    engine: model, engine, batch_size, median_ms, p90_ms, items_per_s, runs (rounds),
    speedup (against ``dense`` on ONNX Runtime: the median of the per-round ratios, with
    speedup_low/high and ``noisy``). ``kwargs``: warmup, runs, min_seconds, threads."""
    from wfcore.export.bench import bench as time_files

    listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    with console(quiet):
        timings = time_files([str(p) for p in listed], dense=dense, batch_size=batch_size,
                             engines=list(engines), torch_models=dict(torch_models or {}),
                             **kwargs)
    return [t.as_dict() for t in timings]
