"""N:M semi-structured patterns (``structure.pattern``): n weights kept of every m
consecutive input weights.

A group is m consecutive input channels (dim 1) at one output channel and one kernel
position, cut as ``structure.block`` cuts its blocks (``wfcore.masks.to_groups``); this is
the layout of sparse tensor cores (2:4, ``torch.sparse.to_sparse_semi_structured``) along
the reduction dimension of a Linear layer. A group shorter than m (the end of a row whose
channels are not a multiple of m, or a layer of fewer than m input channels) keeps at most
n of its weights, as the padded group of the hardware would. Parameters of fewer than 2
dimensions are not pruned.
"""

from __future__ import annotations

import re

import torch

from wfcore.errors import ConfigError
from wfcore.masks import from_groups, to_groups


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None -> None. A one-line ConfigError names the key."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"config key 'structure.pattern': '{text}' is not N:M with "
                          "0 < N < M, e.g. 2:4")
    return int(match.group(1)), int(match.group(2))


def nm_keep(scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
            pattern: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Keep-masks with the n highest-scoring weights of every group of m kept (already
    pruned weights stay pruned and count among the group's zeros)."""
    n, m = pattern
    out = {}
    for name, s in scores.items():
        k = keep[name].to(s.device)
        if s.dim() < 2:
            out[name] = k.clone()
            continue
        real = to_groups(torch.ones_like(k), m, False, cap=False)  # (*, m): padding False
        g = torch.where(to_groups(k, m, False, cap=False) & real,
                        to_groups(s.double(), m, cap=False),
                        float("-inf"))
        top = torch.topk(g, n, dim=-1).indices
        chosen = (torch.zeros_like(real).scatter_(-1, top, True) & real
                  & to_groups(k, m, False, cap=False))
        out[name] = from_groups(chosen, s.shape).to(keep[name].device)
    return out


def pattern_holds(keep: dict[str, torch.Tensor], pattern: tuple[int, int]) -> bool:
    """Whether every group of m holds at most n kept weights."""
    n, m = pattern
    return all(bool((to_groups(k, m, False, cap=False).sum(-1) <= n).all())
               for k in keep.values() if k.dim() >= 2)
