"""One structured pruning step: score coupled channels, allocate them globally to a
target in removed FLOPs or parameters, compensate the rest (OBS), zero them (the masked
model) and remove them (the shrunk, dense model).

The allocation is greedy over all channels of all groups, lowest saliency first (or
lowest saliency per unit of cost, ``rank: per_cost``), each group keeping at least
``min_keep`` of its channels (and one), until the removed share of the target metric
(MACs or parameters of the Conv/Linear layers, ``CostModel``) reaches the target. The
cost of a channel changes as others go (a conv's MACs are out * in), so the totals are
updated exactly after every choice. The plan reports both metrics, predicted and, after
the surgery, counted on the shrunk model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wfcore.channels import (
    ChannelGroup,
    CostModel,
    build_graph,
    channel_groups,
    coordinates,
    shrink,
    torch_pruning,
    zero_channels,
)
from wfcore.choices import METRICS, RANKS, STRUCTURED_UNITS
from wfcore.errors import ConfigError
from wfcore.fisher.gradients import ParamLayout
from wfcore.group_obs import GroupScorer, score_groups
from wfcore.heads import head_coordinates, head_groups, shrink_heads, zero_heads

log = logging.getLogger(__name__)



@dataclass
class Allocation:
    removed: dict[int, list[int]]  # group index -> removed root channels
    before: dict[str, float]  # {"macs", "params"} of the Conv/Linear layers
    after: dict[str, float]  # predicted by the cost model
    round_to: int = 1  # every group keeps a multiple of this many channels (or all)

    def as_dict(self) -> dict[str, Any]:
        removed = {k: 1 - self.after[k] / self.before[k] if self.before[k] else 0.0
                   for k in self.before}
        return {"channels_removed": sum(len(c) for c in self.removed.values()),
                "round_to": self.round_to,
                "predicted": {"macs": self.after["macs"], "params": self.after["params"],
                              "flops_removed": removed["macs"],
                              "params_removed": removed["params"]}}


def torch_pruning_scores(model: nn.Module, example: torch.Tensor,
                         importance: Any = None) -> list[torch.Tensor]:
    """A Torch-Pruning importance of every channel of each group ``prunable_groups`` gives,
    in its order. ``importance``: one of ``torch_pruning.importance`` (those that read
    gradients read what the model's parameters hold); default ``GroupMagnitudeImportance``
    (p=2, its defaults: the mean over a group's layers, normalised by the group's mean),
    ``structure.scores: tp_magnitude``."""
    tp = torch_pruning()
    graph, groups = prunable_groups(model, example)
    if importance is None:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    modules = dict(model.named_modules())
    out = []
    with torch.no_grad():
        for g in groups:
            root = modules[g.root]
            group = graph.get_pruning_group(
                root, graph.get_pruner_of_module(root).prune_out_channels, list(range(g.size)))
            out.append(importance(group).detach().double().cpu())
    return out


def prunable_groups(model: nn.Module, example: torch.Tensor) -> tuple[Any, list[ChannelGroup]]:
    """(graph, groups) of the channels that may go: those some layer consumes (a group
    no layer reads from is a model output, e.g. the classifier's classes)."""
    graph = build_graph(model, example)
    groups = [g for g in channel_groups(model, graph)
              if any(item.kind == "in" for item in g.items)]
    return graph, groups


def channel_layers(group: ChannelGroup, cost: CostModel) -> list[list[tuple[str, str]]]:
    """For each root channel, the (Conv/Linear layer, out|in) channels removing it removes."""
    touched: list[list[tuple[str, str]]] = [[] for _ in range(group.size)]
    for item in group.items:
        if item.module not in cost.layers or item.kind not in ("out", "in", "depthwise"):
            continue
        for r in item.roots.tolist():  # a depthwise conv loses an input with each output
            touched[r].append((item.module, "out" if item.kind == "depthwise" else item.kind))
            if item.kind == "depthwise":
                touched[r].append((item.module, "in"))
    return touched


def chunks(order: list[int], size: int, floor: int, round_to: int) -> list[list[int]]:
    """A group's channels (``order``: least salient first) cut into the pieces the
    allocator removes whole, so that the channels kept are always a multiple of
    ``round_to`` (or all of them): first the remainder (size mod round_to), then blocks
    of ``round_to``, never past ``floor`` kept (itself rounded up to a multiple)."""
    floor = min(size, math.ceil(floor / round_to) * round_to)
    first = size % round_to
    out, start = [], 0
    for n in ([first] if first else []) + [round_to] * (size // round_to):
        if size - (start + n) < floor:
            break
        out.append(order[start:start + n])
        start += n
    return out


def allocate(groups: list[ChannelGroup], saliencies: list[torch.Tensor], cost: CostModel,
             target: float, metric: str = "flops", min_keep: float = 0.1,
             rank: str = "saliency", round_to: int = 1) -> Allocation:
    """Remove the least salient channels of all groups until ``target`` of ``metric``
    (flops | params) is gone; each group keeps max(1, ceil(min_keep * size)) channels,
    and a multiple of ``round_to`` of them (vector units and the runtimes' channel
    blocks run multiples of 8 or 16 fastest): channels then go ``round_to`` at a time
    (a group's least salient ones), ranked by their mean key."""
    if metric not in METRICS:
        raise ConfigError(f"config key 'structure.target': '{metric}' is not one of "
                          f"{', '.join(METRICS)}")
    if rank not in RANKS:
        raise ConfigError(f"config key 'structure.rank': '{rank}' is not one of "
                          f"{', '.join(RANKS)}")
    if round_to < 1:
        raise ConfigError(f"config key 'structure.round_to': {round_to} is not a positive "
                          "number of channels")
    counts = {n: {"out": L["out"], "in": L["in"]} for n, L in cost.layers.items()}
    layer_cost = {n: cost.layer_cost(n, c["out"], c["in"]) for n, c in counts.items()}
    total = [sum(c[0] for c in layer_cost.values()), sum(c[1] for c in layer_cost.values())]
    before = {"macs": total[0], "params": total[1]}
    which = 0 if metric == "flops" else 1
    goal = (1 - target) * total[which]
    touched = [channel_layers(g, cost) for g in groups]
    candidates = []
    for g, s in enumerate(saliencies):
        keys = s.tolist()
        if rank == "per_cost":
            for c in range(len(keys)):
                own = sum(layer_cost[n][which] / max(counts[n][k], 1) for n, k in touched[g][c])
                keys[c] = keys[c] / max(own, 1e-30)
        order = sorted(range(len(keys)), key=lambda c: keys[c])
        floor = max(1, math.ceil(min_keep * groups[g].size))
        for k, piece in enumerate(chunks(order, groups[g].size, floor, round_to)):
            # a group's pieces come in its own order (their mean keys never decrease)
            candidates.append((sum(keys[c] for c in piece) / len(piece), g, k, piece))
    candidates.sort(key=lambda t: t[:3])
    removed: dict[int, list[int]] = {}
    for _, g, _, piece in candidates:
        if total[which] <= goal:
            break
        removed.setdefault(g, []).extend(piece)
        for c in piece:
            for n in {n for n, _ in touched[g][c]}:
                for side in [side for m, side in touched[g][c] if m == n]:
                    counts[n][side] -= 1
                new = cost.layer_cost(n, counts[n]["out"], counts[n]["in"])
                total = [total[0] - layer_cost[n][0] + new[0],
                         total[1] - layer_cost[n][1] + new[1]]
                layer_cost[n] = new
    if total[which] > goal:
        log.warning("structured: the floors (structure.min_keep %.2f) stop at %.1f%% %s "
                    "removed, short of the target %.1f%%", min_keep,
                    100 * (1 - total[which] / before["macs" if which == 0 else "params"]),
                    metric, 100 * target)
    return Allocation(removed, before, {"macs": total[0], "params": total[1]}, round_to)


@dataclass
class StructuredStep:
    """What one step did: the allocation and the shrink's pruning history."""

    allocation: Allocation
    history: list[list[Any]]
    counted: dict[str, float] = field(default_factory=dict)  # on the shrunk model

    def record(self) -> dict[str, Any]:
        out = self.allocation.as_dict()
        before = self.allocation.before
        out["counted"] = {**self.counted,
                          "flops_removed": 1 - self.counted["macs"] / before["macs"],
                          "params_removed": 1 - self.counted["params"] / before["params"]}
        out["history"] = self.history
        return out




def prune_channels(model: nn.Module, example: torch.Tensor, params: dict[str, torch.Tensor],
                   scorer: GroupScorer, target: float, *, metric: str = "flops",
                   min_keep: float = 0.1, rank: str = "saliency", round_to: int = 1,
                   update: bool = True, shrink_model: bool = True,
                   unit: str = "channel", normalize: str = "none") -> StructuredStep:
    """Score, allocate, update, zero and (``shrink_model``) remove coupled channels (or,
    ``unit="head"``, attention heads) of ``model`` so that ``target`` of its ``metric``
    is gone. ``params``: the prunable parameters, in the flat order the scorer's
    curvature was built on. ``normalize``: "mean" divides each group's saliencies by their
    mean before the allocation (``structure.normalize``)."""
    if unit not in STRUCTURED_UNITS:
        raise ConfigError(f"config key 'structure.unit': '{unit}' is not one of "
                          f"{', '.join(STRUCTURED_UNITS)}")
    layout = ParamLayout(params)
    if unit == "channel":
        graph, groups = prunable_groups(model, example)
        coords = [coordinates(g, model, layout.offsets, scorer.reads) for g in groups]
    else:
        groups = head_groups(model)
        if not groups:
            raise ConfigError("config key 'structure.unit': 'head' needs nn.MultiheadAttention "
                              "modules with two or more heads; the model has none")
        coords = [head_coordinates(g, model, layout.offsets, scorer.reads) for g in groups]
        if not all(c.numel() for cs in coords for c in cs):
            raise ConfigError("structure.unit: head: the attention weights are not among the "
                              "prunable parameters (model.params / model.prunable)")
        round_to = 1  # heads are counted one by one
    cost = CostModel(model, example)
    w = layout.flatten({n: p.detach() for n, p in params.items()})
    saliencies = score_groups(scorer, w, coords)
    if normalize == "mean":  # a group whose mean is 0 (all its channels free) stays 0
        saliencies = [s / s.mean() if float(s.mean()) > 0 else s for s in saliencies]
    allocation = allocate(groups, saliencies, cost, target, metric, min_keep, rank, round_to)
    if update:
        mask = torch.zeros(layout.d, dtype=torch.bool)
        for g, channels in allocation.removed.items():
            for c in channels:
                mask[coords[g][c]] = True
        dw = scorer.update(w, mask)
        if dw is not None:
            with torch.no_grad():
                for n, t in layout.unflatten(dw).items():
                    params[n].add_(t.to(params[n].device, params[n].dtype))
    if unit == "channel":
        zero_channels(model, groups, allocation.removed)
        history = shrink(model, graph, groups, allocation.removed) if shrink_model else []
    else:
        zero_heads(model, groups, allocation.removed)
        history = shrink_heads(model, groups, allocation.removed) if shrink_model else []
    macs, n_params = CostModel(model, example).total()
    step = StructuredStep(allocation, history, {"macs": macs, "params": n_params})
    record = step.record()
    log.info("structured: %d %ss removed; FLOPs removed %.1f%% (predicted %.1f%%), "
             "parameters removed %.1f%% (predicted %.1f%%)", record["channels_removed"], unit,
             100 * record["counted"]["flops_removed"], 100 * record["predicted"]["flops_removed"],
             100 * record["counted"]["params_removed"],
             100 * record["predicted"]["params_removed"])
    return step


def prune_heads(model: nn.Module, example: torch.Tensor, params: dict[str, torch.Tensor],
                scorer: GroupScorer, target: float, **options: Any) -> StructuredStep:
    """``prune_channels`` with ``unit="head"``: whole attention heads."""
    return prune_channels(model, example, params, scorer, target, unit="head", **options)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (a cumulative
    average from scratch): after channels are removed and the rest compensated, the old
    statistics describe other activations."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
