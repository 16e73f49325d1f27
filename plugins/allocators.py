"""Allocators: scores -> keep-masks at a target sparsity.

``global``: one threshold over all prunable weights (the lowest scores go first), so
layers get the sparsity their scores earn. ``uniform``: every layer to the target.
Both reach the requested count of zeros exactly (ties broken by position).
"""

from __future__ import annotations

import torch

from wfcore import hookimpl
from wfcore.interfaces import Allocator, Tensors


def prune_lowest(scores: torch.Tensor, keep: torch.Tensor, num_zeros: int) -> torch.Tensor:
    """Keep-mask with exactly ``num_zeros`` zeros: the already pruned, then the lowest scores.

    ``scores`` and ``keep`` are flat; returns a flat bool tensor.
    """
    s = scores.double().masked_fill(~keep, float("-inf"))
    num_zeros = max(num_zeros, int((~keep).sum()))
    new_keep = torch.ones_like(keep)
    if num_zeros > 0:
        order = torch.argsort(s, stable=True)
        new_keep[order[:num_zeros]] = False
    return new_keep


class GlobalAllocator(Allocator):
    def __init__(self, options=None):
        self.options = options

    def allocate(self, scores: Tensors, masks: Tensors, target: float) -> Tensors:
        names = list(scores)
        flat_s = torch.cat([scores[n].reshape(-1).cpu() for n in names])
        flat_k = torch.cat([masks[n].reshape(-1).cpu() for n in names])
        new = prune_lowest(flat_s, flat_k, round(target * flat_s.numel()))
        out, offset = {}, 0
        for n in names:
            k = masks[n].numel()
            out[n] = new[offset:offset + k].reshape(masks[n].shape).to(masks[n].device)
            offset += k
        return out


class UniformAllocator(Allocator):
    def __init__(self, options=None):
        self.options = options

    def allocate(self, scores: Tensors, masks: Tensors, target: float) -> Tensors:
        return {
            n: prune_lowest(s.reshape(-1).cpu(), masks[n].reshape(-1).cpu(),
                            round(target * s.numel())).reshape(s.shape).to(masks[n].device)
            for n, s in scores.items()
        }


@hookimpl
def wfcore_allocators():
    return {"global": GlobalAllocator, "uniform": UniformAllocator}
