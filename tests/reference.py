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
