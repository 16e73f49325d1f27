"""``search`` of ``allocation: reconstruction``: the per-layer counts chosen by the
calibration loss of the pruned model, as OBC's SPDY-style search does (Frantar & Alistarh
2022, IST-DASLab/OBC ``spdy.py``: per-layer sensitivity coefficients searched by the loss
of the model stitched from the database's pruned layers).

The reconstruction curves alone minimise the sum of the layers' relative errors, every
layer weighted alike; how much a layer's error costs the model's loss is not in them. Here
each layer's curve is weighted by a coefficient exp(t_l); for given coefficients, one
threshold over the weighted hull slopes gives the per-layer counts for the target (as the
global allocator does with t = 0). A candidate is scored by the calibration loss of the
model whose layers hold the database's weights at those counts (each layer pruned on the
dense model's inputs, no sequential pass), and a coordinate search over the t_l (steps of
2, 1, 0.5, 0.25 in log scale, up to ``budget`` candidates, the allocator's counts first)
keeps the best. The chosen counts are then pruned layer after layer as usual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from wfcore.plugins.exact_obs import greedy_path, path_error, scatter_taken, select
from wfcore.plugins.layer_allocation import lower_hull
from wfcore.plugins.layer_hessian import obs_solve, prepare

log = logging.getLogger(__name__)

STEPS = (2.0, 1.0, 0.5, 0.25)


class LevelDatabase:
    """One part's results on the dense model's inputs: its error at counts of zeros and
    its pruned weights at a count (memoised). ``prune`` (W, H, keep, zeros) -> weights
    and ``profile`` (W, H, keep, levels) -> errors are the method's."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                 prune: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
                 profile: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int]],
                                   list[float]]):
        self.W, self.H, self.keep = W, H, keep
        self._prune, self._profile = prune, profile
        self._weights: dict[int, torch.Tensor] = {}

    def errors(self, levels: list[int]) -> list[float]:
        return self._profile(self.W, self.H, self.keep, levels)

    def weights(self, zeros: int) -> torch.Tensor:
        if zeros not in self._weights:
            self._weights[zeros] = self.compute(zeros)
        return self._weights[zeros]

    def compute(self, zeros: int) -> torch.Tensor:
        return self._prune(self.W, self.H, self.keep, zeros)

    def step_losses(self) -> torch.Tensor | None:
        """The error increments at every count, where the method gives them."""
        return None


class PathDatabase(LevelDatabase):
    """ExactOBS's database: one greedy path per part (OBC's), read at any count: the
    errors by its losses, the weights by the OBS solution of the path's first steps."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float,
                 chunk: int, dtype: torch.dtype,
                 prune: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]):
        super().__init__(W, H, keep, prune, lambda *a: [])
        self.Wp, self.Hd, self.Hinv = prepare(W, H, damp)
        self.chunk, self.dtype = chunk, dtype
        self.path: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reach = 0  # the largest count the path covers

    def errors(self, levels: list[int]) -> list[float]:
        if not levels:
            return []
        steps = min(self.W.shape[1], max(levels))
        order, losses = greedy_path(self.Wp, self.Hinv, self.keep, steps, self.chunk,
                                    dtype=self.dtype)
        self.path, self.reach = (order, losses), max(levels)
        return [path_error(losses, select(order, losses, z)) for z in levels]

    def step_losses(self) -> torch.Tensor | None:
        """The path's losses of the further zeros, smallest first: the increments of the
        layer's error at every count (None before ``errors``)."""
        if self.path is None:
            return None
        losses = self.path[1].reshape(-1).double()
        return torch.sort(losses[losses > float("-inf")].clamp(min=0)).values.cpu()

    def compute(self, zeros: int) -> torch.Tensor:
        if self.path is None or zeros > self.reach:
            return super().compute(zeros)
        order, losses = self.path
        prune = scatter_taken(order, select(order, losses, zeros), self.W.shape[1]) | ~self.keep
        return obs_solve(self.Wp, self.Hd, self.Hinv, prune)


