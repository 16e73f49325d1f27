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

It pays for itself (issue: 80 s of safeguard against 8.6 s of pruning on a small ViT):

- nothing to decide, nothing run: an update that moves no kept weight (magnitude's
  identity curvature, ``random``) is no update, and a baseline (``baseline`` of the
  estimator or scorer: ``magnitude``, ``random``) never takes another method's mask, so
  such a step runs no forward pass at all;
- candidates are first compared on ``screen`` samples; only those within 3 standard
  errors of the best (the paired difference of their losses over chunks of samples) are
  compared on all of them;
- with ``stats`` (``wfcore.run.batchnorm.RunningStats``), the running statistics are
  re-estimated for every candidate before it is judged, and put back afterwards.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wfcore.interfaces import Curvature, Loss, Tensors
from wfcore.run.batchnorm import RunningStats
from wfcore.run.calibration import CalibrationBatch, calibration_batch  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

SCREEN_CHUNK = 32  # samples per chunk of the screening's paired standard error
SCREEN_SIGMAS = 3.0  # a candidate this many standard errors above the best is dropped
# finalists whose screened losses differ by less than this share of the loss before the
# step are not told apart on all the samples: any of them is as good (the best is taken)
SCREEN_RTOL = 1e-3


class Safeguard:
    """Chooses alpha for each update by the calibration loss (``choose``)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter],
                 batch: CalibrationBatch, *, alphas: list[float], enabled: bool = True,
                 fallback: bool = True, labels: str = "empirical", chunk: int = 256,
                 loss_fn: Loss | None = None, screen: int = 0,
                 stats: RunningStats | None = None):
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
        self.screen = screen  # samples of the first comparison (0: all of them)
        self.stats = stats  # running statistics re-estimated for each candidate

    @torch.no_grad()
    def logits(self, start: int = 0, upto: int | None = None) -> torch.Tensor:
        """(k, outputs) of the model at its current weights, in eval mode, float64, on the
        samples ``start:upto`` (all: 0, None)."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = self.batch.x[start:upto]
            return torch.cat([self.model(c).double() for c in x.split(self.chunk)])
        finally:
            self.model.train(was_training)

    def chunk_losses(self, teacher: torch.Tensor, start: int = 0,
                     upto: int | None = None) -> torch.Tensor:
        """(chunks,) the calibration loss of each chunk of ``SCREEN_CHUNK`` samples among
        the samples ``start:upto`` (``teacher``: probabilities before the step; ``start``
        a multiple of ``SCREEN_CHUNK``)."""
        logits = self.logits(start, upto)
        out = []
        for offset in range(0, len(logits), SCREEN_CHUNK):
            part = slice(offset, offset + SCREEN_CHUNK)
            at = slice(start + offset, start + offset + SCREEN_CHUNK)  # in the whole batch
            if self.use_labels and self.batch.y is not None:
                y = self.batch.y[at]
                out.append(float(self.loss_fn(logits[part],
                                              y.double() if y.is_floating_point() else y)))
            else:
                out.append(float(-(teacher[at] * F.log_softmax(logits[part], -1))
                                 .sum(-1).mean()))
        return torch.tensor(out, dtype=torch.float64)

    @staticmethod
    def mean_loss(losses: torch.Tensor, samples: int) -> float:
        """The mean over ``samples`` samples of their chunk losses (the last chunk may be
        smaller)."""
        sizes = torch.full_like(losses, SCREEN_CHUNK)
        sizes[-1] = samples - SCREEN_CHUNK * (len(losses) - 1)
        return float((losses * sizes).sum() / samples)

    def loss(self, teacher: torch.Tensor) -> float:
        """The calibration loss at the current weights (``teacher``: probabilities before)."""
        return self.mean_loss(self.chunk_losses(teacher), len(self.batch.x))

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
        """(alpha * update, keep-masks, the step's record). The model's weights (and
        running statistics) are left as they came.

        ``weights`` are the prunable weights before the step (the model holds them),
        ``update`` the scorer's change (None: mask only), ``keep`` the new keep-masks.
        ``magnitude_keep`` gives the keep-masks of magnitude pruning to the same target; with
        ``fallback`` they are tried without an update and chosen when their loss is lowest
        (None: no fallback for this step, e.g. a baseline's own mask).
        """
        if update is not None and moves_nothing(update, keep):
            update = None  # it only zeroes the pruned weights: the mask alone does that
        candidates = [("scores", a) for a in (self.alphas if update is not None else [0.0])]
        if self.fallback and magnitude_keep is not None:
            candidates.append(("magnitude", 0.0))
        if len(candidates) == 1:  # nothing to decide: no forward pass
            return update, keep, self.record(weights, update, keep, curvature, gradient,
                                             {"mask": "scores", "alpha": candidates[0][1],
                                              "increase": None}, None, [], "nothing to choose")
        masks = {"scores": keep}
        if self.fallback and magnitude_keep is not None:  # a "magnitude" candidate
            masks["magnitude"] = magnitude_keep()
        k = len(self.batch.x)
        # the screening's samples: whole chunks, so that the rest continues them
        first = max(SCREEN_CHUNK, self.screen - self.screen % SCREEN_CHUNK)
        first = first if 0 < self.screen and first < k else k
        kept_stats = self.stats.state() if self.stats is not None else None
        states: dict[int, Any] = {}

        def judge(i: int, start: int = 0, upto: int | None = None) -> torch.Tensor:
            mask, alpha = candidates[i]
            self._set(weights, update if mask == "scores" else None, masks[mask], alpha)
            if self.stats is not None:
                if i in states:
                    self.stats.restore(states[i])
                else:
                    self.stats.refresh()
                    states[i] = self.stats.state()
            return self.chunk_losses(teacher, start, upto)

        try:
            teacher = torch.softmax(self.logits(), -1)
            before = self.chunk_losses(teacher)  # (chunks,)
            losses = {i: judge(i, 0, first) for i in range(len(candidates))}
            samples = dict.fromkeys(losses, first)
            finalists = list(losses)
            if first < k:
                finalists = close_to_best(losses)
                means = [float(losses[i].mean()) for i in finalists]
                if max(means) - min(means) > SCREEN_RTOL * abs(float(before[:len(losses[0])]
                                                                     .mean())):
                    for i in finalists:  # the rest of the samples, after the screened ones
                        losses[i], samples[i] = torch.cat([losses[i], judge(i, first)]), k
        finally:
            self._set(weights, None, None)
            if kept_stats is not None and self.stats is not None:
                self.stats.restore(kept_stats)
        tried: list[dict[str, Any]] = []
        for i, (mask, alpha) in enumerate(candidates):
            n = samples[i]
            increase = (self.mean_loss(losses[i], n)
                        - self.mean_loss(before[:len(losses[i])], n))
            tried.append({"mask": mask, "alpha": alpha, "increase": increase,
                          "samples": samples[i]})
        # the first of equals (the longest step) wins; a non-finite loss never does
        best = min((tried[i] for i in finalists),
                   key=lambda t: t["increase"] if math.isfinite(t["increase"]) else math.inf)
        keep = masks[best["mask"]]
        if best["mask"] != "scores":
            update = None
        elif best["alpha"] == 0.0:
            update = None  # the mask alone, exactly
        elif update is not None and best["alpha"] != 1.0:
            update = {n: best["alpha"] * u for n, u in update.items()}
        record = self.record(weights, update, keep, curvature, gradient, best,
                             self.mean_loss(before, k), tried, None)
        record["forward_samples"] = k + first * len(tried) + sum(
            k - first for t in tried if t["samples"] > first)
        return update, keep, record

    def record(self, weights: Tensors, update: Tensors | None, keep: Tensors,
               curvature: Curvature, gradient: Tensors | None, best: dict[str, Any],
               before: float | None, tried: list[dict[str, Any]],
               skipped: str | None) -> dict[str, Any]:
        """The step's record: damp, the mask and alpha chosen, the predicted (quadratic
        model) and the actual loss increase, every candidate tried."""
        # the whole change of the step: d = keep * (w + alpha * dw) - w, written as
        # alpha * dw where kept and -w where pruned (no w + dw - w rounding: the change of
        # an update taken whole equals it value for value)
        change = {}
        for n, w in weights.items():
            moved = (update[n].to(w.device).double() if update is not None
                     else torch.zeros_like(w, dtype=torch.float64))
            change[n] = torch.where(keep[n].to(w.device), moved, -w.double())
        predicted = curvature.quadratic(change)
        if predicted is not None and gradient is not None:
            predicted += sum(float((gradient[n].double().to(change[n].device) * change[n]).sum())
                             for n in change)
        record = {"damp": curvature.damping(), "alpha": best["alpha"], "mask": best["mask"],
                  "predicted_increase": predicted, "actual_increase": best["increase"],
                  "calibration_loss": before, "tried": tried if len(tried) > 1 else []}
        if skipped:
            record["skipped"] = skipped
            log.info("safeguard: skipped (%s)", skipped)
            return record
        log.info("safeguard: %s mask, alpha %s, loss increase %.4g (predicted %s) on %d "
                 "calibration samples", best["mask"], best["alpha"], best["increase"],
                 "n/a" if predicted is None else f"{predicted:.4g}", best["samples"])
        return record


def moves_nothing(update: Tensors, keep: Tensors) -> bool:
    """Whether ``update`` is zero on every kept weight (it only zeroes pruned ones)."""
    return all(not bool((u.to(keep[n].device)[keep[n]] != 0).any()) for n, u in update.items())


def close_to_best(losses: dict[int, torch.Tensor]) -> list[int]:
    """The candidates whose chunk losses are within ``SCREEN_SIGMAS`` standard errors of
    the best's (the paired difference over the same chunks), in their order. A non-finite
    candidate is never kept; if all are, the first is."""
    finite = [i for i, v in losses.items() if bool(torch.isfinite(v).all())]
    if not finite:
        return [next(iter(losses))]
    best = min(finite, key=lambda i: float(losses[i].mean()))
    out = []
    for i in finite:
        diff = losses[i] - losses[best]  # (chunks,)
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
        if float(diff.mean()) <= SCREEN_SIGMAS * se:
            out.append(i)
    return out


def magnitude_scores(weights: Tensors) -> Tensors:
    """w^2: the scores of magnitude pruning, for the safeguard's fallback mask."""
    return {n: w.double() ** 2 for n, w in weights.items()}
