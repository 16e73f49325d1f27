"""Which parameters are prunable: every weight matrix a user would count, by layer kind.

``model.prunable`` names the kinds pruned when ``model.params`` (globs) is not given:

- ``linear``: ``nn.Linear`` weights (``nn.MultiheadAttention.out_proj`` is one, counted once);
- ``conv``: ``nn.Conv1d/2d/3d`` weights, any ``groups`` (depthwise included);
- ``conv_transpose``: ``nn.ConvTranspose1d/2d/3d`` weights;
- ``attention``: the in-projection of ``nn.MultiheadAttention``: ``in_proj_weight`` (Q, K
  and V packed, (3 E, E)), or ``q/k/v_proj_weight`` when keys and values have their own
  widths. It is pruned as the weight it is: one (3 E, E) matrix whose rows are outputs.

Opt-in kinds: ``embedding`` (``nn.Embedding`` / ``nn.EmbeddingBag`` tables) and ``norm``
(the scales of BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm). Biases are never
selected by kind; every other parameter (a class token, position embeddings, a plugin's
own tensors) only through ``model.params``. The sparsity of a run is measured over the
prunable weights; ``summary`` says which those are, which are excluded and why, and their
share of the model's weights (``wfcore plan`` and the report show it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from wfcore.errors import ConfigError

DEFAULT_KINDS = ("linear", "conv", "conv_transpose", "attention")
OPT_IN_KINDS = ("embedding", "norm")
KINDS = DEFAULT_KINDS + OPT_IN_KINDS

NORMS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                           *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def kind_of(module: nn.Module, attr: str) -> str | None:
    """The kind of ``module``'s parameter ``attr`` (a key of ``KINDS``), or None."""
    if isinstance(module, nn.MultiheadAttention):
        return "attention" if attr in ATTENTION_WEIGHTS else None
    if attr != "weight":
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, NORMS):
        return "norm"
    return None


def reason_excluded(kind: str | None, attr: str) -> str:
    """Why a parameter of ``kind`` is not prunable under the configured kinds."""
    if kind in OPT_IN_KINDS:
        what = "embedding table" if kind == "embedding" else "normalisation scale"
        return f"{what} (opt-in: add '{kind}' to model.prunable)"
    if kind is not None:
        return f"kind '{kind}' is not in model.prunable"
    if attr.endswith("bias"):
        return "bias (kept dense)"
    return "not the weight of a known layer (select it with model.params)"


def parameter_kinds(model: nn.Module) -> dict[str, str | None]:
    """{parameter name: kind or None}, in ``model.named_parameters()`` order (a parameter
    shared by several modules appears once, under its first name)."""
    owner_kind: dict[int, str | None] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            kind = kind_of(module, attr)
            if kind is not None or id(p) not in owner_kind:
                owner_kind[id(p)] = kind
    return {n: owner_kind.get(id(p)) for n, p in model.named_parameters()}


def check_kinds(kinds: Iterable[str]) -> list[str]:
    """``kinds`` as a list; an unknown one is a ConfigError naming ``model.prunable``."""
    kinds = list(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"config key 'model.prunable': '{kind}' is not one of "
                              f"{', '.join(KINDS)}")
    return kinds


def select(model: nn.Module, patterns: Iterable[str] | None,
           kinds: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """The prunable parameters, in model order: those matching the globs ``patterns``
    (``model.params``) when given, else those of the ``kinds`` (``model.prunable``;
    None = ``DEFAULT_KINDS``)."""
    if patterns is None:
        chosen = set(check_kinds(DEFAULT_KINDS if kinds is None else kinds))
        found = parameter_kinds(model)
        return {n: p for n, p in model.named_parameters() if found[n] in chosen}
    patterns = list(patterns)
    params = {n: p for n, p in model.named_parameters()
              if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in params):
            raise ConfigError(f"config key 'model.params': '{pat}' matches no parameter")
    return params


@dataclass
class Excluded:
    reason: str
    names: list[str]
    numel: int


def summary(model: nn.Module, params: dict[str, Any], patterns: Iterable[str] | None = None,
            kinds: Iterable[str] | None = None) -> dict[str, Any]:
    """What is prunable and what is not, for the plan and the report.

    Returns ``{"selected_by", "prunable": {kind: {"tensors", "numel"}}, "excluded":
    [{"reason", "names", "numel"}], "prunable_numel", "model_numel", "share"}``; ``share``
    is the fraction of the model's parameters that the sparsity is measured over.
    """
    found = parameter_kinds(model)
    all_params = dict(model.named_parameters())
    by_kind: dict[str, dict[str, int]] = {}
    excluded: dict[str, Excluded] = {}
    for name, p in all_params.items():
        kind = found[name] or "other"
        if name in params:
            entry = by_kind.setdefault(kind, {"tensors": 0, "numel": 0})
            entry["tensors"] += 1
            entry["numel"] += p.numel()
            continue
        reason = ("not matched by model.params" if patterns is not None
                  else reason_excluded(found[name], name.rsplit(".", 1)[-1]))
        group = excluded.setdefault(reason, Excluded(reason, [], 0))
        group.names.append(name)
        group.numel += p.numel()
    total = sum(p.numel() for p in all_params.values())
    chosen = sum(p.numel() for n, p in all_params.items() if n in params)
    return {
        "selected_by": ("model.params" if patterns is not None else
                        f"model.prunable [{', '.join(DEFAULT_KINDS if kinds is None else kinds)}]"),
        "prunable": by_kind,
        "excluded": [vars(e) for e in excluded.values()],
        "prunable_numel": chosen,
        "model_numel": total,
        "share": chosen / total if total else 0.0,
    }


def summary_lines(info: dict[str, Any], names: int = 3) -> list[str]:
    """The summary as lines of the plan: what is prunable, then each reason for exclusion
    with its count and first ``names`` parameter names."""
    kinds = ", ".join(f"{k} {v['tensors']} ({v['numel']:,})" for k, v in info["prunable"].items())
    out = [f"prunable by {info['selected_by']}: {info['prunable_numel']:,} of the model's "
           f"{info['model_numel']:,} parameters ({info['share']:.1%}), the sparsity is "
           f"measured over these: {kinds or 'none'}"]
    for e in info["excluded"]:
        shown = ", ".join(e["names"][:names]) + (", ..." if len(e["names"]) > names else "")
        out.append(f"excluded: {len(e['names'])} tensor(s), {e['numel']:,} weights: "
                   f"{e['reason']}: {shown}")
    return out
