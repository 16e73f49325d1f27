"""The random baseline: the floor every method must beat.

The ``random`` scorer gives every weight a uniform random score u_q ~ U(0, 1], so the
allocator removes weights in a uniformly random order (``global``: at random over the
whole model; ``uniform``: at random inside each layer). Weights that are exactly zero
score 0 and go first, which costs nothing. Its update is the mask alone. The draw comes
from its generator, seeded by the ``seed`` option (None: the run's seed); each pruning
step draws afresh, and the generator is saved in the run's checkpoints (a resumed run
draws what an uninterrupted one would).

The ``random`` estimator keeps ``estimator.name=random`` working with any configured
scorer: its curvature is the identity (nothing to estimate; an OBS update only zeroes
the pruned weights) and it pairs itself with the ``random`` scorer seeded by its own
``seed`` option (``HessianEstimator.paired_scorer``), which the run uses in place of
``scorer.name``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from wfcore.plugins.magnitude import IdentityCurvature

from wfcore import (
    Curvature,
    HessianEstimator,
    PruningProblem,
    Scorer,
    Stateful,
    Tensors,
    hookimpl,
)


@dataclass
class RandomScorerOptions:
    seed: int | None = None  # seeds the random order; None = the run's seed


class RandomScorer(Scorer, Stateful):
    """Uniform random scores in (0, 1], 0 for weights already at zero; mask-only update."""

    Options = RandomScorerOptions
    baseline = True  # the safeguard never swaps its mask for magnitude's

    def __init__(self, options: RandomScorerOptions | None = None, seed: int = 0):
        self.options = options or RandomScorerOptions()
        start = seed if self.options.seed is None else self.options.seed
        self.generator = torch.Generator().manual_seed(start)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def scores(self, weights: Tensors, curvature: Curvature, gradient: Tensors | None) -> Tensors:
        out = {}
        for n, w in weights.items():
            u = 1.0 - torch.rand(w.shape, generator=self.generator, dtype=torch.float64)  # (0, 1]
            out[n] = torch.where(w.cpu() != 0, u, torch.zeros_like(u)).to(w.device)
        return out


@dataclass
class RandomOptions:
    seed: int = 0  # seeds the random order (independent of the run's gradient sampling)


class RandomEstimator(HessianEstimator):
    """The identity curvature, paired with the ``random`` scorer (see the module doc)."""

    Options = RandomOptions
    needs_gradients = False
    baseline = True

    def __init__(self, options: RandomOptions | None = None):
        self.options = options or RandomOptions()

    def fit(self, problem: PruningProblem) -> Curvature:
        return IdentityCurvature({n: p.detach() for n, p in problem.params.items()})

    def paired_scorer(self) -> Scorer:
        return RandomScorer(RandomScorerOptions(seed=self.options.seed))


@hookimpl
def wfcore_estimators():
    return {"random": RandomEstimator}


@hookimpl
def wfcore_scorers():
    return {"random": RandomScorer}
