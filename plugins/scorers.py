"""The Optimal Brain Surgeon scorer: rho_q = w_q^2 / (2 [F^-1]_qq)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wfcore import hookimpl
from wfcore.interfaces import Curvature, Scorer, Tensors

UPDATES = ("none", "independent", "joint")


@dataclass
class ObsOptions:
    # none: mask only; independent: sum of single-weight OBS updates (the original
    # method); joint: the exact OBS solution for the whole pruned set of each block.
    update: str = "none"

    def validate(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update '{self.update}' is not one of {', '.join(UPDATES)}")


class Obs(Scorer):
    Options = ObsOptions

    def __init__(self, options: ObsOptions | None = None):
        self.options = options or ObsOptions()

    def scores(self, weights: Tensors, curvature: Curvature, gradient: Tensors | None) -> Tensors:
        diag = curvature.inverse_diagonal()
        return {n: w.double() ** 2 / (2 * diag[n].double()) for n, w in weights.items()}

    def update(self, weights: Tensors, curvature: Curvature, prune_mask: Tensors,
               gradient: Tensors | None) -> Tensors | None:
        if self.options.update == "none":
            return None
        return curvature.prune_update(prune_mask, weights, self.options.update)


@hookimpl
def wfcore_scorers():
    return {"obs": Obs}
