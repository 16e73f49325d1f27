"""Scores and updates of coupled groups of weights (``structure.unit: channel``).

A group G (one channel with everything coupled to it) spans several layers, given as flat
coordinates of the prunable parameters. Its Optimal Brain Surgeon saliency is the loss
increase of zeroing w_G with every other weight free to compensate,

    rho_G = 1/2 w_G^T ([F^-1]_GG)^-1 w_G,

and removing a set Q (the union of the chosen groups) moves the rest by the joint OBS
update dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q (dw_Q = -w_Q exactly).

``DualFisher`` is WoodFisher's empirical Fisher F = damp*I + (1/m) G^T G over ALL
prunable coordinates at once (one block: a group couples coordinates of several layers,
which WoodFisher's per-layer blocks would cut apart). Dual form, as plugins/woodfisher/algebra.py:
K = G G^T + m*damp*I (m x m, Cholesky in float64), A = L^-1 G (m, d), so
F^-1 = (I - A^T A)/damp and [F^-1]_GG = (I - A_G^T A_G)/damp, solved as a b x b system
(b = |G| <= m) or through Woodbury as an m x m one, (I - A_G^T A_G)^-1
= I + A_G^T (I - A_G A_G^T)^-1 A_G. The joint update is ``BlockGroup.joint`` on that one
block (m x m solves from the live columns only).

``Diagonal`` curvatures (diagonal Fisher, and the identity of magnitude pruning) give the
exact group score 1/2 sum_q w_q^2 / [F^-1]_qq; with F = I that is 1/2 |w_G|^2, the group
L2 ranking. ``Taylor`` is the first-order group score (g_G . w_G)^2 (Molchanov et al.
2019, eq. 4, the group as one gate) and ``Random`` a seeded draw. Scores are one per
channel; all of them share ``GroupScorer``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch
from tqdm import tqdm

from wfcore.errors import WfcoreError
from wfcore.plugins.woodfisher.algebra import BlockGroup, cholesky_raising_damp, solve_spd

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2 ** 24  # (channels, m, b) gathered at once in DualFisher.saliencies


class GroupScorer(ABC):
    """Saliency of every channel of a group, and the update removing a set of weights.

    ``w`` is the (d,) flat vector of the prunable weights; ``channels`` is a list of
    index tensors, one per channel of a group (``channels.coordinates``).

    ``reads``: which weights of a group the score and the update take as removed. None:
    all of them (group L2 and the other baselines). ``("in",)``: the weights that read
    the channel (the next layers' input columns). Once nothing reads a channel it is gone
    whatever the weights that make it are, so this is the exact removal, and the right
    one for a curvature: a conv followed by BatchNorm is scale-invariant per output
    channel (F w_row ~ 0), so the quadratic model rates zeroing its rows as almost free.
    """

    reads: tuple[str, ...] | None = None

    @abstractmethod
    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        """(len(channels),) float64 scores; lower is removed first."""

    def update(self, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor | None:
        """(d,) the change of ``w`` removing the coordinates where ``removed`` (d,) holds
        (zeroing them is done by the caller); None = no compensation."""
        return None


class Precomputed(GroupScorer):
    """Scores computed before the step (e.g. Torch-Pruning's importances), one tensor per
    group in the order the step scores its groups (``structured.prunable_groups``); no
    update."""

    def __init__(self, scores: list[torch.Tensor]):
        self.scores, self.taken = list(scores), 0

    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        if self.taken >= len(self.scores) or self.scores[self.taken].numel() != len(channels):
            raise WfcoreError(f"precomputed group scores: group {self.taken} of the step does "
                              "not match the scores given (another model or order?)")
        self.taken += 1
        return self.scores[self.taken - 1].double()


class DualFisher(GroupScorer):
    """Group OBS with F = damp*I + (1/m) G^T G, G (m, d), in the dual form."""

    reads = ("in",)

    def __init__(self, G: torch.Tensor, damp: float):
        self.G = G.double()  # (m, d)
        m = self.G.shape[0]
        self.damp = torch.tensor([float(damp)], dtype=torch.float64, device=G.device)
        GGt = (self.G @ self.G.T)[None]  # (1, m, m)
        eye = torch.eye(m, dtype=torch.float64, device=G.device)
        L = cholesky_raising_damp(lambda d: GGt + m * d[:, None, None] * eye, self.damp,
                                  lambda _: "the structured Fisher")[0]
        self.A = torch.linalg.solve_triangular(L, self.G, upper=False)  # (m, d)

    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(channels), dtype=torch.float64)
        by_size: dict[int, list[int]] = {}
        for k, idx in enumerate(channels):
            by_size.setdefault(idx.numel(), []).append(k)
        w = w.double().to(self.A.device)
        for b, ks in by_size.items():
            if b == 0:
                continue
            step = max(1, CHUNK_ELEMENTS // (self.A.shape[0] * b))
            for s in range(0, len(ks), step):
                part = ks[s:s + step]
                idx = torch.stack([channels[k] for k in part]).to(self.A.device)  # (c, b)
                out[part] = self._rho(w[idx], self.A[:, idx].permute(1, 0, 2)).cpu()
        return out

    def _rho(self, w_G: torch.Tensor, A_G: torch.Tensor) -> torch.Tensor:
        """(c,) 1/2 w_G^T ([F^-1]_GG)^-1 w_G for w_G (c, b) and A_G (c, m, b)."""
        c, m, b = A_G.shape
        damp = float(self.damp)
        if b <= m:  # S = (I - A_G^T A_G) / damp, b x b
            S = torch.eye(b, dtype=A_G.dtype, device=A_G.device) - A_G.transpose(1, 2) @ A_G
            x = solve_spd(S, w_G[..., None])[..., 0] * damp  # S is SPD: F^-1 is
            return 0.5 * (w_G * x).sum(1)
        u = A_G @ w_G[..., None]  # (c, m, 1)
        M = torch.eye(m, dtype=A_G.dtype, device=A_G.device) - A_G @ A_G.transpose(1, 2)
        y = solve_spd(M, u)
        return 0.5 * damp * ((w_G * w_G).sum(1) + (u * y).sum((1, 2)))

    def update(self, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        block = BlockGroup(self.G[None], self.damp, "dual", lambda _: "the structured Fisher")
        dw, increase = block.joint(removed.to(self.G.device)[None],
                                   w.double().to(self.G.device)[None])
        log.info("structured: predicted loss increase of the joint OBS update %.4g",
                 float(increase))
        return dw[0]


class Diagonal(GroupScorer):
    """1/2 sum_q w_q^2 / [F^-1]_qq: exact for a diagonal curvature (no compensation)."""

    def __init__(self, inverse_diagonal: torch.Tensor | None = None):
        self.inv = inverse_diagonal  # (d,); None = the identity (magnitude)

    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        if self.inv is None:
            return 0.5 * sums(lambda idx: w[idx].double() ** 2, channels)
        return 0.5 * sums(lambda idx: w[idx].double() ** 2 / self.inv[idx].double(), channels)


class Taylor(GroupScorer):
    """(g_G . w_G)^2: the first-order loss change of the channel's gate, squared."""

    def __init__(self, gradient: torch.Tensor):
        self.g = gradient.double()  # (d,) the mean gradient

    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        return sums(lambda idx: self.g[idx] * w[idx].double(), channels) ** 2


def sums(values, channels: list[torch.Tensor]) -> torch.Tensor:
    """(len(channels),) the sum of ``values(index)`` (per-coordinate terms of the flat
    coordinates ``index``) over each channel's coordinates."""
    if not channels:
        return torch.zeros(0, dtype=torch.float64)
    if len({idx.numel() for idx in channels}) == 1:
        return values(torch.stack(channels)).sum(1)
    return torch.stack([values(idx).sum() for idx in channels])


class Random(GroupScorer):
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def saliencies(self, w: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        return torch.rand(len(channels), generator=self.generator, dtype=torch.float64)


def score_groups(scorer: GroupScorer, w: torch.Tensor,
                 coordinates: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Every group's channel saliencies (one progress bar over the groups)."""
    return [scorer.saliencies(w, channels)
            for channels in tqdm(coordinates, desc="score channels", leave=False)]
