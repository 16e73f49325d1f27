"""Wanda (Sun et al. 2024): score |W_ij| * ||X_j||_2, the weight times the norm of its input
feature over the calibration samples, and prune the lowest of each output row (the
comparison group); no weight update.

Ported from locuslab/wanda ``lib/prune.py``, ``prune_wanda``: ``W_metric = |W| *
sqrt(scaler_row)`` with ``scaler_row`` the mean squared input of each column
(``lib/layerwrapper.py``), here diag(H) / 2 of H = 2 X X^T / n (the square root of a
constant factor changes no order); unstructured: each row prunes its lowest
``int(cols * sparsity)``; N:M: the m - n lowest of every m consecutive columns. To hold
the layer's count exactly when rows cannot share it evenly, the remainder goes to the
rows whose next weight scores lowest (a row's k-th weight before any row's (k+1)-th).
"""

from __future__ import annotations

import torch
from wfcore.plugins.layer_hessian import LayerResult, reconstruction_error


def scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(rows, cols): |W| * ||X_j|| (up to a constant factor)."""
    return W.double().abs() * torch.sqrt(torch.diagonal(H.double()).clamp(min=0) / 2).unsqueeze(0)


def prune(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, zeros: int,
          pattern: tuple[int, int] | None = None) -> LayerResult:
    """Wanda on one (rows, cols) matrix to exactly ``zeros`` zeros (or, with ``pattern``
    (n, m), n kept of every m consecutive columns). ``keep``: the current mask."""
    W0 = W.double()
    S = scores(W0, H)
    S[~keep] = float("-inf")  # already pruned: first
    rows, cols = W.shape
    if pattern is not None:
        n, m = pattern
        full = cols - cols % m
        groups = S[:, :full].reshape(rows, -1, m)
        prune_groups = torch.zeros_like(groups, dtype=torch.bool)
        prune_groups.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
        prune_mask = ~keep
        prune_mask[:, :full] |= prune_groups.reshape(rows, full)
    else:
        sorted_s, idx = torch.sort(S, dim=1, stable=True)
        rank = torch.arange(cols, device=W.device).expand(rows, cols)
        pre = (~keep).sum(1, keepdim=True)
        eligible = rank >= pre
        # the lowest rank first (rows share the count evenly), the lowest score among equals
        by_score = torch.argsort(torch.where(eligible, sorted_s, float("inf")).reshape(-1),
                                 stable=True)
        by_rank = by_score[torch.argsort(torch.where(eligible, rank, cols).reshape(-1)[by_score],
                                         stable=True)]
        new = max(zeros - int(pre.sum()), 0)
        chosen = torch.zeros(rows * cols, dtype=torch.bool, device=W.device)
        chosen[by_rank[:new]] = True
        prune_sorted = chosen.reshape(rows, cols) | ~eligible
        prune_mask = torch.zeros_like(keep)
        prune_mask.scatter_(1, idx, prune_sorted)
    weights = torch.where(prune_mask, 0.0, W0)
    return LayerResult(weights, ~prune_mask, reconstruction_error(W0, weights, H))


def error_profile(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                  levels: list[int]) -> list[float]:
    """The reconstruction error at each count of zeros in ``levels``."""
    return [prune(W, H, keep, z).error for z in levels]
