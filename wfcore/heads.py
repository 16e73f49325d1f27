"""Attention heads (``structure.unit: head``): which weights a head owns, zeroing it, and
removing it from ``nn.MultiheadAttention``.

Head h of an attention module with embedding width E and head width d = E / H owns the
rows h*d:(h+1)*d of each of the Q, K and V blocks of ``in_proj_weight`` (3 d E weights
and 3 d biases) and the columns h*d:(h+1)*d of ``out_proj.weight`` (E d weights, the
ones that read the head). Heads couple to nothing outside their module: the embedding
width (the residual stream) stays, so a head is a group of its own module alone and
needs no dependency graph. Zeroing V's rows and biases makes the head put out exactly
zero (its attention averages zero vectors); zeroing its Q, K rows and its out_proj
columns as well leaves the masked model equal to the shrunk one.

``nn.MultiheadAttention`` ties its inner width to E (H d = E), so a module that lost
heads becomes a ``PrunedMultiheadAttention``: the same parameters with an inner width
H' d, the attention written out in plain operations (the same numbers; it exports to
ONNX as MatMul/Softmax). It is still an ``nn.MultiheadAttention`` to isinstance checks
(``wfcore.prunable`` selects its ``in_proj_weight``; the attention kind), and its
``_qkv_same_embed_dim`` is False, which keeps ``nn.TransformerEncoderLayer``'s fused
fast path (written for H d = E) away from it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wfcore.channels import ChannelGroup, Item
from wfcore.errors import WfcoreError


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Self- or cross-attention with ``num_heads`` heads of ``head_dim`` over an
    ``embed_dim`` stream, where num_heads * head_dim may be less than embed_dim."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool,
                 bias: bool = True):
        nn.Module.__init__(self)
        inner = num_heads * head_dim
        self.embed_dim, self.kdim, self.vdim = embed_dim, embed_dim, embed_dim
        self.num_heads, self.head_dim, self.batch_first = num_heads, head_dim, batch_first
        self.dropout, self.add_zero_attn = 0.0, False
        self._qkv_same_embed_dim = False  # inner != embed_dim: no fused fast path
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))  # (3 H'd, E)
        self.register_parameter("in_proj_bias",
                                nn.Parameter(torch.zeros(3 * inner)) if bias else None)
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        self.bias_k = self.bias_v = None
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, embed_dim,
                                                                          bias=bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:  # (tokens, batch, E) -> (batch, tokens, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(inner)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = F.linear(x, w, b)  # (batch, tokens, H'd)
            return y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (batch, H', T, S)
        if is_causal and attn_mask is None:
            T, S = scores.shape[-2:]
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            scores = (scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype ==
                      torch.bool else scores + attn_mask)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            scores = (scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool
                      else scores + pad)
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = (attn @ v).transpose(1, 2).flatten(2)  # (batch, T, H'd)
        # functional, as nn.MultiheadAttention: out_proj is never called as a module
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        return out, weights


def attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Every attention module whose heads can go (Q, K and V of the embedding width,
    packed in ``in_proj_weight``; no bias_k/bias_v)."""
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        if m.in_proj_weight is None or m.bias_k is not None or m.kdim != m.embed_dim \
                or m.vdim != m.embed_dim:
            raise WfcoreError(f"structure.unit: head: attention '{name}' has keys or values "
                              "of their own width or bias_k/bias_v, which is not supported")
        found[name] = m
    return found