def rank_slopes(zeros: list[float], errors: list[float], numel: int, now: int) -> torch.Tensor:
    """(numel - now,): the slope of the curve's lower convex hull at each further zero
    (the now+1-th, ..., the numel-th), non-decreasing."""
    hull = lower_hull(zeros, errors)
    count = torch.arange(now + 1, numel + 1, dtype=torch.float64)
    out = torch.full_like(count, math.inf)
    for (z0, e0), (z1, e1) in zip(hull, hull[1:], strict=False):
        out[(count > z0) & (count <= z1)] = (e1 - e0) / max(z1 - z0, 1e-12)
    return out


def fine_slopes(losses: list[torch.Tensor], energy: float, numel: int, now: int
                ) -> torch.Tensor:
    """(numel - now,): the error increments of a layer's further zeros at every count
    (its parts' path losses merged, smallest first) over its energy; +inf past the
    paths' reach. Sorted, so their running sum, the curve, is convex."""
    merged = torch.sort(torch.cat(losses)).values / (energy if energy > 0 else 1.0)
    out = torch.full((numel - now,), math.inf, dtype=torch.float64)
    out[:min(len(merged), len(out))] = merged[:len(out)]
    return out


def counts_for(slopes: dict[str, torch.Tensor], now: dict[str, int], caps: dict[str, int],
               total: int, t: dict[str, float]) -> dict[str, int]:
    """Per-layer counts (``total`` zeros in all): the smallest weighted slopes
    exp(t_l) * slope, a layer taking no more than its cap."""
    names = list(slopes)
    scaled = []
    for n in names:
        s = slopes[n] * math.exp(t[n])
        s[caps[n] - now[n]:] = math.inf
        scaled.append(s)
    flat = torch.cat(scaled)
    extra = total - sum(now.values())
    taken = torch.zeros(len(flat), dtype=torch.bool)
    taken[torch.argsort(flat, stable=True)[:extra]] = True
    out, start = {}, 0
    for n, s in zip(names, scaled, strict=True):
        out[n] = now[n] + int(taken[start:start + len(s)].sum())
        start += len(s)
    return out


def search(slopes: dict[str, torch.Tensor], now: dict[str, int], caps: dict[str, int],
           base: dict[str, int], evaluate: Callable[[dict[str, int]], float], budget: int
           ) -> tuple[dict[str, int], list[tuple[dict[str, int], float]]]:
    """The counts of least ``evaluate`` (the calibration loss) among the allocator's
    ``base`` and those of a coordinate search over the layers' log-coefficients, at most
    ``budget`` candidates scored. Returns (best counts, every (counts, loss) scored)."""
    seen: dict[tuple[int, ...], float] = {}
    names = list(slopes)
    total = sum(base.values())

    def score(counts: dict[str, int]) -> float | None:
        key = tuple(counts[n] for n in names)
        if key in seen:
            return seen[key]
        if len(seen) >= budget:
            return None
        seen[key] = evaluate(counts)
        return seen[key]

    best, best_loss = dict(base), score(base)
    assert best_loss is not None
    t = {n: 0.0 for n in names}
    first = counts_for(slopes, now, caps, total, t)
    if (loss := score(first)) is not None and loss < best_loss:
        best, best_loss = first, loss
    for step in STEPS:
        improved = True
        while improved and len(seen) < budget:
            improved = False
            for n in names:
                for sign in (1.0, -1.0):
                    trial = {**t, n: t[n] + sign * step}
                    counts = counts_for(slopes, now, caps, total, trial)
                    loss = score(counts)
                    if loss is not None and loss < best_loss:
                        best, best_loss, t, improved = counts, loss, trial, True
    tried = [({n: k[i] for i, n in enumerate(names)}, v) for k, v in seen.items()]
    return best, tried


def keep_with_count(w: torch.Tensor, keep: torch.Tensor, zeros: int) -> torch.Tensor:
    """A mask of ``w``'s shape with exactly ``zeros`` zeros: the weights already pruned,
    then the smallest magnitudes (the order the reconstruction scores follow)."""
    flat = torch.where(keep.reshape(-1), w.detach().reshape(-1).double().abs(), -1.0)
    out = torch.ones(flat.numel(), dtype=torch.bool, device=w.device)
    out[torch.argsort(flat.cpu(), stable=True)[:zeros].to(w.device)] = False
    return out.reshape(w.shape)
