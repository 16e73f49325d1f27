"""``allocation: reconstruction`` of the layer-wise estimators: per-layer counts from each
layer's reconstruction error curve.

A layer's relative error e_l(s) (its reconstruction error at sparsity s over the error of
removing it whole) is measured by its method at a few sparsities (``plugins/layerwise.py``,
OBC's database). Each weight of the layer is scored by the slope of the lower convex hull
of that curve at its rank (smallest magnitude first), so that one global threshold over
all layers (``allocator: global``) removes weights in the order of least added error per
weight: the Lagrangian choice of per-layer counts that minimises the sum of the layers'
relative errors for the target, as OBC's search over its database does.
"""

from __future__ import annotations

import torch
from wfcore.plugins.magnitude import IdentityCurvature

from wfcore import Curvature, Scorer, Tensors, WfcoreError


class ReconstructionCurvature(IdentityCurvature):
    """The identity curvature, plus each layer's relative error curve (zeros, error)."""

    def __init__(self, params: dict[str, torch.Tensor],
                 curves: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(params)
        self.curves = curves

    def marginal_scores(self, weights: Tensors) -> Tensors:
        """Every kept weight scored by the slope of its layer's lower convex hull at its
        rank (smallest magnitude first): one threshold over these is the Lagrangian choice
        of per-layer counts that minimises the sum of the relative errors."""
        out = {}
        for n, w in weights.items():
            curve = self.curves.get(n)
            flat = w.reshape(-1).double().abs()
            if curve is None:  # a layer without a curve: its magnitudes, scaled away
                out[n] = w.double() ** 2 * 1e12
                continue
            zeros, errors = curve
            hull = lower_hull(zeros.tolist(), errors.tolist())
            now = int((flat == 0).sum())
            rank = torch.empty_like(flat)
            rank[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=flat.dtype)
            slope = torch.zeros_like(flat)
            for (z0, e0), (z1, e1) in zip(hull, hull[1:], strict=False):
                inside = (rank + 1 > z0) & (rank + 1 <= z1)
                slope[inside] = (e1 - e0) / max(z1 - z0, 1e-12)
            slope[rank < now] = -1.0  # already zero: first, at no cost
            out[n] = slope.reshape(w.shape).to(w.device)
        return out


def lower_hull(zeros: list[float], errors: list[float]) -> list[tuple[float, float]]:
    """The lower convex hull of the points (zeros, error), left to right."""
    hull: list[tuple[float, float]] = []
    for p in sorted(zip(zeros, errors, strict=True)):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


class ReconstructionScorer(Scorer):
    """Scores of ``allocation: reconstruction`` (see ``ReconstructionCurvature``)."""

    def scores(self, weights: Tensors, curvature: Curvature, gradient: Tensors | None) -> Tensors:
        if not isinstance(curvature, ReconstructionCurvature):
            raise WfcoreError("the reconstruction scorer needs the curvature of a layer-wise "
                              "estimator with allocation: reconstruction")
        return curvature.marginal_scores(weights)
