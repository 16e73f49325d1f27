"""Gradient sampling into a preallocated (m, d) buffer, shared by the estimators.

Each of the m rows is the gradient of the mean loss over ``grad_batch`` samples, taken
at the current masked weights with the model in eval mode, flattened over the prunable
parameters in their fixed order (``ParamLayout``). Labels are the data's (``empirical``)
or drawn from the model's own softmax (``sampled``: no labels needed).

Per-sample gradients come from torch.func (``vmap`` over ``grad`` of a functional call),
a chunk of rows at a time, streamed into the buffer; ``method="loop"`` is the plain
one-backward-per-row reference (and the fallback for models that vmap cannot trace).
The buffer may be stored in float16 / bfloat16 and kept in (pinned) CPU memory
(``offload``) for models whose (m, d) buffer does not fit beside them on the GPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from wfcore.errors import WfcoreError, first_line

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_BYTES = 256 * 2**20  # per-sample gradients held at once by one vmap call
MAX_CHUNK = 256  # rows per vmap call


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
        dtype: torch.dtype | str = torch.float32,
        offload: bool = False,
        method: str = "vmap",
        progress: bool = True,
    ):
        if num_grads < 1 or grad_batch < 1:
            raise WfcoreError("fisher.num_grads and fisher.grad_batch must be >= 1")
        if labels not in ("empirical", "sampled"):
            raise WfcoreError(f"fisher.labels: '{labels}' is not one of empirical, sampled")
        if isinstance(dtype, str):
            if dtype not in STORAGE_DTYPES:
                raise WfcoreError(f"fisher.storage_dtype: '{dtype}' is not one of "
                                  f"{', '.join(STORAGE_DTYPES)}")
            dtype = STORAGE_DTYPES[dtype]
        if method not in ("vmap", "loop"):
            raise WfcoreError(f"gradient method '{method}' is not one of vmap, loop")
        self.model = model
        self.params = params
        self.masks = masks
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.num_grads = num_grads
        self.grad_batch = grad_batch
        self.labels = labels
        self.device = torch.device(device)
        self.dtype = dtype  # storage dtype of the buffer
        self.offload = offload
        self.method = method
        self.progress = progress
        self.layout = ParamLayout(params)
        self.seed = seed
        self.generator = torch.Generator()
        self.reset()
        self.seconds = 0.0  # time spent sampling, for the report's timings
        self.last: torch.Tensor | None = None  # (m, d) of the last call

    def reset(self) -> None:
        """Back to the seed's sample order: the dense model then gets the same gradients
        whatever came before (each one-shot target sees one Fisher)."""
        self.generator.manual_seed(self.seed)
        self._order: torch.Tensor | None = None  # the current epoch's permutation
        self._pos = 0

    def state_dict(self) -> dict[str, Any]:
        """The random state: the generator and the place in the shuffled data."""
        return {"generator": self.generator.get_state(), "order": self._order, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"], int(state["pos"])

    # -- data ---------------------------------------------------------------------------
    def _next_indices(self, count: int) -> torch.Tensor:
        """The next ``count`` sample indices of an endless stream of shuffled epochs.

        Both gradient methods read this one stream, so they see the same samples.
        """
        out = []
        while count > 0:
            if self._order is None or self._pos >= len(self._order):
                self._order = torch.randperm(len(self.dataset), generator=self.generator)
                self._pos = 0
            take = self._order[self._pos:self._pos + count]
            self._pos += len(take)
            count -= len(take)
            out.append(take)
        return torch.cat(out)

    def _fetch(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``count`` samples as (x, y); y is None for unlabelled data."""
        batch = default_collate([self.dataset[int(i)] for i in self._next_indices(count)])
        if torch.is_tensor(batch):
            return batch.to(self.device), None
        x = batch[0].to(self.device)
        return x, (batch[1].to(self.device) if len(batch) > 1 else None)

    def _targets(self, logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.labels == "sampled":
            probs = torch.softmax(logits.detach().float(), dim=-1)
            return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(
                logits.device)
        if y is None:
            raise WfcoreError("fisher.labels=empirical needs labelled data; "
                              "use fisher.labels=sampled for unlabelled data")
        return y

    def _buffer(self, m: int) -> torch.Tensor:
        device = torch.device("cpu") if self.offload else self.device
        pin = self.offload and self.device.type == "cuda"
        return torch.empty(m, self.layout.d, dtype=self.dtype, device=device, pin_memory=pin)

    def _chunk_rows(self) -> int:
        per_row = self.layout.d * 4 * max(self.grad_batch, 1)
        return max(1, min(MAX_CHUNK, CHUNK_BYTES // per_row))

    # -- sampling -----------------------------------------------------------------------
    def sample(self, num_grads: int | None = None) -> torch.Tensor:
        """(m, d) gradients at the current weights, pruned coordinates zero."""
        m = num_grads or self.num_grads
        start = time.perf_counter()
        G = self._buffer(m)  # (m, d), storage dtype
        was_training = self.model.training
        self.model.eval()
        try:
            if self.method == "vmap":
                try:
                    self._sample_vmap(G)
                except WfcoreError:
                    raise
                except Exception as exc:  # a model torch.func cannot trace
                    log.warning("per-sample gradients with torch.func failed (%s: %s); "
                                "falling back to one backward pass per gradient",
                                type(exc).__name__, first_line(exc))
                    self.method = "loop"
                    self._sample_loop(G)
            else:
                self._sample_loop(G)
        finally:
            self.model.train(was_training)
        self.seconds += time.perf_counter() - start
        self.last = G
        return G

    def _store(self, G: torch.Tensor, rows: slice, grads: dict[str, torch.Tensor]) -> None:
        """Mask, check and copy (c, *shape) gradients into rows of the buffer."""
        for n in self.layout.names:
            g = grads[n] * self.masks[n]
            if not torch.isfinite(g).all():
                raise WfcoreError(f"non-finite gradient in parameter '{n}'")
            G[rows, self.layout.slice(n)].copy_(g.reshape(g.shape[0], -1))

    def _sample_loop(self, G: torch.Tensor) -> None:
        m, names = G.shape[0], self.layout.names
        for i in tqdm(range(m), desc="gradients", unit="grad", leave=False, delay=1,
                      disable=not self.progress or m < 50):
            x, y = self._fetch(self.grad_batch)
            logits = self.model(x)
            loss = self.loss_fn(logits, self._targets(logits, y))
            grads = torch.autograd.grad(loss, [self.params[n] for n in names])
            rows = {n: g.unsqueeze(0) for n, g in zip(names, grads, strict=True)}
            self._store(G, slice(i, i + 1), rows)

    def _sample_vmap(self, G: torch.Tensor) -> None:
        from torch.func import functional_call, grad, vmap

        m, b = G.shape[0], self.grad_batch
        prunable = {n: p.detach() for n, p in self.params.items()}
        fixed = {n: t.detach() for n, t in
                 [*self.model.named_parameters(), *self.model.named_buffers()]
                 if n not in prunable}
        model, loss_fn = self.model, self.loss_fn

        def row_loss(weights: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
            # x: (b, *input), y: (b,): the mean loss of one gradient's samples
            logits = functional_call(model, {**fixed, **weights}, (x,))
            return loss_fn(logits, y)

        row_grad = vmap(grad(row_loss), in_dims=(None, 0, 0))
        chunk = self._chunk_rows()
        bar = tqdm(total=m, desc="gradients", unit="grad", leave=False, delay=1,
                   disable=not self.progress or m < 50)
        i = 0
        while i < m:
            c = min(chunk, m - i)
            x, y = self._fetch(c * b)
            if self.labels == "sampled":
                with torch.no_grad():
                    y = self._targets(model(x), None)
            else:
                y = self._targets(x, y)
            grads = row_grad(prunable, x.reshape(c, b, *x.shape[1:]), y.reshape(c, b))
            self._store(G, slice(i, i + c), grads)
            i += c
            bar.update(c)
        bar.close()

    def mean_gradient(self) -> dict[str, torch.Tensor]:
        """Mean of the last sampled gradients (sampled now if none), as ``{name: tensor}``."""
        G = self.last if self.last is not None else self.sample()
        mean = G.float().mean(dim=0) if G.dtype != torch.float32 else G.mean(dim=0)
        return self.layout.unflatten(mean.to(self.device))
