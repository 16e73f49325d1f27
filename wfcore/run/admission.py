"""Admission: every check that can fail a run on its config, made before the dense model
is trained and before ``--force`` removes anything of an earlier run.

The plan (``wfcore plan`` and the start of ``wfcore prune``) calls ``admit``; what it
checks needs the model's shapes and the data set's size, nothing trained:

- the targets: none whose rounding empties the model or a layer (``wfcore.run.targets``);
- the allocator: its globs match, and its floors, exclusions or fixed layers leave every
  target reachable (``Allocator.admit``);
- the export: its data needs (``Exporter.check_data``: INT8 calibration samples);
- the gradients: ``fisher.grad_batch`` within the training set, a ``fisher.store_dir``
  that can hold the store (``wfcore.fisher.store.check_directory``).

Memory and disk (the store, the estimator's working set, ``structure.block``'s group
blocks) are the plan's own check, ``Plan.check``.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from wfcore.errors import ConfigError
from wfcore.fisher.store import check_directory
from wfcore.interfaces import Allocator, DataBundle, Exporter, PruneStep, dataset_size
from wfcore.run import targets


def admit(cfg: DictConfig, steps: list[PruneStep], params: dict[str, nn.Parameter],
          data: DataBundle | None, allocator: Allocator, exporter: Exporter | None,
          needs_gradients: bool) -> None:
    """Raise a one-line WfcoreError naming the config key of the first thing that would
    fail the run (see the module doc). ``data``: None when only a stand-in of the data
    set could be read (``wfcore plan`` on another machine): its size is not checked."""
    targets.check(steps, params, cfg.allocator.name)
    allocator.admit({n: p.numel() for n, p in params.items()},
                    [s for _, s in targets.targets(steps)])
    if exporter is not None and data is not None:
        exporter.check_data(data)
    if data is not None and cfg.fisher.grad_batch > dataset_size(data.train):
        raise ConfigError(f"config key 'fisher.grad_batch': {cfg.fisher.grad_batch} is more "
                          f"than the {dataset_size(data.train)} training samples")
    if needs_gradients and cfg.fisher.store_dir:  # else the run directory, locked first
        check_directory(cfg.fisher.store_dir)
