"""Gradient sampling into a preallocated (m, d) buffer, shared by the estimators.

Each of the m rows is the gradient of the mean loss over ``grad_batch`` samples, taken
at the current masked weights with the model in eval mode, flattened over the prunable
parameters in their fixed order (``ParamLayout``). Labels are the data's (``empirical``)
or drawn from the model's own softmax (``sampled``: no labels needed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wfcore.errors import WfcoreError

log = logging.getLogger(__name__)


class ParamLayout:
    """Where each prunable parameter lies in the flat vector of length d."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.numels = {n: p.numel() for n, p in params.items()}
        self.offsets: dict[str, int] = {}
        offset = 0
        for n in self.names:
            self.offsets[n] = offset
            offset += self.numels[n]
        self.d = offset

    def slice(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + self.numels[name])

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(d,) vector from ``{name: tensor}``."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` views of a (d,) vector (or (..., d): leading dims kept)."""
        lead = vector.shape[:-1]
        return {n: vector[..., self.slice(n)].reshape(*lead, *self.shapes[n]) for n in self.names}


class GradientSampler:
    """Samples m gradients of the prunable parameters into an (m, d) buffer."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        masks: dict[str, torch.Tensor],
        dataset: Dataset,
        loss_fn: nn.Module,
        *,
        num_grads: int,
        grad_batch: int = 1,
        labels: str = "empirical",
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ):
        if num_grads < 1 or grad_batch < 1:
            raise WfcoreError("fisher.num_grads and fisher.grad_batch must be >= 1")
        if labels not in ("empirical", "sampled"):
            raise WfcoreError(f"fisher.labels: '{labels}' is not one of empirical, sampled")
        self.model = model
        self.params = params
        self.masks = masks
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.num_grads = num_grads
        self.grad_batch = grad_batch
        self.labels = labels
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.layout = ParamLayout(params)
        self.generator = torch.Generator().manual_seed(seed)
        self.seconds = 0.0  # time spent sampling, for the report's timings
        self.last: torch.Tensor | None = None  # (m, d) of the last call

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.grad_batch, shuffle=True,
                            drop_last=len(self.dataset) >= self.grad_batch,
                            generator=self.generator)
        while True:
            yield from loader

    def _targets(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.labels == "sampled":
            probs = torch.softmax(logits.detach().float(), dim=-1)
            return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(
                logits.device)
        return y

    def sample(self, num_grads: int | None = None) -> torch.Tensor:
        """(m, d) gradients at the current weights, pruned coordinates zero."""
        m = num_grads or self.num_grads
        start = time.perf_counter()
        G = torch.empty(m, self.layout.d, dtype=self.dtype, device=self.device)  # (m, d)
        was_training = self.model.training
        self.model.eval()
        batches = self._batches()
        names = self.layout.names
        try:
            for i in tqdm(range(m), desc="gradients", unit="grad", leave=False,
                          disable=not self.progress or m < 50):
                x, y = next(batches)
                x, y = x.to(self.device), y.to(self.device)
                logits = self.model(x)
                loss = self.loss_fn(logits, self._targets(logits, y))
                grads = torch.autograd.grad(loss, [self.params[n] for n in names])
                for n, g in zip(names, grads):
                    row = G[i, self.layout.slice(n)]
                    row.copy_((g * self.masks[n]).reshape(-1))
                if not torch.isfinite(G[i]).all():
                    bad = next(n for n in names if not torch.isfinite(G[i, self.layout.slice(n)]).all())
                    raise WfcoreError(f"non-finite gradient in parameter '{bad}'")
        finally:
            self.model.train(was_training)
        self.seconds += time.perf_counter() - start
        self.last = G
        return G

    def mean_gradient(self) -> dict[str, torch.Tensor]:
        """Mean of the last sampled gradients (sampled now if none), as ``{name: tensor}``."""
        G = self.last if self.last is not None else self.sample()
        return self.layout.unflatten(G.mean(dim=0).float())
