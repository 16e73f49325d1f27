"""The model and data given to ``wfcore.prune`` in Python, as an in-process plugin.

``wfcore.prune(model, data)`` does not grow a second pipeline: it registers the model
object and the data under the reserved name ``in_memory`` (``model.name`` and
``data.name``) through an ordinary plugin object, ``InMemory``, and runs the config like
any other. A run directory of such a run also holds the model's architecture
(``in_memory_model.pt``, the whole module pickled) and the data (``in_memory_data.pt``),
so that ``wfcore prune --resume RUN`` and ``wfcore export RUN`` rebuild them there
(``InMemory.from_run_dir``): those files are unpickled (``torch.load`` with
``weights_only=False``), since the run's own config names them.

``as_bundle`` turns what users hold (a Dataset, a DataLoader, ``(inputs, targets)``
tensors, or ``(train, test)``) into a ``DataBundle``, the shapes and number of classes
read from the data; it also serves the data factories of file specs (``wfcore.specs``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from wfcore import hookimpl
from wfcore.errors import ConfigError, WfcoreError
from wfcore.interfaces import DataBundle, Loss, dataset_size
from wfcore.run import states

log = logging.getLogger(__name__)

NAME = "in_memory"  # reserved model.name and data.name of what wfcore.prune is given
MODEL_FILE = "in_memory_model.pt"
DATA_FILE = "in_memory_data.pt"
SCANNED = 100_000  # labels read at most to count the classes of a data set without `classes`


def is_tensor_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and \
        all(isinstance(t, torch.Tensor) for t in obj)


def to_dataset(obj: Any, key: str) -> Dataset:
    """A Dataset, a DataLoader's data set, or ``(inputs, targets)`` tensors as one."""
    if isinstance(obj, DataLoader):
        return obj.dataset
    if is_tensor_pair(obj):
        inputs, targets = obj
        if len(inputs) != len(targets):
            raise WfcoreError(f"{key}: {len(inputs)} inputs but {len(targets)} targets")
        return TensorDataset(inputs, targets)
    if isinstance(obj, Dataset):
        if not hasattr(obj, "__len__"):
            raise WfcoreError(f"{key}: an IterableDataset has no length; wfcore samples "
                              "gradients by index: give a map-style Dataset")
        return obj
    raise WfcoreError(f"{key}: expected a Dataset, a DataLoader or (inputs, targets) tensors, "
                      f"got {type(obj).__name__}")


def first_item(dataset: Dataset, key: str) -> tuple[torch.Tensor, Any]:
    if dataset_size(dataset) == 0:
        raise WfcoreError(f"{key}: the data set is empty")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise WfcoreError(f"{key}: an item must be (input, target), got {type(item).__name__}")
    return torch.as_tensor(item[0]), item[1]


def count_classes(*datasets: Dataset) -> int:
    """The classes of integer labels: ``classes`` of a torchvision data set, else the
    largest label + 1 (read from the tensors of a TensorDataset, else item by item)."""
    for d in datasets:
        if hasattr(d, "classes"):
            return len(d.classes)
    largest = -1
    for d in datasets:
        if isinstance(d, TensorDataset) and len(d.tensors) > 1:
            labels = d.tensors[1]
        else:
            labels = torch.as_tensor([d[i][1] for i in range(min(dataset_size(d), SCANNED))])
        if len(labels) and not labels.is_floating_point():
            largest = max(largest, int(labels.max()))
    return max(largest + 1, 1)


def empty_like(dataset: Dataset) -> Dataset:
    """A data set of no items of ``dataset``'s shapes: no test set, nothing evaluated."""
    x, y = first_item(dataset, "data")
    target = torch.as_tensor(y)
    return TensorDataset(torch.empty(0, *x.shape, dtype=x.dtype),
                         torch.empty(0, *target.shape, dtype=target.dtype))


