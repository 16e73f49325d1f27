"""Brute-force float64 references for the fast paths (small sizes only).

Everything here forms F densely and inverts it with ``torch.linalg.inv``; OBS updates are
written straight from their definitions, single weights one at a time.
"""

from __future__ import annotations

import itertools

import torch


def fisher(G: torch.Tensor, damp: float) -> torch.Tensor:
    """(B, B): damp*I + G^T G / m for G (m, B)."""
    G = G.double()
    return damp * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / G.shape[0]


def block_fisher(G: torch.Tensor, damp: float, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """(d, d): block-diagonal F from G (m, d), blocks as (start, size)."""
    d = G.shape[1]
    F = torch.zeros(d, d, dtype=torch.float64)
    covered = 0
    for start, size in blocks:
        F[start:start + size, start:start + size] = fisher(G[:, start:start + size], damp)
        covered += size
    assert covered == d, "blocks must cover every weight"
    return F


def inverse(F: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(F)


def single_obs_update(F_inv: torch.Tensor, w: torch.Tensor, q: int) -> torch.Tensor:
    """The OBS change removing weight q alone: -F^-1 e_q w_q / [F^-1]_qq."""
    return -F_inv[:, q] * w[q] / F_inv[q, q]


def single_obs_increase(F_inv: torch.Tensor, w: torch.Tensor, q: int) -> torch.Tensor:
    """The loss increase of removing weight q alone: w_q^2 / (2 [F^-1]_qq)."""
    return w[q] ** 2 / (2 * F_inv[q, q])


def independent_update(F_inv: torch.Tensor, w: torch.Tensor, Q: list[int]) -> torch.Tensor:
    """The sum of the single-weight OBS updates, one weight at a time."""
    dw = torch.zeros_like(w, dtype=torch.float64)
    for q in Q:
        dw += single_obs_update(F_inv, w.double(), q)
    return dw


def joint_update(F_inv: torch.Tensor, w: torch.Tensor, Q: list[int]) -> torch.Tensor:
    """-F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q, with E_Q the columns of the identity at Q."""
    E = torch.eye(F_inv.shape[0], dtype=torch.float64)[:, Q]  # (d, q)
    S = E.T @ F_inv @ E
    return -F_inv @ E @ torch.linalg.inv(S) @ w.double()[Q]


def joint_increase(F_inv: torch.Tensor, w: torch.Tensor, Q: list[int]) -> torch.Tensor:
    """w_Q^T (E_Q^T F^-1 E_Q)^-1 w_Q / 2."""
    S = F_inv[Q][:, Q]
    w_Q = w.double()[Q]
    return 0.5 * w_Q @ torch.linalg.inv(S) @ w_Q


def quadratic(F: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """dw^T F dw / 2."""
    return 0.5 * dw.double() @ F @ dw.double()


def recursive_inverse(G: torch.Tensor, damp: float) -> torch.Tensor:
    """The original WoodFisher recursion, one rank-1 Woodbury update per gradient."""
    G = G.double()
    m, B = G.shape
    F_inv = torch.eye(B, dtype=torch.float64) / damp
    for g in G:
        v = F_inv @ g
        F_inv = F_inv - torch.outer(v, v) / (m + g @ v)
    return F_inv


def block_groups(shapes: dict[str, tuple[int, ...]], block: int) -> list[list[int]]:
    """The flat indices of every ``structure.block`` group, one weight at a time: weight
    (o, c, *k) joins group (o, *k, c // block); 1-D parameters make groups of one."""
    groups: dict[tuple, list[int]] = {}
    offset = 0
    for n, shape in shapes.items():
        flat = torch.arange(torch.Size(shape).numel()).view(shape) + offset
        for index in itertools.product(*map(range, shape)):
            key = (n, index) if len(shape) < 2 else (n, index[0], *index[2:], index[1] // block)
            groups.setdefault(key, []).append(int(flat[index]))
        offset += flat.numel()
    return list(groups.values())


# -- layer-wise methods: one row, one weight at a time, explicit inverses --------------------

def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I (sparsegpt.py ``percdamp``)."""
    H = H.double()
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)


def greedy_obs_row(w: torch.Tensor, H: torch.Tensor, steps: int
                   ) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """The greedy OBS path of one row: at each step the kept weight q with the least
    w_q^2 / (2 [H_K^-1]_qq), H_K^-1 = inv(H[K, K]) of the kept set K (an explicit inverse
    every step); the others move by -H_K^-1[:, q] w_q / [H_K^-1]_qq. Returns the order,
    the losses and the row after each step (index 0: before any)."""
    w = w.double().clone()
    kept = list(range(w.numel()))
    order, losses, rows = [], [], [w.clone()]
    for _ in range(steps):
        Hinv = torch.linalg.inv(H[kept][:, kept])
        scores = w[kept] ** 2 / torch.diagonal(Hinv)
        k = int(torch.argmin(scores))
        q = kept[k]
        losses.append(float(scores[k]) / 2)
        w[kept] -= Hinv[:, k] * w[q] / Hinv[k, k]
        w[q] = 0.0
        kept.pop(k)
        order.append(q)
        rows.append(w.clone())
    return order, losses, rows


def exact_obs_layer(W: torch.Tensor, H: torch.Tensor, zeros: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep) of greedy OBS on every row, the layer's ``zeros`` spread over the
    rows by the path losses (the smallest of the layer win; OBC ``prune_blocked``)."""
    rows, cols = W.shape
    paths = [greedy_obs_row(W[i], H, min(cols, zeros)) for i in range(rows)]
    entries = sorted((loss, i * cols + t) for i, p in enumerate(paths)
                     for t, loss in enumerate(p[1]))[:zeros]
    per_row = [0] * rows
    for _, flat in entries:
        per_row[flat // cols] += 1
    out = torch.stack([paths[i][2][per_row[i]] for i in range(rows)])
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        keep[i, paths[i][0][:per_row[i]]] = False
    return out, keep


def sparsegpt_layer(W: torch.Tensor, H: torch.Tensor, sparsity: float, block: int,
                    nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's formulas with explicit inverses and no lazy batching: column i is
    pruned or kept with H_i^-1 = inv(H[i:, i:]), and its error (w_i - q_i) / [H_i^-1]_00
    moves every later column by -err * H_i^-1[0, 1:]. A block's mask is the
    ``sparsity`` lowest w_j^2 / [H_j^-1]_00 over the block when it is reached; N:M: the
    m - n lowest of each group of m when its first column is reached."""
    W = W.double().clone()
    rows, cols = W.shape
    inv = [torch.linalg.inv(H[i:, i:]) for i in range(cols)]
    diag = torch.tensor([float(inv[i][0, 0]) for i in range(cols)], dtype=torch.float64)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if nm is None and i % block == 0:
            score = W[:, i:i + block] ** 2 / diag[i:i + block]
            k = round(score.numel() * sparsity)
            chosen = torch.argsort(score.reshape(-1), stable=True)[:k]
            sub = torch.zeros(score.numel(), dtype=torch.bool)
            sub[chosen] = True
            prune[:, i:i + block] = sub.reshape(score.shape)
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            score = W[:, i:i + m] ** 2 / diag[i:i + m]
            low = torch.topk(score, m - n, dim=1, largest=False).indices
            prune[:, i:i + m].scatter_(1, low, True)
        q = torch.where(prune[:, i], 0.0, W[:, i])
        err = (W[:, i] - q) / inv[i][0, 0]
        W[:, i:] -= err.unsqueeze(1) * inv[i][0].unsqueeze(0)
        W[:, i] = q
    return W, ~prune


def wanda_layer(W: torch.Tensor, X: torch.Tensor, sparsity: float) -> torch.Tensor:
    """locuslab/wanda ``prune_wanda``: |W| * ||X_j||_2 (X: (n, cols) inputs), each row's
    lowest ``int(cols * sparsity)`` set to zero."""
    metric = W.double().abs() * X.double().norm(dim=0).unsqueeze(0)
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(W.shape[1] * sparsity)]
    mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
    return torch.where(mask, 0.0, W.double())
