"""What the update safeguard and the running statistics cost a pruning step, for the plan.

The plan of a step counted the gradients and the algebra only; on small models the
safeguard's forward passes were most of the step (a small ViT: 80 s of safeguard against
8.6 s of pruning) and a big one was planned at a quarter of what it took. The count here
follows ``wfcore.run.safeguard.Safeguard.choose``: one forward of the calibration batch at
the current weights, each candidate on ``screen_samples`` (all of the batch without
screening), about two finalists on the rest of it, and for a model with running statistics
one re-estimation per candidate and one after the step (``batchnorm.samples`` each). A
baseline (magnitude, random) runs none of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from wfcore.run.batchnorm import stat_modules

FINALISTS = 2  # candidates that usually remain close after the screening


@dataclass
class SafeguardCost:
    forward_samples: int  # samples run forward by the safeguard and the statistics
    seconds: float  # at the measured forward speed (NaN when not calibrated)

    def line(self) -> str:
        seconds = "not measured" if math.isnan(self.seconds) else f"~{self.seconds:.1f} s"
        return (f"safeguard and running statistics: {self.forward_samples:,} samples forward "
                f"per step, {seconds}")


def planned_forward_samples(cfg: DictConfig, baseline: bool, has_stats: bool,
                            pool: int | None = None) -> int:
    """Samples run forward in one step by the safeguard and the statistics (see the doc).
    ``pool``: the samples of the pruning pool, which both draw from (all of it when it
    holds fewer than they ask for); None: as many as they ask for."""
    guard, bn = cfg.safeguard, cfg.batchnorm

    def drawn(asked: int) -> int:
        return asked if pool is None else min(asked, pool)

    stats = drawn(bn.samples) if bn.recalibrate and has_stats else 0
    if not guard.enabled or baseline:
        return stats  # nothing to choose; the statistics after the step
    candidates = len({*guard.alphas, 0.0}) + (guard.fallback == "magnitude")
    k = drawn(guard.calibration_samples)
    screen = guard.screen_samples if 0 < guard.screen_samples < k else k
    finals = FINALISTS * (k - screen)  # the rest of the samples, for the close ones
    return k + candidates * screen + finals + (candidates + 1) * stats


def forward_seconds(model: nn.Module, example: torch.Tensor, batch: int = 64) -> float:
    """Seconds per sample of an inference forward pass, timed on ``batch`` copies."""
    was_training = model.training
    model.eval()
    x = example.expand(batch, *example.shape[1:]).clone()
    try:
        with torch.no_grad():
            model(x)  # warm-up
            start = time.perf_counter()
            model(x)
            return (time.perf_counter() - start) / batch
    finally:
        model.train(was_training)


def safeguard_cost(cfg: DictConfig, model: nn.Module, example: torch.Tensor, baseline: bool,
                   calibrate: bool = True, pool: int | None = None) -> SafeguardCost:
    samples = planned_forward_samples(cfg, baseline, bool(stat_modules(model)), pool)
    seconds = samples * forward_seconds(model, example) if calibrate and samples else (
        0.0 if not samples else math.nan)
    return SafeguardCost(samples, seconds)
