"""Masks over the prunable parameters, and keeping pruned weights exactly zero.

A mask is a boolean tensor of the parameter's shape, True where the weight is kept.
Pruned weights stay zero through training because (1) their gradients are masked before
the optimizer sees them, so momentum and weight decay never move them, and (2) the masks
are re-applied after every optimizer step, which also covers optimizers with other state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from wfcore import prunable


def select_params(model: nn.Module, patterns: Iterable[str] | None,
                  kinds: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """The prunable parameters, in model order (``wfcore.prunable``).

    ``patterns`` are globs over parameter names (``model.params``); None selects the
    weights of the layer ``kinds`` (``model.prunable``; None = Linear, Conv, ConvTranspose
    and attention in-projections). Biases and normalisation layers stay dense.
    """
    return prunable.select(model, patterns, kinds)


def group_size(shape: Sequence[int], block: int) -> int:
    """The size of ``structure.block``'s groups in a parameter of ``shape``: ``block``,
    capped at its input channels (a group never spans two rows); 1 below 2 dimensions."""
    return min(block, shape[1]) if len(shape) >= 2 else 1


def to_groups(t: torch.Tensor, block: int, fill: float | bool = 0,
              cap: bool = True) -> torch.Tensor:
    """(*group index, b): ``t`` (a parameter's shape) cut into ``structure.block`` groups.

    A group is ``block`` consecutive input channels (dim 1) at one output channel and one
    kernel position, so the group index is (out, *kernel, groups); a row whose channels are
    not a multiple of ``block`` ends with a smaller group, padded with ``fill``. ``cap``:
    a block larger than the input channels is one group of the whole row (``group_size``,
    so b = min(block, channels): the same groups without the padding); without it the
    row is padded to ``block``. A parameter of fewer than 2 dimensions is never grouped:
    (*shape, 1), one weight to a group.
    """
    if t.dim() < 2:
        return t[..., None]
    if cap:
        block = group_size(t.shape, block)
    pad = -t.shape[1] % block
    moved = t.movedim(1, -1)
    if pad:
        moved = torch.cat([moved, moved.new_full((*moved.shape[:-1], pad), fill)], -1)
    return moved.unflatten(-1, (-1, block))


def from_groups(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``to_groups``: a tensor of ``shape`` (the padding dropped)."""
    if len(shape) < 2:
        return groups[..., 0]
    return groups.flatten(-2)[..., :shape[1]].movedim(-1, 1)


def block_scores(scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                 block: int) -> dict[str, torch.Tensor]:
    """Every weight scored by the mean score of its block's kept weights (``structure.block``).

    A block is ``block`` consecutive input channels (dim 1) at one output channel and one
    kernel position (``to_groups``): the layout of DeepSparse's INT8 (AVX-512 VNNI) sparse
    kernels, which multiply 4 int8 weights at once. The allocator then sees one score per
    block and removes whole blocks (ties are broken by position), so the sparsity it
    reaches stays exact: only the last block pruned in a layer (``uniform``) or in the
    model (``global``) may be split. The mean is per weight, so blocks compete with each
    other and with smaller blocks on equal terms. This is ``Scorer.block_scores``'s
    default; ``obs`` replaces it with the group OBS saliency where the curvature gives
    the blocks of F^-1.
    """
    if block == 1:
        return scores
    out = {}
    for n, s in scores.items():
        if s.dim() < 2:
            out[n] = s
            continue
        kept = to_groups(keep[n].to(s.device), block, False)
        sums = torch.where(kept, to_groups(s.double(), block), 0.0).sum(-1)
        mean = sums / kept.sum(-1).clamp(min=1)
        out[n] = from_groups(mean[..., None].expand(kept.shape), s.shape).to(s.dtype)
    return out


def whole_blocks(keep: dict[str, torch.Tensor], block: int) -> float:
    """Fraction of the pruned weights that lie in blocks pruned whole (1.0 when none is)."""
    split = zeros = 0
    for k in keep.values():
        if k.dim() < 2:
            continue
        pruned = to_groups(~k, block, False).sum(-1)  # (*group index,)
        size = to_groups(torch.ones_like(k), block, False).sum(-1)
        zeros += int(pruned.sum())
        split += int(pruned[(pruned > 0) & (pruned < size)].sum())
    return 1.0 - split / zeros if zeros else 1.0


class Masks:
    """Keep-masks for a dict of parameters."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.keep: dict[str, torch.Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()
        }
        self._handles: list = []

    # -- state ------------------------------------------------------------------------
    def set(self, keep: dict[str, torch.Tensor]) -> None:
        """Replace the masks and zero the newly pruned weights."""
        for n, k in keep.items():
            if k.shape != self.keep[n].shape:
                raise ValueError(f"mask for {n} has shape {tuple(k.shape)}")
            self.keep[n] = k.to(device=self.params[n].device, dtype=torch.bool)
        self.apply()

    def reset(self) -> None:
        for n in self.keep:
            self.keep[n].fill_(True)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight."""
        for n, p in self.params.items():
            p.mul_(self.keep[n])

    def numel(self) -> int:
        return sum(k.numel() for k in self.keep.values())

    def zeros(self) -> int:
        return sum(int((~k).sum()) for k in self.keep.values())

    def sparsity(self) -> float:
        """Fraction of pruned weights among all prunable weights."""
        return self.zeros() / max(self.numel(), 1)

    def layer_sparsity(self) -> dict[str, dict[str, float]]:
        return {n: {"numel": k.numel(), "sparsity": float((~k).sum()) / k.numel()}
                for n, k in self.keep.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: k.cpu().clone() for n, k in self.keep.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.keep) - set(state)
        if missing:
            raise ValueError(f"masks missing for {sorted(missing)}")
        self.set({n: state[n] for n in self.keep})

    # -- training ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask gradients and re-apply masks after each step of ``optimizer``."""
        self.detach()
        for n, p in self.params.items():
            self._handles.append(p.register_hook(lambda g, n=n: g * self.keep[n]))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state (momentum, Adam moments) of pruned weights."""
        for n, p in self.params.items():
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.mul_(self.keep[n])
