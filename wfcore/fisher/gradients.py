"""Gradient sampling into a gradient store (``wfcore.fisher.store``), shared by the estimators.

Each of the m rows is the gradient of the mean loss over ``grad_batch`` samples, taken
at the current masked weights with the model in eval mode, flattened over the prunable
parameters in their fixed order (``ParamLayout``). Labels are the data's (``empirical``)
or drawn from the model's own softmax (``sampled``: no labels needed).

With ``grad_batch`` 1, per-sample gradients come from torch.func (``vmap`` over ``grad`` of
a functional call), a chunk of rows at a time; with ``grad_batch`` > 1 a row is one batched
backward pass over its samples. ``method="loop"`` is the plain one-backward-per-row
reference (and the fallback for models that vmap cannot trace); ``method="auto"`` (what a
run uses) times both, and vmap's chunk sizes, on the model at hand first
(``grad_calibration.py``). Rows are written into the
store a chunk at a time: in memory, or in a file on disk (float32 / float16 / bfloat16)
when the plan says the (m, d) matrix does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from wfcore import distributed, progress
from wfcore.choices import GRAD_METHODS, LABELS
from wfcore.errors import WfcoreError, first_line
from wfcore.fisher.grad_calibration import MethodChoice, calibrate
from wfcore.fisher.precision import full_float32, math_attention
from wfcore.fisher.store import STORAGE_DTYPES, GradientStore, rows_host
from wfcore.fisher.store_writer import StoreWriter

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 2**20  # per-sample gradients held at once by one vmap call
MAX_CHUNK = 256  # rows per vmap call


def chunk_rows(d: int) -> int:
    """Rows of d gradient values per vmap call that fit ``CHUNK_BYTES`` (float32 rows held
    before a write), at most ``MAX_CHUNK``."""
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * d)))


Write = Callable[[int, torch.Tensor], None]  # (first row, rows (c, d)) into the store


class ParamLayout:
    """Where each prunable parameter lies in the flat vector of length d."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
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
    """Samples m gradients of the prunable parameters into an (m, d) buffer, and
    mini-batches of the data: the ``wfcore.interfaces.GradientSource`` of a run."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        masks: dict[str, torch.Tensor],
        dataset: Dataset,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # a Loss (interfaces.py)
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
        if labels not in LABELS:
            raise WfcoreError(f"fisher.labels: '{labels}' is not one of {', '.join(LABELS)}")
        if isinstance(dtype, str):
            if dtype not in STORAGE_DTYPES:
                raise WfcoreError(f"fisher.storage_dtype: '{dtype}' is not one of "
                                  f"{', '.join(STORAGE_DTYPES)}")
            dtype = STORAGE_DTYPES[dtype]
        if method not in GRAD_METHODS:
            raise WfcoreError(f"gradient method '{method}' is not one of "
                              f"{', '.join(GRAD_METHODS)}")
        self.model = model
        self.params = params
        self.masks = masks
        if not isinstance(dataset, Sized):  # (wfcore.interfaces imports this module)
            raise TypeError(f"{type(dataset).__name__} has no length: a data set must be map-style")
        self.dataset = dataset
        self.size = len(dataset)
        self.loss_fn = loss_fn
        self.num_grads = num_grads
        self.grad_batch = grad_batch
        self.labels: str = labels
        self.device = torch.device(device)
        self.dtype = dtype  # storage dtype of the buffer
        self.offload = offload
        self.method: str = method
        self.choice: MethodChoice | None = None  # what ``auto`` chose (calibrated once)
        self.progress = progress
        self.layout = ParamLayout(params)
        self.seed = seed
        self.generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        """Back to the seed's sample order: the dense model then gets the same gradients
        whatever came before (each one-shot target sees one Fisher)."""
        self.generator.manual_seed(self.seed)
        self._order: torch.Tensor | None = None  # the current epoch's permutation
        self._pos = 0

    def state_dict(self) -> dict[str, Any]:
        """The random state: the generator and the place in the shuffled data; and the
        calibrated gradient method, so that a resumed run takes gradients the same way."""
        return {"generator": self.generator.get_state(), "order": self._order, "pos": self._pos,
                "choice": self.choice.record() if self.choice is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"], int(state["pos"])
        if state.get("choice"):
            self.choice = MethodChoice(**state["choice"])
            self.method = self.choice.method

    # -- data ---------------------------------------------------------------------------
    def _next_indices(self, count: int) -> torch.Tensor:
        """The next ``count`` sample indices of an endless stream of shuffled epochs.

        Both gradient methods read this one stream, so they see the same samples.
        """
        out = []
        while count > 0:
            if self._order is None or self._pos >= len(self._order):
                self._order = torch.randperm(self.size, generator=self.generator)
                self._pos = 0
            take = self._order[self._pos:self._pos + count]
            self._pos += len(take)
            count -= len(take)
            out.append(take)
        return torch.cat(out)

    def _load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples at ``indices`` as (x, y); y is None for unlabelled data."""
        batch = default_collate([self.dataset[int(i)] for i in indices])
        if torch.is_tensor(batch):
            return batch.to(self.device), None
        x = batch[0].to(self.device)
        return x, (batch[1].to(self.device) if len(batch) > 1 else None)

    def _targets(self, logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.labels == "sampled":
            probs = torch.softmax(logits.detach().float(), dim=-1)
            return self._draw(probs).to(logits.device)
        if y is None:
            raise WfcoreError("fisher.labels=empirical needs labelled data; "
                              "use fisher.labels=sampled for unlabelled data")
        return y

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """(n,) labels drawn from ``probs`` (n, classes) with the sampler's generator (CPU)."""
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1)

    def batches(self, samples: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` mini-batches on the device, ``samples`` samples in all, in
        the order of a loader shuffled by the sampler's generator (reshuffled for each pass
        over the data). ``sampled`` labels are drawn from the model's softmax (eval mode, no
        gradients) with the same generator."""
        if self.size == 0:
            raise WfcoreError("fisher: the training samples pruning may see are empty")
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True,
                            generator=self.generator)
        done = 0
        while done < samples:
            for batch in loader:
                x, y = (batch, None) if torch.is_tensor(batch) else \
                    (batch[0], batch[1] if len(batch) > 1 else None)
                x = x[:samples - done].to(self.device)
                y = None if y is None else y[:samples - done].to(self.device)
                if self.labels == "sampled":
                    was_training = self.model.training
                    self.model.eval()
                    with torch.no_grad():
                        y = self._targets(self.model(x), None)
                    self.model.train(was_training)
                else:
                    y = self._targets(x, y)  # the data's labels (an error if it has none)
                yield x, y
                done += len(x)
                if done >= samples:
                    return

    def _chunk_rows(self) -> int:
        if self.choice is not None:
            return self.choice.chunk
        return self.max_chunk_rows()

    def max_chunk_rows(self) -> int:
        """Rows per vmap call that fit ``CHUNK_BYTES`` (``chunk_rows``)."""
        return chunk_rows(self.layout.d)

    # -- sampling -----------------------------------------------------------------------
    def sample(self, num_grads: int | None = None) -> torch.Tensor:
        """(m, d) gradients at the current weights, pruned coordinates zero, in memory."""
        m = num_grads or self.num_grads
        host, pin = rows_host(self.device, self.offload)
        store = GradientStore(m, self.layout.d, dtype=self.dtype, device=host, pin=pin)
        self.sample_into(store)
        return store.tensor()

    @full_float32()
    def sample_into(self, store: GradientStore) -> GradientStore:
        """Write ``store.m`` gradient rows at the current weights into ``store``, each row
        exactly once, a chunk of rows at a time. Pruned coordinates are zero.

        ``grad_batch`` 1: per-sample gradients with torch.func (vmap over grad), a chunk of
        rows per call. ``grad_batch`` > 1: a row is the gradient of the mean loss over its
        samples, one batched backward pass per row.
        """
        if store.d != self.layout.d:
            raise ValueError(f"a store of width {store.d} for {self.layout.d} gradient values")
        was_training = self.model.training
        self.model.eval()
        if self.method == "auto":  # the fastest way for this model, found once
            self.choice = calibrate(self, store.m)
            self.method = self.choice.method
        bar = tqdm(total=store.m, desc="gradients", unit="grad", leave=False, delay=1,
                   disable=progress.disabled(not self.progress, store.m < 50))
        try:
            # a disk store is written by a thread of its own while the next rows are computed
            with (StoreWriter(store) if store.place == "disk" else nullcontext()) as writer:
                write = writer.write if writer is not None else store.write
                if self.method == "vmap" and self.grad_batch == 1:
                    try:
                        with math_attention():
                            self._sample_vmap(store, write, bar)
                    except WfcoreError:
                        raise
                    except Exception as exc:  # a model torch.func cannot trace
                        log.warning("per-sample gradients with torch.func failed (%s: %s); "
                                    "falling back to one backward pass per gradient",
                                    type(exc).__name__, first_line(exc))
                        self.method = "loop"
                        bar.reset()
                        self._sample_loop(store, write, bar)
                else:
                    self._sample_loop(store, write, bar)
        finally:
            bar.close()
            self.model.train(was_training)
        if store.shared:  # every rank's rows written before any rank reads
            distributed.barrier()
        store.finish_rows()
        return store

    def _flat_rows(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(c, d) masked, checked rows from ``{name: (c, *shape)}`` gradients."""
        first = grads[self.layout.names[0]]
        c = first.shape[0]
        # each parameter's masked gradients straight into its columns of one (c, d) tensor:
        # no masked copy and no concatenation of them (ResNet-50: 100 MB a row, each copy
        # a pass over fresh memory)
        out = torch.empty(c, self.layout.d, dtype=first.dtype, device=first.device)
        for n in self.layout.names:
            a = self.layout.offsets[n]
            torch.mul(grads[n].reshape(c, -1), self.masks[n].reshape(1, -1),
                      out=out[:, a:a + self.layout.numels[n]])
        # one reduction finds a non-finite value (an overflow of the sum of finite ones
        # too, so then each parameter is checked)
        if not bool(torch.isfinite(out.sum())):
            for n in self.layout.names:
                a = self.layout.offsets[n]
                if not bool(torch.isfinite(out[:, a:a + self.layout.numels[n]]).all()):
                    raise WfcoreError(f"non-finite gradient in parameter '{n}'")
        return out

    @staticmethod
    def _put(store: GradientStore, write: Write, start: int, lo: int, rows: torch.Tensor,
             count: int) -> None:
        """This rank's ``rows`` (rows ``lo..`` of the ``count`` rows at ``start``) into
        ``store`` through ``write``: alone into a store the ranks share, else gathered with
        the others' first (every rank then writes the whole chunk into its own store)."""
        if store.shared:
            if len(rows):
                write(start + lo, rows)
        else:
            write(start, distributed.gather_rows(rows, count))

    def _sample_loop(self, store: GradientStore, write: Write, bar: tqdm) -> None:
        names, chunk = self.layout.names, self._chunk_rows()
        for i in range(0, store.m, chunk):
            c = min(chunk, store.m - i)
            lo, hi = distributed.share(c)  # this rank's rows of the chunk (all in one process)
            rows = []
            for j in range(c):
                indices = self._next_indices(self.grad_batch)  # every rank draws every row's
                if lo <= j < hi:
                    x, y = self._load(indices)
                    logits = self.model(x)
                    loss = self.loss_fn(logits, self._targets(logits, y))
                    grads = torch.autograd.grad(loss, [self.params[n] for n in names])
                    rows.append(self._flat_rows({n: g.unsqueeze(0)
                                                 for n, g in zip(names, grads, strict=True)}))
                elif self.labels == "sampled":  # another rank's row: its label draw, in step
                    with torch.no_grad():
                        self._targets(self.model(self._load(indices)[0]), None)
            mine = torch.cat(rows) if rows else torch.zeros(0, self.layout.d, device=self.device)
            self._put(store, write, i, lo, mine, c)
            bar.update(c)

    def row_grads(self) -> tuple[Callable[..., dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """(row_grad, prunable): ``row_grad(prunable, x (c, b, ...), y (c, b))`` gives the
        ``{name: (c, *shape)}`` gradients of c rows at once (torch.func: vmap over grad)."""
        from torch.func import functional_call, grad, vmap

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

        return vmap(grad(row_loss), in_dims=(None, 0, 0)), prunable

    def _sample_vmap(self, store: GradientStore, write: Write, bar: tqdm) -> None:
        m, b, model = store.m, self.grad_batch, self.model
        row_grad, prunable = self.row_grads()
        chunk = self._chunk_rows()
        i = 0
        while i < m:
            c = min(chunk, m - i)
            indices = self._next_indices(c * b)  # (c*b,): every rank draws the whole chunk's
            lo, hi = distributed.share(c)  # and computes its rows of it
            x, y = self._load(indices[lo * b:hi * b]) if hi > lo else (None, None)
            if self.labels == "sampled":  # the chunk's labels drawn at once, from all its rows
                probs = None
                if x is not None:
                    with torch.no_grad():
                        probs = torch.softmax(model(x).detach().float(), dim=-1).cpu()
                probs = torch.cat(distributed.gather_objects(probs))  # (c*b, classes)
                y = self._draw(probs)[lo * b:hi * b].to(self.device)
            elif x is not None:
                y = self._targets(x, y)
            if x is not None and y is not None:  # (this rank has rows: hi > lo)
                grads = row_grad(prunable, x.reshape(hi - lo, b, *x.shape[1:]),
                                 y.reshape(hi - lo, b, *y.shape[1:]))
                mine = self._flat_rows(grads)
            else:
                mine = torch.zeros(0, self.layout.d, device=self.device)
            self._put(store, write, i, lo, mine, c)
            i += c
            bar.update(c)
