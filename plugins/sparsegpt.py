"""SparseGPT (Frantar & Alistarh 2023): one pass over the columns of a layer, in blocks;
the mask of a block is chosen when the block is reached, by w^2 / [U]_jj^2 with U the
upper Cholesky factor of H^-1 (the weights already updated by the blocks before it), and
each column's pruning error is spread over the columns after it with U's row: lazily
inside the block, then once for all later columns.

Ported from IST-DASLab/sparsegpt ``sparsegpt.py``, ``SparseGPT.fasterprune``, N:M branch
included (``prunen``/``prunem``: the m - n lowest of every m columns, chosen when the
group's first column is reached). One change keeps the layer's sparsity exact: the
reference prunes each block to ``int(numel * sparsity)`` by a threshold (ties may add
zeros); here a block prunes exactly its share of the layer's new zeros (shares in
proportion to its kept weights, rounded cumulatively), the lowest scores first. Weights
already pruned stay pruned. ``block_size`` None takes the whole layer as one block
(the mask then sees every column's score before any update).
"""

from __future__ import annotations

import torch
from wfcore.plugins.layer_hessian import LayerResult, prepare, reconstruction_error, split_counts


def prune(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, zeros: int, damp: float,
          block_size: int | None = 128, pattern: tuple[int, int] | None = None
          ) -> LayerResult:
    """SparseGPT on one (rows, cols) matrix to exactly ``zeros`` zeros (or, with
    ``pattern`` (n, m), n kept of every m consecutive columns). ``keep``: the current mask."""
    W0 = W.double()
    W, _, Hinv = prepare(W0, H, damp)
    U = torch.linalg.cholesky(Hinv, upper=True)  # fasterprune's Hinv
    rows, cols = W.shape
    block = cols if block_size is None else block_size
    if pattern is not None and block % pattern[1]:
        raise ValueError(f"block size {block} is not a multiple of the pattern's m "
                         f"{pattern[1]}")
    pre = ~keep
    starts = list(range(0, cols, block))
    kept_per_block = [int(keep[:, i1:i1 + block].sum()) for i1 in starts]
    new_per_block = split_counts(max(zeros - int(pre.sum()), 0), kept_per_block)
    prune_mask = torch.zeros_like(keep)
    for i1, new in zip(starts, new_per_block, strict=True):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()  # (rows, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        if pattern is None:
            score = W1 ** 2 / d1.unsqueeze(0) ** 2
            score[pre[:, i1:i2]] = float("-inf")
            mask1 = torch.zeros_like(pre[:, i1:i2])
            chosen = torch.argsort(score.reshape(-1), stable=True)[:new + int(pre[:, i1:i2].sum())]
            mask1.view(-1)[chosen] = True
        else:
            mask1 = pre[:, i1:i2].clone()
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0 and i + pattern[1] <= i2 - i1:
                n, m = pattern
                score = W1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2
                score[pre[:, i1 + i:i1 + i + m]] = float("-inf")
                low = torch.topk(score, m - n, dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], 0.0, w)
            Q1[:, i] = q
            err1 = (w - q) / U1[i, i]
            W1[:, i:] -= err1.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        prune_mask[:, i1:i2] = mask1
    W[prune_mask] = 0.0
    return LayerResult(W, ~prune_mask, reconstruction_error(W0, W, H))


def error_profile(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float,
                  levels: list[int], block_size: int | None = 128) -> list[float]:
    """The reconstruction error at each count of zeros in ``levels`` (one pass each)."""
    return [prune(W, H, keep, z, damp, block_size).error for z in levels]
