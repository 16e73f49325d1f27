"""Targets that rounding turns into an empty model or an empty layer, refused at the start.

An allocator prunes ``round(target * n)`` of n weights. A target below 1 whose rounding
reaches n (0.999999 of 266,200 weights) prunes every weight: the run would end with exit
0, a model at chance level and an all-zero export. This is decided by the target and the
sizes alone, so it is refused before the dense model is trained:

- every allocator: the whole prunable model emptied (``round(s * total) >= total``);
- allocators that round each layer on its own (``uniform``): a layer emptied. Under a
  global allocation whether a layer ends empty depends on the scores, so it is not a
  config error.
"""

from __future__ import annotations

import math

from torch import nn

from wfcore.errors import ConfigError
from wfcore.interfaces import PruneStep

PER_LAYER = ("uniform",)  # allocators that apply the target to each layer's own count


def targets(plan: list[PruneStep]) -> list[tuple[int, float]]:
    """(step index, sparsity) of every target and sub-target of the plan."""
    return [(step.index, s) for step in plan for s in [step.target_sparsity, *step.substeps]]


def _keeps_one(n: int) -> float:
    """The largest sparsity (to 6 digits) whose rounding still keeps a weight of n."""
    return math.floor((n - 1) / n * 1e6) / 1e6


def check(plan: list[PruneStep], params: dict[str, nn.Parameter], allocator: str) -> None:
    """Refuse a target whose rounding prunes every weight, or empties a layer when
    ``allocator`` rounds layer by layer."""
    sizes = {n: p.numel() for n, p in params.items()}
    total = sum(sizes.values())
    for index, s in targets(plan):
        if s > 0 and round(s * total) >= total:
            raise ConfigError(
                f"config key 'scheduler': step {index}'s sparsity {s:g} prunes all {total} "
                f"prunable weights once rounded; at most {_keeps_one(total):g} keeps one")
        if allocator not in PER_LAYER:
            continue
        for name, n in sizes.items():
            if s > 0 and round(s * n) >= n:
                raise ConfigError(
                    f"config key 'scheduler': step {index}'s sparsity {s:g} prunes all {n} "
                    f"weights of {name} once rounded (allocator '{allocator}'); at most "
                    f"{_keeps_one(n):g} keeps one")
