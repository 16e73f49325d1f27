"""The gradual schedule (Zhu & Gupta's polynomial decay, as used by WoodFisher).

Over the fine-tuning epochs t = 0 .. epochs-1, a pruning step runs at the start of every
``freq``-th epoch from t0 = ``start_epoch`` to t1 = ``end_epoch``, each to

    s(t) = s_f - (s_f - s_i) * (1 - (t - t0) / (t1 - t0)) ** p

so that s(t0) = s_i, s(t1) = s_f, and the steps shrink as the network gets sparse.
The model is fine-tuned (masks fixed) between steps and for the epochs after t1; the
epochs before t0 fine-tune the dense model. Each step uses the configured estimator,
scorer and allocator, optionally in ``substeps`` sub-steps that recompute the curvature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from wfcore import PruneStep, Scheduler, hookimpl
from wfcore.choices import LR_SCHEDULES


def polynomial_sparsity(t: float, t0: float, t1: float, s_i: float, s_f: float,
                        power: float = 3.0) -> float:
    """s(t) of the polynomial schedule, clamped to [s_i, s_f] outside [t0, t1]."""
    if t1 == t0:
        return s_f if t >= t0 else s_i
    frac = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
    return s_f - (s_f - s_i) * (1.0 - frac) ** power


@dataclass
class GradualOptions:
    initial_sparsity: float = 0.05  # s_i, reached by the first step (at start_epoch)
    final_sparsity: float = 0.9  # s_f, reached by the last step (at end_epoch)
    start_epoch: int = 0  # t0: epoch of the first pruning step
    end_epoch: int = 10  # t1: epoch of the last pruning step; (t1 - t0) % freq == 0
    freq: int = 2  # epochs between pruning steps (fine-tuning in between)
    power: float = 3.0  # p: the cubic of Zhu & Gupta, fast at first and slow near s_f
    epochs: int = 20  # total fine-tuning epochs; the ones after end_epoch recover accuracy
    substeps: int = 1  # sub-steps per pruning step, each re-estimating the curvature
    # Fine-tuning overrides of the train section (null = as train.*), so that the dense
    # model (cached by the train section) need not be retrained to change them.
    lr: Optional[float] = None  # fine-tuning learning rate
    lr_schedule: Optional[str] = None  # cosine | step | exponential | constant
    lr_gamma: Optional[float] = None  # decay factor of step / exponential
    lr_step: Optional[int] = None  # epochs between decays of the step schedule
    lr_decay_start: int = 0  # epochs at the full LR before the LR schedule starts

    def validate(self) -> None:
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if not 0.0 <= s_i <= s_f < 1.0:
            raise ValueError(f"need 0 <= initial_sparsity ({s_i}) <= final_sparsity ({s_f}) < 1")
        t0, t1 = self.start_epoch, self.end_epoch
        if not 0 <= t0 <= t1 < self.epochs:
            raise ValueError(f"need 0 <= start_epoch ({t0}) <= end_epoch ({t1}) < epochs "
                             f"({self.epochs})")
        if self.freq < 1:
            raise ValueError(f"freq must be >= 1, got {self.freq}")
        if (t1 - t0) % self.freq:
            raise ValueError(f"end_epoch - start_epoch ({t1 - t0}) must be a multiple of freq "
                             f"({self.freq}) so that the last step reaches final_sparsity")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        if self.substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {self.substeps}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule '{self.lr_schedule}' is not one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay_start < 0:
            raise ValueError(f"lr_decay_start must be >= 0, got {self.lr_decay_start}")


class Gradual(Scheduler):
    Options = GradualOptions

    def __init__(self, options: GradualOptions | None = None):
        self.options = options or GradualOptions()

    def target(self, epoch: int) -> float:
        o = self.options
        return polynomial_sparsity(epoch, o.start_epoch, o.end_epoch, o.initial_sparsity,
                                   o.final_sparsity, o.power)

    def plan(self) -> list[PruneStep]:
        o = self.options
        kept: list[tuple[int, float]] = []  # (epoch, target)
        previous = 0.0
        for t in range(o.start_epoch, o.end_epoch + 1, o.freq):
            target = round(self.target(t), 12)
            if target > previous:  # s_i = 0 at t0 prunes nothing: those epochs just fine-tune
                kept.append((t, target))
                previous = target
        steps: list[PruneStep] = []
        previous = 0.0
        for j, (t, target) in enumerate(kept):
            n = o.substeps
            substeps = [previous + (target - previous) * (i + 1) / n for i in range(n)]
            following = kept[j + 1][0] if j + 1 < len(kept) else o.epochs
            steps.append(PruneStep(index=j, target_sparsity=target, substeps=substeps,
                                   epoch=t, finetune_epochs=following - t))
            previous = target
        return steps

    def train_overrides(self) -> dict[str, Any]:
        o = self.options
        values = {"lr": o.lr, "lr_schedule": o.lr_schedule, "lr_gamma": o.lr_gamma,
                  "lr_step": o.lr_step}
        out: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        out["lr_decay_start"] = o.lr_decay_start
        return out


@hookimpl
def wfcore_schedulers():
    return {"gradual": Gradual}
