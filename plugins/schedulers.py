"""One-shot schedules: each target sparsity pruned from the dense model.

``oneshot`` reaches each target in one step. ``iterative`` reaches it in ``steps``
sub-steps; before every sub-step the gradients are re-sampled and the curvature
recomputed at the updated, masked weights (the pipeline's ``prune_to`` per sub-step),
so that later sub-steps see the weights the earlier OBS updates moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wfcore import PruneStep, Scheduler, hookimpl

SPACINGS = ("linear", "polynomial")


def check_sparsities(sparsities: list[float]) -> None:
    if not sparsities:
        raise ValueError("sparsities must list at least one target")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity {s} is not in [0, 1)")


@dataclass
class OneshotOptions:
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95])
    finetune_epochs: int = 0  # fine-tuning after each step (0 = pure one-shot)

    def validate(self) -> None:
        check_sparsities(self.sparsities)


class Oneshot(Scheduler):
    Options = OneshotOptions

    def __init__(self, options: OneshotOptions | None = None):
        self.options = options or OneshotOptions()

    def plan(self) -> list[PruneStep]:
        return [PruneStep(index=i, target_sparsity=s, from_dense=True,
                          finetune_epochs=self.options.finetune_epochs)
                for i, s in enumerate(self.options.sparsities)]


def substep_sparsities(target: float, steps: int, spacing: str = "linear",
                       power: float = 3.0) -> list[float]:
    """The sparsity after each of ``steps`` sub-steps from dense to ``target``.

    linear: equal increments. polynomial: s_k = target * (1 - (1 - k/steps) ** power),
    large steps first and small ones near the target, where each weight matters more.
    """
    fractions = [k / steps for k in range(1, steps + 1)]
    if spacing == "polynomial":
        fractions = [1.0 - (1.0 - f) ** power for f in fractions]
    out = [target * f for f in fractions]
    out[-1] = target
    return out


@dataclass
class IterativeOptions:
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95])
    steps: int = 8  # sub-steps per target, each with fresh gradients and curvature
    spacing: str = "polynomial"  # polynomial (large sub-steps first; better at 95-98%) | linear
    power: float = 3.0  # exponent of the polynomial spacing
    finetune_epochs: int = 0  # fine-tuning after each target is reached (0 = one-shot)

    def validate(self) -> None:
        check_sparsities(self.sparsities)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing '{self.spacing}' is not one of {', '.join(SPACINGS)}")
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power}")


class Iterative(Scheduler):
    Options = IterativeOptions

    def __init__(self, options: IterativeOptions | None = None):
        self.options = options or IterativeOptions()

    def plan(self) -> list[PruneStep]:
        o = self.options
        return [PruneStep(index=i, target_sparsity=s, from_dense=True,
                          substeps=substep_sparsities(s, o.steps, o.spacing, o.power),
                          finetune_epochs=o.finetune_epochs)
                for i, s in enumerate(o.sparsities)]


@hookimpl
def wfcore_schedulers():
    return {"oneshot": Oneshot, "iterative": Iterative}
