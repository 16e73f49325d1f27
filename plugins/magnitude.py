"""The magnitude baseline as an estimator: the identity curvature (F^-1 = I).

With the ``obs`` scorer, rho_q = w_q^2 / 2, so pruning removes the smallest weights;
the OBS update of an identity curvature only zeroes the pruned weights.
"""

from __future__ import annotations

import torch

from wfcore import UPDATE_MODES, Curvature, HessianEstimator, PruningProblem, Tensors, hookimpl


class IdentityCurvature(Curvature):
    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params

    def inverse_diagonal(self) -> Tensors:
        return {n: torch.ones_like(p, dtype=torch.float32) for n, p in self.params.items()}

    def inverse_mul(self, v: Tensors) -> Tensors:
        return {n: t.clone() for n, t in v.items()}

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; expected one of {UPDATE_MODES}")
        # Independent and joint coincide: the pruned weights drop to zero, nothing else moves.
        return {n: torch.where(prune_mask[n], -w[n], torch.zeros_like(w[n])) for n in w}


class Magnitude(HessianEstimator):
    needs_gradients = False
    baseline = True  # the safeguard never swaps its mask

    def __init__(self, options=None):
        pass

    def fit(self, problem: PruningProblem) -> Curvature:
        return IdentityCurvature({n: p.detach() for n, p in problem.params.items()})


@hookimpl
def wfcore_estimators():
    return {"magnitude": Magnitude}