def split(data: Any, test: Any = None) -> tuple[Any, Any]:
    """``(train, test)`` data sets given as ``data`` apart; else ``(data, test)``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not is_tensor_pair(data) \
            and test is None:
        return data[0], data[1]
    return data, test


def as_bundle(data: Any, test: Any = None, loss: Loss | None = None,
              num_classes: int | None = None, key: str = "data") -> DataBundle:
    """``data`` as a DataBundle: a DataBundle as it is; ``(train, test)`` data sets; or the
    training data (a Dataset, a DataLoader, ``(inputs, targets)`` tensors) with ``test``
    (the same kinds, or None: nothing is evaluated)."""
    if isinstance(data, DataBundle):
        return data
    data, test = split(data, test)
    train = to_dataset(data, key)
    test_set = to_dataset(test, "test") if test is not None else empty_like(train)
    inputs, _ = first_item(train, key)
    if num_classes is None:
        num_classes = count_classes(train, test_set)
    return DataBundle(train, test_set, num_classes=num_classes,
                      input_shape=tuple(inputs.shape), loss=loss)


def output_classes(model: nn.Module, example: torch.Tensor) -> int | None:
    """The width of a classifier's (n, classes) output for one example, else None."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example.unsqueeze(0).to(device))
    except Exception as exc:
        raise WfcoreError(f"the model does not take the data's inputs of shape "
                          f"{tuple(example.shape)}: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(training)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


@dataclass
class InMemory:
    """The in-process plugin of ``wfcore.prune``: ``model`` and ``data`` registered as
    ``in_memory`` (each only when given)."""

    model: nn.Module | None = None
    data: DataBundle | None = None
    where: str = "wfcore.prune"  # what gave them, for errors

    @hookimpl
    def wfcore_models(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        model = self.model

        def given(options: Any, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
            return model

        return {NAME: given}

    @hookimpl
    def wfcore_datasets(self) -> dict[str, Any]:
        if self.data is None:
            return {}
        data = self.data

        def given(options: Any, section: Any) -> DataBundle:
            return data

        return {NAME: given}

    @classmethod
    def from_run_dir(cls, run_dir: Path, cfg: DictConfig) -> InMemory:
        """What a run of ``wfcore.prune`` saved in its directory: the model's architecture
        with the dense weights (``dense.pt``) when it is there, and the data."""
        model = data = None
        if cfg.model.name == NAME:
            model = read(run_dir / MODEL_FILE, "model.name=in_memory")
            if not isinstance(model, nn.Module):
                raise WfcoreError(f"{run_dir / MODEL_FILE} holds no nn.Module")
            if (run_dir / "dense.pt").is_file():
                states.load_state(model, run_dir / "dense.pt", "dense model")
        if cfg.data.name == NAME:
            data = read(run_dir / DATA_FILE, "data.name=in_memory")
            if not isinstance(data, DataBundle):
                raise WfcoreError(f"{run_dir / DATA_FILE} holds no DataBundle")
        return cls(model, data, where=str(run_dir))


def read(path: Path, key: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{key}: the model or data was given to wfcore.prune in Python and "
                          f"{path} (saved by that run) is missing: run it from Python again")
    return states.read_module(path, key)


def run_dir_plugins(cfg: DictConfig, run_dir: Path) -> list[tuple[str, object]]:
    """The plugin that rebuilds a ``wfcore.prune`` run's model and data from its directory,
    when its config names them (``--resume``, ``wfcore export``); none otherwise."""
    if NAME not in (cfg.model.name, cfg.data.name):
        return []
    return [(NAME, InMemory.from_run_dir(run_dir, cfg))]


def write_snapshot(run_dir: Path, model: nn.Module | None, data: DataBundle | None) -> list[Path]:
    """Save what ``from_run_dir`` reads back: the module and the data, pickled. What cannot
    be pickled (a class defined in ``__main__`` loads nowhere else, a lambda loss) is left
    out with a warning: the run then resumes and exports from Python only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for obj, name in ((model, MODEL_FILE), (data, DATA_FILE)):
        if obj is None:
            continue
        if any(type(m).__module__ == "__main__" for m in
               (obj.modules() if isinstance(obj, nn.Module) else [])):
            log.warning("%s not written: the model's classes are defined in __main__, which "
                        "another process cannot import; define them in a module for "
                        "`wfcore export` / --resume from the command line", name)
            continue
        if states.save_module(obj, run_dir / name):
            written.append(run_dir / name)
    return written
