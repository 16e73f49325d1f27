"""The update safeguard: keep each pruning step where the quadratic model holds.

An OBS update dw is the exact minimiser of the quadratic model of the loss, but the model
is only local: with a small damping the update may move the kept weights far, into a
region where the loss is nothing like the model (the joint update over-corrects at high
sparsity). The safeguard chooses the step length alpha of

    w(alpha) = mask * (w + alpha * dw)

by the loss on a calibration batch drawn once per run from the *training* split (never
the test set), among ``alphas``. alpha = 0 is the mask alone, the update ``none``, and it
is always among the candidates: the chosen step's calibration loss is never above that of
``none``. One more candidate is the mask of magnitude pruning to the same target, without
an update (``fallback``): where the scores themselves are worse than the weights'
magnitudes on the training data (MLPNet at 98% one-shot), the step falls back to it. It
costs one forward pass of the calibration batch per candidate (plus one at the current
weights), nothing that refits the curvature.

Each step's record: the damping the curvature used, alpha, and the predicted (quadratic
model: g^T d + d^T F d / 2 for the whole change d) and the actual loss increase on the
calibration batch. The calibration loss is the data set's loss against its labels. With
``fisher.labels: sampled`` (no labels), it is the cross-entropy against the model's own
predictions before the step, whose increase is the KL divergence from them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from wfcore.interfaces import Curvature, Loss, Tensors

log = logging.getLogger(__name__)


@dataclass
class CalibrationBatch:
    """Samples of the training split that score candidate updates."""

    x: torch.Tensor  # (k, *input)
    y: torch.Tensor | None  # (k,) data labels; None for unlabelled data
    indices: torch.Tensor  # (k,) their indices in the training split given


def calibration_batch(train: Dataset, size: int, seed: int,
                      device: torch.device | str = "cpu") -> CalibrationBatch:
    """``size`` samples of ``train`` (all of it if smaller), in a seeded random order."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    indices = order[:size]
    batch = default_collate([train[int(i)] for i in indices])
    if torch.is_tensor(batch):
        return CalibrationBatch(batch.to(device), None, indices)
    y = batch[1].to(device) if len(batch) > 1 else None
    return CalibrationBatch(batch[0].to(device), y, indices)


class Safeguard:
    """Chooses alpha for each update by the calibration loss (``choose``)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter],
                 batch: CalibrationBatch, *, alphas: list[float], enabled: bool = True,
                 fallback: bool = True, labels: str = "empirical", chunk: int = 256,
                 loss_fn: Loss | None = None):
        self.model = model
        self.params = params
        self.batch = batch
        # alpha = 0 (mask only) is always a candidate: the guarantee rests on it
        self.alphas = sorted({*alphas, 0.0}, reverse=True) if enabled else [1.0]
        self.enabled = enabled
        self.fallback = enabled and fallback  # also try magnitude pruning's mask
        self.use_labels = labels == "empirical" and batch.y is not None
        self.chunk = chunk
        self.loss_fn = loss_fn or F.cross_entropy  # the data set's loss (DataBundle.loss)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """(k, outputs) of the model at its current weights, in eval mode, float64."""
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.cat([self.model(x).double() for x in self.batch.x.split(self.chunk)])
        finally:
            self.model.train(was_training)

    def loss(self, teacher: torch.Tensor) -> float:
        """The calibration loss at the current weights (``teacher``: probabilities before)."""
        logits = self.logits()
        if self.use_labels:
            y = self.batch.y
            return float(self.loss_fn(logits, y.double() if y.is_floating_point() else y))
        return float(-(teacher * F.log_softmax(logits, -1)).sum(-1).mean())

    @torch.no_grad()
    def _set(self, weights: Tensors, update: Tensors | None, keep: Tensors | None,
             alpha: float = 0.0) -> None:
        """Weights <- keep * (weights + alpha * update); ``keep`` None: the weights as given."""
        for n, p in self.params.items():
            w = weights[n].to(device=p.device, dtype=torch.float64)
            if update is not None and alpha != 0.0:
                w = w + alpha * update[n].to(device=p.device, dtype=torch.float64)
            if keep is not None:
                w = w * keep[n].to(p.device)
            p.copy_(w.to(p.dtype))

    def choose(self, weights: Tensors, update: Tensors | None, keep: Tensors,
               curvature: Curvature, gradient: Tensors | None,
               magnitude_keep: Callable[[], Tensors] | None = None
               ) -> tuple[Tensors | None, Tensors, dict[str, Any]]:
        """(alpha * update, keep-masks, the step's record). The model's weights are left as
        they came.

        ``weights`` are the prunable weights before the step (the model holds them),
        ``update`` the scorer's change (None: mask only), ``keep`` the new keep-masks.
        ``magnitude_keep`` gives the keep-masks of magnitude pruning to the same target; with
        ``fallback`` they are tried without an update and chosen when their loss is lowest.
        """
        teacher = torch.softmax(self.logits(), -1)
        before = self.loss(teacher)
        masks = {"scores": keep}
        tried: list[dict[str, Any]] = []
        try:
            for alpha in self.alphas if update is not None else [0.0]:
                self._set(weights, update, keep, alpha)
                tried.append({"mask": "scores", "alpha": alpha,
                              "increase": self.loss(teacher) - before})
            if self.fallback and magnitude_keep is not None:
                masks["magnitude"] = magnitude_keep()
                self._set(weights, None, masks["magnitude"])
                tried.append({"mask": "magnitude", "alpha": 0.0,
                              "increase": self.loss(teacher) - before})
        finally:
            self._set(weights, None, None)
        # the first of equals (the longest step) wins; a non-finite loss never does
        best = min(tried, key=lambda t: t["increase"] if math.isfinite(t["increase"])
                   else math.inf)
        alpha, keep = best["alpha"], masks[best["mask"]]
        if alpha == 0.0:
            update = None  # the mask alone, exactly
        elif update is not None and alpha != 1.0:
            update = {n: alpha * u for n, u in update.items()}
        change = {}  # the whole change of the step: d = keep * (w + alpha * dw) - w
        for n, w in weights.items():
            moved = w.double() + (update[n].to(w.device).double() if update is not None else 0.0)
            change[n] = moved * keep[n].to(w.device) - w.double()
        predicted = curvature.quadratic(change)
        if predicted is not None and gradient is not None:
            predicted += sum(float((gradient[n].double().to(change[n].device) * change[n]).sum())
                             for n in change)
        record = {"damp": curvature.damping(), "alpha": alpha, "mask": best["mask"],
                  "predicted_increase": predicted, "actual_increase": best["increase"],
                  "calibration_loss": before, "tried": tried if len(tried) > 1 else []}
        log.info("safeguard: %s mask, alpha %s, loss increase %.4g (predicted %s) on %d "
                 "calibration samples", best["mask"], alpha, best["increase"],
                 "n/a" if predicted is None else f"{predicted:.4g}", len(self.batch.x))
        return update, keep, record


def magnitude_scores(weights: Tensors) -> Tensors:
    """w^2: the scores of magnitude pruning, for the safeguard's fallback mask."""
    return {n: w.double() ** 2 for n, w in weights.items()}
