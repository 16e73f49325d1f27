"""Running statistics (BatchNorm and the like) re-estimated after the weights change.

A BatchNorm layer normalises with the mean and variance of its input that it averaged
during training. Pruning changes the weights before it, so those statistics go stale:
a residual CNN with BatchNorm pruned one-shot to 80% fell from 93% to chance with the
old statistics and kept 81% with statistics re-estimated on 20 training batches, the
same masks. Every candidate the safeguard judges (an alpha, a mask) changes the weights
too, so it is judged with statistics re-estimated for it; otherwise the stale statistics
penalise any step that moves the weights, and alpha = 0 always wins.

``RunningStats.refresh`` re-estimates the running statistics of every module that keeps
them (``torch.nn.modules.batchnorm._NormBase`` with ``track_running_stats``:
BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with tracking) over a fixed set of
training samples from the pruning pool, as torch.optim.swa_utils.update_bn does (the
modules in train mode, every other module in eval mode: no dropout), but with the exact
mean and variance of each module's input over all the samples rather than a per-chunk
average. Models without such modules cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

log = logging.getLogger(__name__)


def stat_modules(model: nn.Module) -> list[_NormBase]:
    """The modules of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            and m.running_mean is not None]


class RunningStats:
    """Re-estimates the running statistics of ``model`` on ``x`` (samples of the pruning
    pool, never the test set), ``chunk`` samples per forward pass.

    ``enabled`` False (config ``batchnorm.recalibrate: false``) or a model without such
    modules: ``refresh`` does nothing.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor | None, *, enabled: bool = True,
                 chunk: int = 256):
        self.model = model
        self.modules = stat_modules(model) if enabled and x is not None else []
        self.x = x if self.modules else None  # (k, *input)
        self.chunk = chunk
        self.seconds = 0.0  # spent in refresh, all calls together
        self.calls = 0

    @classmethod
    def from_pool(cls, model: nn.Module, pool: torch.utils.data.Dataset, samples: int,
                  seed: int, device: torch.device | str, *, enabled: bool = True,
                  chunk: int = 256) -> RunningStats:
        """``samples`` inputs of the pruning pool (seeded), drawn only for a model that
        keeps running statistics (none are held for the others)."""
        needed = enabled and samples > 0 and bool(stat_modules(model))
        return cls(model, pool_inputs(pool, samples if needed else 0, seed, device),
                   enabled=enabled, chunk=chunk)

    @property
    def active(self) -> bool:
        return bool(self.modules)

    def mark(self) -> tuple[int, float]:
        """(calls, seconds) so far: ``record(since=mark())`` counts what came after."""
        return self.calls, self.seconds

    def record(self, since: tuple[int, float] = (0, 0.0)) -> dict[str, Any]:
        """What the report states: modules, samples (from the pruning pool), and the calls
        and seconds since ``since``."""
        return {"enabled": self.active, "modules": len(self.modules),
                "samples": 0 if self.x is None else len(self.x),
                "calls": self.calls - since[0], "seconds": round(self.seconds - since[1], 4)}

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-estimate every module's running mean and variance at the model's current
        weights: each module's input moments over all the samples, summed in float64 chunk
        by chunk (exact, whatever the chunking), while the forward passes normalise with
        each chunk's own statistics as in training. The model's modes are left as they
        came."""
        samples = self.x
        if not self.modules or samples is None:  # (None exactly when there are no modules)
            return
        start = time.perf_counter()
        modes = {m: m.training for m in self.model.modules()}
        sums: dict[_NormBase, list[Any]] = {m: [0, 0.0, 0.0] for m in self.modules}

        def moments(module: _NormBase, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()  # (N, C, *spatial): channels on dim 1
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * positions)
            acc = sums[module]
            acc[0] += x.shape[1]
            acc[1] = acc[1] + x.sum(1)
            acc[2] = acc[2] + x.square().sum(1)

        hooks = [m.register_forward_pre_hook(moments) for m in self.modules]
        try:
            self.model.eval()
            for m in self.modules:
                m.train()  # normalise with each chunk's statistics, as in training
            for x in samples.split(self.chunk):
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for module, training in modes.items():
                module.train(training)
        for m, (n, total, squares) in sums.items():
            mean = total / n
            var = (squares - n * mean.square()) / max(n - 1, 1)  # unbiased, as BatchNorm's
            running_mean, running_var, batches = \
                m.running_mean, m.running_var, m.num_batches_tracked
            # stat_modules keeps the modules that track running statistics: these are set
            assert running_mean is not None and running_var is not None and batches is not None
            running_mean.copy_(mean.to(running_mean.dtype))
            running_var.copy_(var.clamp_min(0.0).to(running_var.dtype))
            batches.add_(1)
        self.calls += 1
        self.seconds += time.perf_counter() - start

    def state(self) -> list[dict[str, torch.Tensor]]:
        """A copy of every module's statistics (``restore`` puts them back)."""
        return [{k: v.clone() for k, v in m.state_dict().items()
                 if k in ("running_mean", "running_var", "num_batches_tracked")}
                for m in self.modules]

    def restore(self, state: list[dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for m, saved in zip(self.modules, state, strict=True):
                for k, v in saved.items():
                    getattr(m, k).copy_(v)

    @contextmanager
    def kept(self) -> Iterator[None]:
        """The statistics as they are now, back after the block (e.g. the safeguard's
        candidates, each refreshed for itself)."""
        saved = self.state()
        try:
            yield
        finally:
            self.restore(saved)


def pool_inputs(dataset: torch.utils.data.Dataset, size: int, seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``size`` inputs of ``dataset`` (all if smaller) in a seeded random order, or None
    for ``size`` 0."""
    if size <= 0:
        return None
    from wfcore.run.calibration import calibration_batch  # one way to draw samples of a split

    return calibration_batch(dataset, size, seed, device).x
