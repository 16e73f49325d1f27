"""Masks over the prunable parameters, and keeping pruned weights exactly zero.

A mask is a boolean tensor of the parameter's shape, True where the weight is kept.
Pruned weights stay zero through training because (1) their gradients are masked before
the optimizer sees them, so momentum and weight decay never move them, and (2) the masks
are re-applied after every optimizer step, which also covers optimizers with other state.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from wfcore.errors import ConfigError


def select_params(model: nn.Module, patterns: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """The prunable parameters, in model order.

    ``patterns`` are globs over parameter names; None selects the weights of every
    Linear and Conv layer (biases and normalisation layers stay dense).
    """
    if patterns is None:
        conv_linear = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        chosen = {
            f"{mod_name}.weight" if mod_name else "weight": module.weight
            for mod_name, module in model.named_modules()
            if isinstance(module, conv_linear)
        }
        return {n: p for n, p in model.named_parameters() if n in chosen}
    patterns = list(patterns)
    params = {n: p for n, p in model.named_parameters()
              if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in params):
            raise ConfigError(f"config key 'model.params': '{pat}' matches no parameter")
    return params


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
