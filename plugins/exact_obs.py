"""ExactOBS (OBC, Frantar & Alistarh 2022): per row of a layer, remove one weight at a time,
the one whose removal raises the layer's reconstruction error least, w_j^2 / [H^-1]_jj,
update the rest of the row with the OBS formula and downdate H^-1 (the row's inverse
Hessian without column j):

    w   <- w - H^-1[:, j] w_j / [H^-1]_jj
    H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / [H^-1]_jj

Ported from IST-DASLab/OBC ``trueobs.py``: ``TrueOBS.prepare_unstr`` (the greedy path of
every row, batched over a chunk of rows with one H^-1 copy each) and ``prune_blocked``
(the layer's zeros spread over its rows by the path losses: the smallest losses of the
whole layer win, a row taking as many steps as it has losses among them), and
``TrueOBS.nmprune`` for N:M (a group that holds its zeros takes no more). Instead of
OBC's traces of every row at every step, the order of the path is kept and each row's
weights are rebuilt once by the joint OBS solution of its chosen set (the same point:
sequential OBS removals end where the joint solution is). Weights already pruned go
first, at no loss.
"""

from __future__ import annotations

import torch
from tqdm import tqdm
from wfcore.plugins.layer_hessian import (
    LayerResult,
    obs_with_mask,
    prepare,
    reconstruction_error,
)

from wfcore.progress import disabled


def greedy_path(W: torch.Tensor, Hinv: torch.Tensor, keep: torch.Tensor, steps: int,
                chunk: int, pattern: tuple[int, int] | None = None, show: bool = False,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, losses), each (rows, steps): the column each row removes at each step and
    the loss w_j^2 / (2 [H^-1]_jj) of that step (-inf for an already pruned weight; +inf
    once a row under ``pattern`` has no weight left to remove).

    ``pattern`` (n, m): at most m - n removals in each group of m consecutive columns.
    ``chunk``: rows processed together (each holds a (cols, cols) copy of H^-1).
    ``dtype``: of the path's arithmetic (OBC runs it in float32; the chosen set is then
    solved in float64 by ``obs_with_mask``).
    """
    W, Hinv = W.to(dtype), Hinv.to(dtype)
    rows, cols = W.shape
    order = torch.zeros(rows, steps, dtype=torch.long, device=W.device)
    losses = torch.full((rows, steps), float("inf"), dtype=dtype, device=W.device)
    for i1 in tqdm(range(0, rows, chunk), desc="exact_obs rows", leave=False,
                   disable=disabled(not show)):
        i2 = min(i1 + chunk, rows)
        count = i2 - i1
        w = W[i1:i2].clone()  # (c, cols)
        H_inv = Hinv.unsqueeze(0).repeat(count, 1, 1)  # (c, cols, cols)
        forced = ~keep[i1:i2]
        removed = torch.zeros_like(forced)
        full_groups = torch.zeros_like(forced)
        rng = torch.arange(count, device=W.device)
        for t in range(steps):
            diag = torch.diagonal(H_inv, dim1=1, dim2=2)
            scores = w ** 2 / diag
            scores[forced & ~removed] = float("-inf")
            scores[removed | full_groups] = float("inf")
            j = torch.argmin(scores, 1)
            best = scores[rng, j]
            active = best < float("inf")
            if not bool(active.any()):
                break
            order[i1:i2, t] = j
            losses[i1:i2, t] = torch.where(active, best / 2, float("inf"))
            row = H_inv[rng, j, :]  # (c, cols)
            d = diag[rng, j]
            step = torch.where(active, w[rng, j] / d, 0.0)
            w -= row * step.unsqueeze(1)
            removed[rng[active], j[active]] = True
            w[removed] = 0.0
            if pattern is not None:
                n, m = pattern
                groups = removed[:, :cols - cols % m].reshape(count, -1, m)
                done = groups.sum(-1, keepdim=True) >= m - n
                full_groups[:, :cols - cols % m] = done.expand_as(groups).reshape(count, -1)
                full_groups[:, cols - cols % m:] = True  # a tail shorter than m stays
            row = row * (active / torch.sqrt(d)).unsqueeze(1)
            H_inv.baddbmm_(row.unsqueeze(2), row.unsqueeze(1), alpha=-1)
    return order, losses


def select(order: torch.Tensor, losses: torch.Tensor, zeros: int) -> torch.Tensor:
    """(rows, cols) prune mask: the layer's ``zeros`` smallest path losses (OBC
    ``prune_blocked``), each row taking the first steps of its path, as many as it has
    losses among them."""
    rows, steps = losses.shape
    flat = torch.argsort(losses.reshape(-1), stable=True)[:zeros]
    per_row = torch.bincount(torch.div(flat, steps, rounding_mode="floor"), minlength=rows)
    return torch.arange(steps, device=losses.device).unsqueeze(0) < per_row.unsqueeze(1)


def path_error(losses: torch.Tensor, taken: torch.Tensor) -> float:
    """The error the path predicts for the taken steps (already pruned weights cost 0)."""
    return float(torch.where(taken, losses.clamp(min=0), 0.0).sum())


def scatter_taken(order: torch.Tensor, taken: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) bool: True at the columns of the taken steps of each row's path."""
    out = torch.zeros(order.shape[0], cols, dtype=torch.bool, device=order.device)
    rows = torch.arange(order.shape[0], device=order.device).unsqueeze(1).expand_as(order)
    out[rows[taken], order[taken]] = True
    return out


def prune(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, zeros: int, damp: float,
          pattern: tuple[int, int] | None = None, chunk: int = 64,
          show: bool = False, dtype: torch.dtype = torch.float64) -> LayerResult:
    """ExactOBS on one (rows, cols) matrix to exactly ``zeros`` zeros (or, with ``pattern``
    (n, m), to n of every m consecutive columns kept). ``keep``: the current mask."""
    W0 = W.double()
    W, _, Hinv = prepare(W0, H, damp)
    rows, cols = W.shape
    if pattern is None:
        steps = min(cols, zeros)
    else:
        n, m = pattern
        steps = min(cols, (cols // m) * (m - n) + int((~keep).sum(1).max()))
    if steps == 0:
        return LayerResult(W0.clone(), keep.clone(), 0.0)
    order, losses = greedy_path(W, Hinv, keep, steps, chunk, pattern, show, dtype)
    taken = select(order, losses, zeros) if pattern is None else losses < float("inf")
    prune_mask = scatter_taken(order, taken, cols) | ~keep
    weights = obs_with_mask(W, Hinv, prune_mask)
    return LayerResult(weights, ~prune_mask, reconstruction_error(W0, weights, H))


def error_profile(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float,
                  levels: list[int], chunk: int = 64,
                  dtype: torch.dtype = torch.float64) -> list[float]:
    """The predicted reconstruction error at each count of zeros in ``levels``, from one
    greedy path (what OBC's database stores per sparsity level)."""
    W, _, Hinv = prepare(W.double(), H, damp)
    steps = min(W.shape[1], max(levels))
    if steps == 0:
        return [0.0 for _ in levels]
    order, losses = greedy_path(W, Hinv, keep, steps, chunk, dtype=dtype)
    return [path_error(losses, select(order, losses, z)) for z in levels]
