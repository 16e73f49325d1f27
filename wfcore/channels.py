"""Coupled channels (``structure.unit: channel``): which weights go together, what they
cost, and removing them from the modules.

The coupling comes from Torch-Pruning's DependencyGraph (traced from one example input):
a group is a root layer's output channels with everything tied to them, the BatchNorm
after it, the next layers' input channels, and the other layers whose channels a
residual addition or a concatenation ties to the same positions. Channel c of a group is
removed whole or not at all, so the shrunk model still runs.

Here a group is read three ways, all from the same (item, indices) lists of the graph:
  - the flat coordinates of its channels in the prunable parameters (for scores and the
    OBS update, ``coordinates``),
  - the multiply-accumulates and parameters each channel costs (``CostModel``),
  - zeroing its parameters (the masked model) and removing them (the shrunk model).
Removal is recorded as Torch-Pruning's pruning history, (root module, out?, indices),
which replays on a freshly built model (``replay``): how a run directory keeps a shrunk
model's architecture beside its state_dict.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wfcore.errors import WfcoreError

log = logging.getLogger(__name__)

MISSING = ("structure.unit: channel needs Torch-Pruning (its DependencyGraph couples the "
           "channels): pip install 'wfcore[structured]'")


def torch_pruning() -> Any:
    """The torch_pruning module, or a one-line error saying how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise WfcoreError(MISSING) from None
    return tp


@dataclass
class Item:
    """One parameterised layer of a group: which of its channels each root channel is."""

    module: str  # module name in the model
    kind: str  # out | in | depthwise (out channels of a depthwise conv) | norm | other
    idxs: torch.Tensor  # (k,) the layer's own channel indices
    roots: torch.Tensor  # (k,) the root channel each one belongs to


@dataclass
class ChannelGroup:
    """The channels of one root layer and everything coupled to them."""

    root: str  # module name of the root layer
    size: int  # channels of the root layer
    items: list[Item]


def build_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """Torch-Pruning's DependencyGraph of ``model`` traced on ``example`` (eval mode, so
    that BatchNorm statistics are not touched)."""
    tp = torch_pruning()
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)


def item_kind(tp: Any, module: nn.Module, fn: Any) -> str:
    f = tp.pruner.function
    if fn is f.prune_depthwise_conv_out_channels:
        return "depthwise"
    if fn in (f.prune_conv_out_channels, f.prune_linear_out_channels):
        return "out"
    if fn in (f.prune_conv_in_channels, f.prune_linear_in_channels):
        return "in"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    return "other"


def channel_groups(model: nn.Module, graph: Any, ignored: Sequence[nn.Module] = ()) -> \
        list[ChannelGroup]:
    """Every prunable group of the graph, rooted at Conv/Linear layers not in ``ignored``
    (the classifier: its outputs are the classes)."""
    tp = torch_pruning()
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=list(ignored),
                                      root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        items = []
        for entry in group.items:
            module, fn = entry.dep.target.module, entry.dep.handler
            if isinstance(module, nn.Parameter):
                raise WfcoreError(f"structure.unit: channel: a group of "
                                  f"'{names.get(group.items[0].dep.target.module)}' ties a "
                                  "bare parameter, which is not supported")
            if module not in names:  # Torch-Pruning's own nodes (add, cat, ...): no weights
                continue
            roots = [r for r in entry.root_idxs]
            if any(r is None for r in roots):
                continue
            items.append(Item(names[module], item_kind(tp, module, fn),
                              torch.as_tensor(list(entry.idxs), dtype=torch.long),
                              torch.as_tensor(roots, dtype=torch.long)))
        root = group.items[0].dep.target.module
        groups.append(ChannelGroup(names[root], graph.get_out_channels(root), items))
    return groups