def head_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per attention module with more than one head; its 'channels' are the
    heads (one item of kind 'out': the allocator's cost counts heads)."""
    groups = []
    for name, m in attention_modules(model).items():
        if m.num_heads < 2:
            continue
        idx = torch.arange(m.num_heads)
        groups.append(ChannelGroup(name, m.num_heads, [Item(name, "out", idx, idx)]))
    return groups


def head_rows(m: nn.MultiheadAttention, h: int) -> torch.Tensor:
    """(3d,) the rows of ``in_proj_weight`` (and in_proj_bias) of head ``h``."""
    d, inner = m.head_dim, m.num_heads * m.head_dim
    return torch.cat([torch.arange(h * d, (h + 1) * d) + s * inner for s in range(3)])


def head_coordinates(group: ChannelGroup, model: nn.Module, offsets: dict[str, int],
                     kinds: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """The flat coordinates of each head's weights (``channels.coordinates`` for heads):
    its Q, K, V rows of ``in_proj_weight`` and its columns of ``out_proj.weight``;
    ``kinds=("in",)`` only those columns (the weights that read the head). A parameter
    not in ``offsets`` (not prunable) has none."""
    m = dict(model.named_modules())[group.root]
    d = m.head_dim
    prefix = f"{group.root}." if group.root else ""
    out: list[torch.Tensor] = []
    for h in range(m.num_heads):
        parts = [torch.zeros(0, dtype=torch.long)]
        name = prefix + "in_proj_weight"
        if (kinds is None or "out" in kinds) and name in offsets:
            E = m.in_proj_weight.shape[1]
            rows = head_rows(m, h)
            parts.append((rows[:, None] * E + torch.arange(E)).flatten() + offsets[name])
        name = prefix + "out_proj.weight"
        if (kinds is None or "in" in kinds) and name in offsets:
            inner = m.out_proj.weight.shape[1]
            cols = torch.arange(h * d, (h + 1) * d)
            rows_ = torch.arange(m.out_proj.weight.shape[0])
            parts.append((rows_[:, None] * inner + cols).flatten() + offsets[name])
        out.append(torch.cat(parts))
    return out


@torch.no_grad()
def zero_heads(model: nn.Module, groups: list[ChannelGroup],
               removed: dict[int, list[int]]) -> None:
    """The masked model: the removed heads' Q, K, V rows and biases and their out_proj
    columns set to zero."""
    modules = dict(model.named_modules())
    for g, heads in removed.items():
        m = modules[groups[g].root]
        for h in heads:
            rows = head_rows(m, h)
            m.in_proj_weight[rows] = 0
            if m.in_proj_bias is not None:
                m.in_proj_bias[rows] = 0
            m.out_proj.weight[:, h * m.head_dim:(h + 1) * m.head_dim] = 0


@torch.no_grad()
def remove_heads(model: nn.Module, name: str, heads: list[int]) -> None:
    """Replace attention module ``name`` by a ``PrunedMultiheadAttention`` without
    ``heads`` (indices into its current heads)."""
    m = dict(model.named_modules())[name]
    keep = [h for h in range(m.num_heads) if h not in set(heads)]
    if not keep:
        raise WfcoreError(f"structure.unit: head: removing every head of '{name}'")
    rows = torch.cat([head_rows(m, h) for h in keep]).sort().values  # Q, K, V order kept
    cols = torch.cat([torch.arange(h * m.head_dim, (h + 1) * m.head_dim) for h in keep])
    bias = m.in_proj_bias is not None
    new = PrunedMultiheadAttention(m.embed_dim, len(keep), m.head_dim, m.batch_first, bias)
    new.dropout = m.dropout
    new.in_proj_weight.copy_(m.in_proj_weight[rows])
    new.out_proj.weight.copy_(m.out_proj.weight[:, cols])
    if bias:
        new.in_proj_bias.copy_(m.in_proj_bias[rows])
        new.out_proj.bias.copy_(m.out_proj.bias)
    new.train(m.training)
    new.to(m.in_proj_weight.device, m.in_proj_weight.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = dict(model.named_modules())[parent_name] if parent_name else model
    setattr(parent, child, new)


def shrink_heads(model: nn.Module, groups: list[ChannelGroup],
                 removed: dict[int, list[int]]) -> list[list[Any]]:
    """Remove the heads; returns the history of this call, [module, "heads", indices]."""
    history = []
    for g, heads in sorted(removed.items()):
        if heads:
            remove_heads(model, groups[g].root, sorted(heads))
            history.append([groups[g].root, "heads", sorted(int(h) for h in heads)])
    return history
