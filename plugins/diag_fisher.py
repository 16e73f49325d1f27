"""The diagonal empirical Fisher: F ~ diag((1/m) sum_i g_i o g_i) + damp.

With the ``obs`` scorer, rho_q = w_q^2 F_qq / 2: Optimal Brain Damage (LeCun et al.
1990) with the empirical Fisher in place of the Hessian diagonal. A diagonal curvature
couples no weights, so its OBS update (independent or joint) only zeroes the pruned
weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from wfcore import (
    DAMP_MODES,
    UPDATE_MODES,
    Curvature,
    HessianEstimator,
    PruningProblem,
    Tensors,
    hookimpl,
)

log = logging.getLogger(__name__)


class DiagonalCurvature(Curvature):
    """F^-1 = diag(inverse_diag): every weight on its own."""

    def __init__(self, inverse_diag: Tensors, damp: float | None = None):
        self.inverse_diag = inverse_diag  # {name: tensor of the parameter's shape}
        self.damp = damp

    def quadratic(self, dw: Tensors) -> float:
        return sum(0.5 * float((dw[n].double() ** 2 / self.inverse_diag[n].double()).sum())
                   for n in dw)

    def damping(self) -> float | None:
        return self.damp

    def inverse_diagonal(self) -> Tensors:
        return {n: d.clone() for n, d in self.inverse_diag.items()}

    def inverse_mul(self, v: Tensors) -> Tensors:
        return {n: self.inverse_diag[n] * t for n, t in v.items()}

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; expected one of {UPDATE_MODES}")
        # Independent and joint coincide for a diagonal F: the pruned weights drop to zero.
        return {n: torch.where(prune_mask[n], -w[n], torch.zeros_like(w[n])) for n in w}


def live_mean(square_mean: torch.Tensor) -> float:
    """The mean of diag(G^T G / m) over its live entries (weights pruned earlier, with
    all-zero gradients, do not dilute it); 1.0 when none is live: the Fisher's own scale."""
    live = square_mean > 0
    return float(square_mean[live].mean()) if bool(live.any()) else 1.0


@dataclass
class DiagFisherOptions:
    # Added to every diagonal entry: keeps F invertible where no gradient moved a weight
    # (dead units, pruned weights). 1e-5 is the WoodFisher paper's MNIST damping.
    damp: float = 1e-5
    # absolute: damp as it is; relative: damp * the mean of diag(F) over the live weights
    damp_mode: str = "absolute"

    def validate(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.damp_mode not in DAMP_MODES:
            raise ValueError(f"damp_mode '{self.damp_mode}' is not one of {', '.join(DAMP_MODES)}")


class DiagFisher(HessianEstimator):
    Options = DiagFisherOptions

    def __init__(self, options: DiagFisherOptions | None = None):
        self.options = options or DiagFisherOptions()

    def fit(self, problem: PruningProblem) -> Curvature:
        source = problem.gradient_rows()
        fisher = source.square_mean()  # (d,), streamed over columns
        damp = self.options.damp
        if self.options.damp_mode == "relative":
            damp *= live_mean(fisher)
        fisher += damp
        inverse = problem.layout().unflatten(1.0 / fisher.to(problem.device))
        log.debug("diag_fisher: %d gradients, mean diagonal %.3e, damp %.3g", source.m,
                  float(fisher.mean()), damp)
        return DiagonalCurvature(inverse, damp)


@hookimpl
def wfcore_estimators():
    return {"diag_fisher": DiagFisher}
