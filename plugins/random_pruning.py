"""The random baseline (estimator ``random``): the floor every method must beat.

A diagonal curvature built so that the ``obs`` score of every weight is a uniform random
number: [F^-1]_qq = w_q^2 / u_q with u_q ~ U(0, 1], hence rho_q = w_q^2 / (2 [F^-1]_qq)
= u_q / 2. The allocator then removes weights in a uniformly random order (``global``:
at random over the whole model; ``uniform``: at random inside each layer). Weights that
are exactly zero score 0 and go first, which costs nothing. The draw comes from the
``seed`` option, so a run is reproducible; each pruning step of a run draws afresh, and
the generator is saved in the run's checkpoints (a resumed run draws what an uninterrupted
one would).
The OBS update of a diagonal curvature only zeroes the pruned weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from wfcore.plugins.diag_fisher import DiagonalCurvature

from wfcore import hookimpl
from wfcore.interfaces import Curvature, HessianEstimator, PruningProblem, Stateful


@dataclass
class RandomOptions:
    seed: int = 0  # seeds the random order (independent of the run's gradient sampling)


class RandomEstimator(HessianEstimator, Stateful):
    Options = RandomOptions
    needs_gradients = False

    def __init__(self, options: RandomOptions | None = None):
        self.options = options or RandomOptions()
        self.generator = torch.Generator().manual_seed(self.options.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def fit(self, problem: PruningProblem) -> Curvature:
        inverse = {}
        for n, p in problem.params.items():
            w2 = p.detach().double().cpu().pow(2)
            u = 1.0 - torch.rand(p.shape, generator=self.generator, dtype=torch.float64)  # (0, 1]
            diag = torch.where(w2 > 0, w2 / u, torch.ones_like(w2))
            inverse[n] = diag.to(p.device)
        return DiagonalCurvature(inverse)


@hookimpl
def wfcore_estimators():
    return {"random": RandomEstimator}
