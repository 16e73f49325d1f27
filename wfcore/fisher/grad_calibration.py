"""Which way of taking per-sample gradients is fastest for the model at hand, found by timing.

torch.func's vmap over grad computes a chunk of per-sample gradients in one call; how
large a chunk pays depends on the model (a small MLP gains from hundreds of rows per call,
a ResNet-50 holds only two rows of 25M values in the chunk budget, and a model with
operators that vmap runs one sample at a time can be slower than the plain loop of
backward passes). So before a run's first gradient stage, ``calibrate`` times a few
rows with vmap at up to three chunk sizes (the largest that fits the chunk budget and
lets the whole calibration compute at most an eighth of the m rows, a quarter and a
sixteenth of it) and with the loop, a few calls each
after a warm-up call, back to back as the sampling makes them, and keeps the fastest by
median rows per CPU second. They are timed on one thread, in CPU seconds of that thread:
on a machine that other jobs load, wall time measures the other jobs, and the CPU time
of several threads counts the time each spins waiting for another that the scheduler
parked (measured: 0.11 s of CPU for a 2 ms call, at a load average of 17 on 2 cores).
The cost on one thread ranks the methods; the sampling then runs on all threads. Not
interleaved in rounds as ``rounds.py`` does for engines: vmap's first call of a new
shape costs far more than the next ones, and the sampling pays that once. When the
largest chunk timed wins and the budget allows larger ones (the gradient count kept it
small), the largest the budget allows is used: more rows per call only amortise more.
The choice is made once per sampler and recorded (``MethodChoice.record``, in the step
records of report.json).

The calibration draws its samples from a copy of the sampler's random state and puts the
state back afterwards, so the rows of the store are those of the same samples whatever
was chosen. vmap's chunk sizes give the same rows bit for bit (each sample's gradient is
computed on its own); the loop agrees with vmap to float rounding only (its kernels sum
in another order), so it replaces vmap only when it is clearly faster (``LOOP_MARGIN``),
and the choice is part of the sampler's state (``state_dict``): a resumed run keeps it.

Calibration is skipped, and vmap used at the largest chunk, where a choice could change
more than speed or would cost too much: ``grad_batch`` > 1 (a row is one batched backward
anyway), ``sampled`` labels (the draws depend on the chunk), several ranks (they must
agree), or fewer gradients than an eighth of which could calibrate (16 at least).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from wfcore import distributed, rounds
from wfcore.errors import WfcoreError, first_line
from wfcore.fisher.precision import math_attention

log = logging.getLogger(__name__)


class GradientSampler(Protocol):
    """What the calibration reads of ``wfcore.fisher.gradients.GradientSampler`` (declared here,
    so that this module, which gradients.py calls, does not import it back)."""

    grad_batch: int
    labels: str
    params: dict[str, torch.nn.Parameter]
    model: torch.nn.Module
    loss_fn: Any

    def max_chunk_rows(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def row_grads(self) -> Any: ...

    def _load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def _next_indices(self, n: int) -> Any: ...

    def _targets(self, logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...

MIN_GRADS = 16  # fewer gradients than this: no calibration (it would cost a sizable share)
SHARE = 8  # the calibration computes at most m / SHARE rows in all
CALLS = 3  # timed calls per candidate (the median per candidate)
LOOP_MARGIN = 1.5  # the loop replaces vmap only when this much faster (module doc)


@dataclass
class MethodChoice:
    """The per-sample gradient method of a sampler, and how it was chosen."""

    method: str  # vmap | loop
    chunk: int  # rows per vmap call
    reason: str  # calibrated, or why not
    rows_per_s: dict[str, float] = field(default_factory=dict)  # {"vmap/64": .., "loop": ..}
    seconds: float = 0.0  # the calibration's cost

    def record(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(sampler: GradientSampler, m: int) -> MethodChoice:
    """Time the candidates (module doc) on ``sampler``'s model; its random state is kept."""
    largest = sampler.max_chunk_rows()
    if sampler.grad_batch != 1:
        return MethodChoice("loop", largest, "grad_batch > 1: one batched backward per row")
    n = min(largest, m // SHARE)
    while n >= 2 and calibration_rows(n) > m // SHARE:
        n -= 1
    why_not = ("sampled labels" if sampler.labels == "sampled" else
               "several ranks" if distributed.world() > 1 else
               f"fewer than {MIN_GRADS} gradients" if m < MIN_GRADS else
               "too few gradients to calibrate on an eighth of them" if n < 2 else None)
    if why_not:
        return MethodChoice("vmap", largest, f"not calibrated: {why_not}")
    state, threads = sampler.state_dict(), torch.get_num_threads()
    start = time.perf_counter()
    slots: dict[str, Any] = {}
    try:
        torch.set_num_threads(1)
        x, y = sampler._load(sampler._next_indices(n))
        y = sampler._targets(x, y)
        x, y = x.reshape(n, 1, *x.shape[1:]), y.reshape(n, 1, *y.shape[1:])
        with math_attention():
            try:
                row_grad, prunable = sampler.row_grads()
                for c in chunk_sizes(n):
                    slots[f"vmap/{c}"] = _slot(partial(row_grad, prunable, x[:c], y[:c]), c)
            except WfcoreError:
                raise
            except Exception as exc:  # a model torch.func cannot trace: the loop it is
                log.info("gradient calibration: vmap failed (%s: %s)", type(exc).__name__,
                         first_line(exc))
                slots = {}
            slots["loop"] = _slot(lambda: _loop_rows(sampler, x[:1], y[:1]), 1)
            # one candidate after another, each its calls back to back as the sampling
            # makes them (a call of a new shape costs more than one of the shape before)
            per_row = {k: [slot() for _ in range(CALLS)] for k, slot in slots.items()}
    finally:
        torch.set_num_threads(threads)
        sampler.load_state_dict(state)
    rates = {k: 1.0 / rounds.quartiles(v)[1] for k, v in per_row.items()}
    vmaps = {k: v for k, v in rates.items() if k != "loop"}
    best = max(vmaps, key=vmaps.__getitem__) if vmaps else "loop"
    if best != "loop" and rates["loop"] > LOOP_MARGIN * rates[best]:
        best = "loop"
    method, chunk = ("loop", largest) if best == "loop" else ("vmap", int(best.split("/")[1]))
    if method == "vmap" and chunk == n:  # the largest timed won: the largest that fits
        chunk = largest
    choice = MethodChoice(method, chunk, "calibrated",
                          {k: round(v, 2) for k, v in rates.items()},
                          round(time.perf_counter() - start, 3))
    log.info("per-sample gradients: %s%s (rows/s: %s; calibrated in %.1f s)", method,
             f", {chunk} rows per call" if method == "vmap" else "",
             ", ".join(f"{k} {v:.3g}" for k, v in choice.rows_per_s.items()), choice.seconds)
    return choice


def chunk_sizes(n: int) -> list[int]:
    """The vmap chunk sizes timed for a largest chunk of ``n`` rows."""
    return sorted({n, max(1, n // 4), max(1, n // 16)}, reverse=True)


def calibration_rows(n: int) -> int:
    """Rows the calibration computes with a largest chunk of ``n``: every candidate (the
    vmap chunks and the loop's one row) once untimed and ``CALLS`` times timed."""
    return (1 + CALLS) * (sum(chunk_sizes(n)) + 1)


def _slot(run: Callable[[], Any], rows: int) -> Callable[[], float]:
    """A timer of ``run`` (``rows`` rows): CPU seconds of this thread per row (see the
    module doc); one untimed call first (kernels warm up for the shape)."""
    run()

    def timed() -> float:
        start = time.thread_time()
        run()
        return (time.thread_time() - start) / rows

    return timed


def _loop_rows(sampler: GradientSampler, x: torch.Tensor, y: torch.Tensor) -> None:
    """One backward pass per row (x: (c, 1, ...)), as the loop method does."""
    params = list(sampler.params.values())
    for i in range(len(x)):
        loss = sampler.loss_fn(sampler.model(x[i]), y[i])
        torch.autograd.grad(loss, params)
