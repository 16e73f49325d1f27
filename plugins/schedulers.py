"""The one-shot schedule: each target sparsity pruned from the dense model in one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from wfcore import hookimpl
from wfcore.interfaces import PruneStep, Scheduler


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


@hookimpl
def wfcore_schedulers():
    return {"oneshot": Oneshot}