def gather(item: Item, module: nn.Module, t: torch.Tensor) -> torch.Tensor | None:
    """(k, per): the entries of ``t`` (the module's weight or bias, or a tensor of its
    shape) that belong to each of the item's channels; None where ``t`` has none."""
    if item.kind in ("out", "depthwise", "norm"):
        return t[item.idxs].reshape(len(item.idxs), -1)
    if item.kind != "in" or t.dim() < 2:  # a bias has no input channels
        return None
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return t[:, item.idxs].transpose(0, 1).reshape(len(item.idxs), -1)
    per_in = t.shape[1]  # a grouped conv: input channel j feeds the out rows of its group
    rows = t.view(groups, t.shape[0] // groups, per_in, *t.shape[2:])
    return rows[item.idxs // per_in, :, item.idxs % per_in].reshape(len(item.idxs), -1)


def coordinates(group: ChannelGroup, model: nn.Module, offsets: dict[str, int],
                kinds: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """The flat coordinates (in a layout of parameters at ``offsets``, keyed by parameter
    name) of each of the group's channels: a list of ``group.size`` index tensors. A
    parameter not in ``offsets`` (BatchNorm, biases: not prunable) has none. ``kinds``:
    only the items of these kinds (``("in",)``: the weights that read the channel)."""
    modules = dict(model.named_modules())
    blocks: list[torch.Tensor] = []  # (size, per) of items that cover every channel once
    parts: list[list[torch.Tensor]] = [[] for _ in range(group.size)]
    for item in group.items:
        module = modules[item.module]
        if kinds is not None and item.kind not in kinds:
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{item.module}.{pname}" if item.module else pname
            if full not in offsets:
                continue
            index = torch.arange(p.numel()).view(p.shape) + offsets[full]
            rows = gather(item, module, index)
            if rows is None:
                continue
            if torch.equal(item.roots.sort().values, torch.arange(group.size)):
                blocks.append(rows[item.roots.argsort()])
                continue
            for root, row in zip(item.roots.tolist(), rows, strict=True):
                parts[root].append(row)
    whole = torch.cat(blocks, 1) if blocks else torch.zeros(group.size, 0, dtype=torch.long)
    # unique: a depthwise conv's weights are both its out and its in channels
    return [torch.unique(torch.cat([w, *p])) for w, p in zip(whole, parts, strict=True)]


@torch.no_grad()
def zero_channels(model: nn.Module, groups: list[ChannelGroup],
                  removed: dict[int, list[int]]) -> None:
    """The masked model: every parameter entry of the removed channels (group index ->
    root channels) set to zero, BatchNorm affine included, so that each removed channel
    puts out exactly zero (with activations that map 0 to 0) and adds nothing after it."""
    modules = dict(model.named_modules())
    for g, channels in removed.items():
        chosen = torch.as_tensor(channels, dtype=torch.long)
        for item in groups[g].items:
            module = modules[item.module]
            hit = torch.isin(item.roots, chosen)
            sub = Item(item.module, item.kind, item.idxs[hit], item.roots[hit])
            for p in module.parameters(recurse=False):
                index = torch.arange(p.numel(), device=p.device).view(p.shape)
                rows = gather(sub, module, index)
                if rows is not None:
                    p.view(-1)[rows.flatten()] = 0


def shrink(model: nn.Module, graph: Any, groups: list[ChannelGroup],
           removed: dict[int, list[int]]) -> list[list[Any]]:
    """Remove the channels from the modules (Torch-Pruning's surgery); returns the
    pruning history of this call, [root module, True, indices] per group, in order.

    Root indices stay valid while other groups are removed: a root layer's output
    channels belong to its group alone."""
    modules = dict(model.named_modules())
    history = []
    for g, channels in sorted(removed.items()):
        if not channels:
            continue
        root = modules[groups[g].root]
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, sorted(channels))
        if not graph.check_pruning_group(group):
            raise WfcoreError(f"structure.unit: channel: removing {len(channels)} channels of "
                              f"'{groups[g].root}' would leave a layer without channels")
        group.prune(record_history=False)
        history.append([groups[g].root, True, sorted(int(c) for c in channels)])
    return history


def replay(model: nn.Module, example: torch.Tensor, history: list[list[Any]]) -> nn.Module:
    """Rebuild a shrunk architecture: the pruning ``history`` (``shrink``'s, steps
    concatenated) applied to a freshly built ``model``, whose state_dict then loads."""
    if history:
        graph = build_graph(model, example)
        graph.load_pruning_history([list(h) for h in history])
    return model


class CostModel:
    """Multiply-accumulates and parameters of the Conv/Linear layers and attention
    modules, as functions of the channels (heads) kept in each (exact for these layers:
    MACs = out * in/groups * kernel * output positions; an attention module's four
    projections and its two (T x S) products; BatchNorm and activations are not
    counted)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.layers: dict[str, dict[str, float]] = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                hooks.append(m.register_forward_hook(
                    lambda mod, _i, out, name=name: self._record(name, mod, out)))
            elif isinstance(m, nn.MultiheadAttention):
                hooks.append(m.register_forward_hook(
                    lambda mod, i, _o, name=name: self._record_attention(name, mod, i)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()

    def _record(self, name: str, m: nn.Linear | nn.modules.conv._ConvNd,
                out: torch.Tensor) -> None:
        if isinstance(m, nn.Linear):
            out_ch, in_ch, kernel, groups = m.out_features, m.in_features, 1, 1
        else:
            out_ch, in_ch, groups = m.out_channels, m.in_channels, m.groups
            kernel = math.prod(m.kernel_size)
        positions = out.numel() / out.shape[0] / out_ch if out.dim() > 1 else 1
        self.layers[name] = {"out": out_ch, "in": in_ch, "groups": groups, "kernel": kernel,
                             "positions": positions, "bias": float(m.bias is not None),
                             "depthwise": float(groups > 1 and groups == in_ch == out_ch)}

    def _record_attention(self, name: str, m: nn.MultiheadAttention,
                          inputs: tuple[Any, ...]) -> None:
        axis = 1 if m.batch_first else 0
        query = inputs[0]
        key = inputs[1] if len(inputs) > 1 else query
        self.layers[name] = {"out": m.num_heads, "in": m.embed_dim, "groups": 1, "kernel": 1,
                             "positions": query.shape[axis], "sources": key.shape[axis],
                             "head_dim": m.head_dim, "bias": float(m.in_proj_bias is not None),
                             "depthwise": 0.0, "attention": 1.0}

    def layer_cost(self, name: str, out: float, in_: float) -> tuple[float, float]:
        """(MACs per sample, parameters) of layer ``name`` with ``out``/``in_`` channels
        (an attention module: ``out`` heads over an ``in_`` wide stream)."""
        L = self.layers[name]
        if L.get("attention"):
            inner, T, S = out * L["head_dim"], L["positions"], L["sources"]
            macs = (T + 2 * S) * inner * in_ + 2 * T * S * inner + T * inner * in_
            return macs, 4 * inner * in_ + L["bias"] * (3 * inner + in_)
        per_group_in = 1 if L["depthwise"] else in_ / L["groups"]
        params = out * per_group_in * L["kernel"]
        return params * L["positions"], params + L["bias"] * out

    def total(self) -> tuple[float, float]:
        macs = params = 0.0
        for name, L in self.layers.items():
            m, p = self.layer_cost(name, L["out"], L["in"])
            macs, params = macs + m, params + p
        return macs, params
