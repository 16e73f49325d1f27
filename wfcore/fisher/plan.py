"""The plan of a run: memory, disk and time of its first pruning step, before anything heavy.

``wfcore plan CONFIG`` prints it; ``wfcore prune`` logs it first and refuses a run that
cannot fit (``Plan.check``) before it trains or samples anything. The numbers:

- d (prunable weights), m (gradients), the samples behind them;
- the gradient store: m x d values in ``fisher.storage_dtype``, in memory when it fits in
  a quarter of the free memory (``fisher.store: auto``), else in a file in
  ``fisher.store_dir`` (default: the run directory); decided here once (``plan_store``),
  and every pruning step opens the store as planned (``Plan.store``);
- the peak working set: the model, the per-weight vectors of a step (weights, scores,
  masks, update), the gradient rows sampled at once, the store when in memory, and the
  estimator's own working set (``HessianEstimator.cost``);
- flops: the gradients (forward + backward, counted with torch's FlopCounterMode on one
  sample) and the estimator's algebra;
- time, per stage of the step (``Plan.stages``, in report.json beside the measured
  seconds of each step): the gradients from timing a few rows of this model on this
  machine the way the sampler takes them (``row_seconds``: vmap over grad at its chunk of
  rows, or the loop of backward passes), with the sampler's own calibration; the estimate
  and the prune from the estimator's timed piece of its algebra
  (``HessianEstimator.stage_seconds``; else the flops at the measured float64
  matrix-multiply rate of the solve device), split into the fit and the update, and, for
  a store on disk, the estimator's passes over it (``EstimatorCost.store_passes``, the
  update's ``update_store_passes``) at ``STORE_READ_RATE`` (the pages of a store larger
  than the page cache come from disk); the prune adds the safeguard's and the running
  statistics' forward passes (``wfcore.run.safeguard_plan``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wfcore.errors import WfcoreError
from wfcore.fisher.gradients import ParamLayout, chunk_rows
from wfcore.fisher.store import (
    DISK_MARGIN,
    STORAGE_DTYPES,
    StorePlan,
    free_disk,
    rows_host,
    store_bytes,
)
from wfcore.interfaces import EstimatorCost, HessianEstimator, Loss
from wfcore.masks import group_size

log = logging.getLogger(__name__)

STORE_MEMORY_SHARE = 0.25  # fisher.store=auto keeps the store in memory up to this share
MEMORY_SHARE = 0.9  # of the available memory a run may plan to use at its peak
GiB = 2**30
BATCH_TIMED = 16  # samples of a row of grad_batch > 1 timed at once (memory stays small)
# bytes/s of a column pass over a disk store (a read per tile of a chunk, and the copy of
# the tiles into the chunk's columns). Measured on the paper's step, a 19 GiB store read
# right after it was written: 1.1-1.2 GB/s on a 2-core machine with an NVMe disk (2.5 GB/s
# raw), most pages still in the page cache
STORE_READ_RATE = 2**30
# Peak bytes per entry of structure.block's [F^-1]_GG blocks (b numbers a weight, b the
# group size): the entries in float64 with the index pairs that gather them, and the
# scorer's copy and factor. Measured: MLPNet, WoodFisher, m = 16, blocks of 256 (10.5M
# entries) peak 1.2 GiB above blocks of 1, 122 bytes an entry; with a margin
GROUP_ENTRY_BYTES = 160


def available_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes on ``device``: MemAvailable on the host, free memory on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def store_place(setting: str, nbytes: int) -> str:
    """Where ``fisher.store`` puts an ``nbytes`` store: memory | disk."""
    if setting != "auto":
        return setting
    return "memory" if nbytes <= STORE_MEMORY_SHARE * available_memory() else "disk"


def plan_store(fisher: Any, d: int, device: torch.device, store_dir: str | Path,
               shared_host: bool = False) -> StorePlan:
    """The run's gradient store, decided once: m x d values in ``fisher.storage_dtype``, in
    memory or on disk (``store_place``), its rows where ``rows_host`` puts them, and one
    store for every rank of the machine when ``shared_host`` (torchrun on one machine) and
    the rows are in host memory."""
    dtype = STORAGE_DTYPES[fisher.storage_dtype]
    host, pin = rows_host(device, fisher.offload)
    return StorePlan(m=fisher.num_grads, d=d, dtype=fisher.storage_dtype,
                     place=store_place(fisher.store, store_bytes(fisher.num_grads, d, dtype)),
                     directory=str(store_dir), device=str(host), pin=pin,
                     shared=shared_host and host.type == "cpu")


def forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Floating-point operations of one forward pass on ``example`` (batch of one)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


_MATMUL_RATE: dict[str, float] = {}


def matmul_rate(device: torch.device) -> float:
    """Measured float64 flops per second of batched (m x B) @ (B x m) products on ``device``
    (once per process and device)."""
    key = str(device)
    if key not in _MATMUL_RATE:
        a = torch.randn(8, 256, 1024, dtype=torch.float64, device=device)
        flops, runs, start = 2 * 8 * 256 * 256 * 1024, 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < 0.3:
            a @ a.transpose(1, 2)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _MATMUL_RATE[key] = flops * runs / (time.perf_counter() - start)
    return _MATMUL_RATE[key]


def row_seconds(model: nn.Module, params: dict[str, nn.Parameter], example: torch.Tensor,
                loss_fn: Loss, target: torch.Tensor, grad_batch: int,
                method: str) -> float:
    """Seconds per gradient row (``row_timing``'s first number)."""
    return row_timing(model, params, example, loss_fn, target, grad_batch, method)[0]


def row_timing(model: nn.Module, params: dict[str, nn.Parameter], example: torch.Tensor,
               loss_fn: Loss, target: torch.Tensor, grad_batch: int,
               method: str) -> tuple[float, float]:
    """Seconds per gradient row as the sampler takes them (``wfcore.fisher.gradients``): with
    ``grad_batch`` 1, per-sample gradients by vmap over grad at the sampler's chunk of
    rows and by the loop of backward passes, the faster of the two unless ``method`` names
    one; else one batched backward pass of ``grad_batch`` samples (timed on at most
    ``BATCH_TIMED`` of them, per sample). The better of two timed calls after a first one:
    the first call of a shape costs more (vmap's much more: ResNet-50's took 12 s against
    0.4 s for the next ones), and the sampler pays that again (its own functions, its own
    fresh memory). Returns (seconds per row, the first call's extra seconds)."""
    from torch.func import functional_call, grad, vmap

    from wfcore.fisher.precision import math_attention

    d = sum(p.numel() for p in params.values())
    chunk = chunk_rows(d)
    names = list(params)
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]
             if n not in params}
    prunable = {n: p.detach() for n, p in params.items()}

    def repeat(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.expand(n, *t.shape[1:]).clone()

    def timed(run, rows: int) -> tuple[float, float]:
        """(seconds per row, the first call's extra seconds)."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times[1:]) / rows, max(times[0] - min(times[1:]), 0.0)

    batch = min(grad_batch, BATCH_TIMED)
    xb, yb = repeat(example, batch), repeat(target.to(example.device), batch)

    def loop() -> None:
        torch.autograd.grad(loss_fn(model(xb), yb), [params[n] for n in names])

    def row_loss(weights, x, y):
        return loss_fn(functional_call(model, {**fixed, **weights}, (x,)), y)

    x = repeat(example, chunk).unsqueeze(1)  # (chunk, 1, ...): one sample a row
    y = repeat(target.to(example.device), chunk).unsqueeze(1)
    row_grad = vmap(grad(row_loss), in_dims=(None, 0, 0))

    def vmapped() -> None:
        torch.cat([g.reshape(chunk, -1) for g in row_grad(prunable, x, y).values()], dim=1)

    was_training = model.training
    model.eval()
    try:
        if grad_batch != 1 or method == "loop":
            row, first = timed(loop, 1)
            return row * grad_batch / batch, first
        with math_attention():
            try:
                by_vmap = timed(vmapped, chunk)
            except Exception:  # a model torch.func cannot trace: the sampler loops too
                return timed(loop, 1)
        if method == "vmap":
            return by_vmap
        return min(by_vmap, timed(loop, 1), key=lambda t: t[0])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def write_seconds(store: StorePlan, rows: int) -> float:
    """Seconds per row of writing ``rows`` gradient rows at once into a store like ``store``
    (its dtype, place and directory; a disk store also sums the squares of its columns):
    the second of two writes of random rows, to fresh rows of a store of twice as many.
    A store directory not made yet (the run's own) is probed in its nearest existing
    parent; 0 when even that cannot be written (the run's checks say why)."""
    directory = Path(store.directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    probe = dataclasses.replace(store, m=2 * rows, shared=False, directory=str(directory))
    data = torch.randn(rows, store.d)
    try:
        with probe.open() as written:
            written.write(0, data)
            start = time.perf_counter()
            written.write(rows, data)
            return (time.perf_counter() - start) / rows
    except (OSError, WfcoreError) as exc:
        log.debug("plan: the store's write was not timed (%s)", exc)
        return 0.0


def sampling_seconds(model: nn.Module, params: dict[str, nn.Parameter],
                     example: torch.Tensor, loss_fn: Loss, target: torch.Tensor, m: int,
                     grad_batch: int, method: str, store: StorePlan | None = None) -> float:
    """Seconds of the gradient stage: m rows at ``row_timing``'s rate and its first call's
    extra once; each row's write into the store (``write_seconds``: a disk store is
    written by a thread of its own beside the computation, but on a machine whose cores
    the computation keeps busy, the cast, the column sums and the write add to it);
    where the sampler calibrates its method (``wfcore.fisher.grad_calibration``, with its rule
    for when), that calibration: its rows on one thread."""
    from wfcore.fisher.grad_calibration import MIN_GRADS, SHARE, calibration_rows

    row, first_call = row_timing(model, params, example, loss_fn, target, grad_batch, method)
    d = sum(p.numel() for p in params.values())
    if store is not None:
        row += write_seconds(store, min(chunk_rows(d), m))
    n = min(chunk_rows(d), m // SHARE)
    while n >= 2 and calibration_rows(n) > m // SHARE:
        n -= 1
    calibrates = method == "auto" and grad_batch == 1 and m >= MIN_GRADS and n >= 2
    return row * m + first_call + (calibration_rows(n) * row * torch.get_num_threads()
                                   if calibrates else 0.0)


@dataclass
class Plan:
    """The first pruning step of a run, in numbers (bytes, flops, seconds)."""

    d: int
    m: int
    grad_batch: int
    estimator: str
    store_place: str | None  # memory | disk | None (the estimator needs no gradients)
    store_dir: str
    store_bytes: int
    model_bytes: int
    working_bytes: int  # the estimator's, beside the store
    peak_bytes: int
    memory_available: int
    disk_available: int
    gradient_flops: float
    algebra_flops: float
    gradient_seconds: float
    algebra_seconds: float
    store_passes: float = 0.0  # the estimator's whole reads of a disk store
    store_read_seconds: float = 0.0  # their time at STORE_READ_RATE
    # of the algebra and of the passes, the update's (the prune stage's)
    update_algebra_seconds: float = 0.0
    update_store_passes: float = 0.0
    nproc: int = 1  # processes of a torchrun run (--nproc-per-node); the share is per rank
    # the update safeguard's and the running statistics' forward passes (safeguard_plan.py)
    safeguard_seconds: float = 0.0
    block: int = 1  # structure.block
    block_bytes: int = 0  # the group blocks [F^-1]_GG of structure.block (in peak_bytes)
    on_host: bool = True  # the ranks of one machine share its memory (CPU runs)
    notes: list[str] = field(default_factory=list)
    # the store every step opens (None: no gradients); its numbers are the fields above
    store: StorePlan | None = None

    def stages(self) -> dict[str, float]:
        """Planned seconds per stage of the step, as the step records time them: the
        gradients; the estimate (the fit's algebra and passes over a disk store); the prune
        (the update's algebra and passes, the safeguard and the running statistics)."""
        per_pass = self.store_read_seconds / self.store_passes if self.store_passes else 0.0
        update_read = per_pass * min(self.update_store_passes, self.store_passes)
        return {"gradients": self.gradient_seconds,
                "estimate": self.algebra_seconds - self.update_algebra_seconds
                + self.store_read_seconds - update_read,
                "prune": self.update_algebra_seconds + update_read + self.safeguard_seconds}

    def as_dict(self) -> dict:
        """The plan for report.json (NaN times, when not calibrated, as null), with its
        seconds per stage (``stages``)."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        out = {k: clean(v) for k, v in dataclasses.asdict(self).items() if k != "store"}
        out["stages"] = {k: clean(v) for k, v in self.stages().items()}
        return out

    def problems(self) -> list[str]:
        """What does not fit: one line each, with the numbers and what to change."""
        out = []
        ranks = self.nproc if self.on_host else 1  # processes sharing the memory
        if self.machine_bytes() > MEMORY_SHARE * self.memory_available \
                and 2 * self.block_bytes > self.peak_bytes:
            out.append(f"structure.block={self.block}: the group blocks [F^-1]_GG need "
                       f"{self.block_bytes / GiB:.2f} GiB (b^2 numbers a group of b weights, "
                       "b capped at a layer's input channels), a peak of "
                       f"{self.machine_bytes() / GiB:.2f} GiB where "
                       f"{self.memory_available / GiB:.2f} GiB are available; use a smaller "
                       "structure.block")
        elif self.machine_bytes() > MEMORY_SHARE * self.memory_available:
            what = (f"{ranks} processes' peak working sets, "
                    f"{self.machine_bytes() / GiB:.2f} GiB, are" if ranks > 1 else
                    f"the peak working set {self.peak_bytes / GiB:.2f} GiB is")
            out.append(f"{what} more than the {self.memory_available / GiB:.2f} GiB of memory "
                       "available; use fewer fisher.num_grads, a smaller estimator.block_size "
                       "or estimator.max_memory_gb, or fisher.store=disk")
        if self.store_place == "disk" and self.store_bytes + DISK_MARGIN > self.disk_available:
            out.append(f"the gradient store needs {self.store_bytes:,} bytes "
                       f"({self.store_bytes / GiB:.2f} GiB) on disk in {self.store_dir}, "
                       f"{self.disk_available:,} bytes ({self.disk_available / GiB:.2f} GiB) "
                       "free; use fewer fisher.num_grads, fisher.storage_dtype=float16 or a "
                       "fisher.store_dir on a larger file system")
        return out

    def machine_bytes(self) -> int:
        """The peak of all the ranks of one machine: with CPU processes, N working sets and
        one in-memory store (the ranks share it); on GPUs, one rank's."""
        if not self.on_host or self.nproc == 1:
            return self.peak_bytes
        store = self.store_bytes if self.store_place == "memory" else 0
        return self.nproc * (self.peak_bytes - store) + store

    def check(self) -> None:
        """Raise a one-line WfcoreError naming the first thing that does not fit."""
        problems = self.problems()
        if problems:
            raise WfcoreError(f"plan: {problems[0]}")

    def lines(self) -> list[str]:
        seconds = (self.gradient_seconds + self.algebra_seconds + self.store_read_seconds
                   + self.safeguard_seconds)
        store = ("none (the estimator needs no gradients)" if self.store_place is None else
                 f"{self.store_bytes / GiB:.3g} GiB {self.store_place}"
                 + (f" in {self.store_dir}" if self.store_place == "disk" else ""))
        out = [
            f"weights d={self.d:,}, gradients m={self.m} of {self.grad_batch} sample(s) "
            f"({self.m * self.grad_batch:,} samples), estimator {self.estimator}",
            f"gradient store: {store}",
            f"peak working set: {self.peak_bytes / GiB:.3g} GiB (model "
            f"{self.model_bytes / GiB:.3g}, estimator {self.working_bytes / GiB:.3g}"
            + (f", group blocks {self.block_bytes / GiB:.3g}" if self.block > 1 else "")
            + ") of "
            f"{self.memory_available / GiB:.3g} GiB available",
            f"flops: gradients {self.gradient_flops:.3g}, algebra {self.algebra_flops:.3g}",
            f"estimated time of the step: {format_seconds(seconds)} (gradients "
            f"{format_seconds(self.gradient_seconds)}, algebra "
            f"{format_seconds(self.algebra_seconds)}, safeguard "
            f"{format_seconds(self.safeguard_seconds)}"
            + (f", {self.store_passes:g} pass(es) over the disk store "
               f"{format_seconds(self.store_read_seconds)}" if self.store_read_seconds else "")
            + ")",
            "per stage: " + ", ".join(f"{k} {format_seconds(v)}"
                                      for k, v in self.stages().items()),
        ]
        if self.nproc > 1:
            n = self.nproc
            out.append(
                f"per rank of {n} processes: {math.ceil(self.m / n)} of the {self.m} gradient "
                f"rows, 1/{n} of the block solves: {format_seconds(seconds / n)} (gradients "
                f"{format_seconds(self.gradient_seconds / n)}, algebra "
                f"{format_seconds(self.algebra_seconds / n)}); "
                + (f"one store for the ranks of a machine, {self.machine_bytes() / GiB:.3g} "
                   "GiB at the peak on one machine" if self.on_host else
                   f"each rank holds the whole store, a peak of {self.peak_bytes / GiB:.3g} "
                   "GiB"))
        out += self.notes
        out += [f"does not fit: {p}" for p in self.problems()]
        return out


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def make_plan(*, model: nn.Module, params: dict[str, nn.Parameter], example: torch.Tensor,
              target: torch.Tensor, loss_fn: Loss, estimator: HessianEstimator,
              estimator_name: str, needs_gradients: bool, fisher, store_dir: str | Path,
              device: torch.device, calibrate: bool = True, nproc: int = 1,
              block: int = 1, shared_host: bool = False) -> Plan:
    """The plan of one pruning step of ``model`` (see the module doc).

    ``fisher`` is the config's fisher section. ``example``: one input, batch of one, on
    ``device``; ``target`` its target for ``loss_fn``, batch of one. Raises the
    estimator's WfcoreError for a fit that cannot run at all.
    ``nproc``: the processes of a torchrun run; the plan adds each rank's share.
    ``block``: ``structure.block``; with an estimator whose curvature gives the group
    blocks (``HessianEstimator.group_blocks``) they are part of the peak.
    ``shared_host``: the ranks run on one machine (they may share a host-memory store).
    """
    layout = ParamLayout(params)
    d, m, grad_batch = layout.d, fisher.num_grads, fisher.grad_batch
    store = plan_store(fisher, d, device, store_dir, shared_host) if needs_gradients else None
    nbytes = store.nbytes if store is not None else 0
    place = store.place if store is not None else None
    cost: EstimatorCost = estimator.cost(layout, m, device)
    model_bytes = sum(t.numel() * t.element_size()
                      for t in [*model.parameters(), *model.buffers()])
    rows_at_once = min(m, max(1, 256 * 2**20 // (4 * d)))  # the sampler's chunk of rows
    step_vectors = 6 * d * 8  # weights, scores, masks, update, diag copies (float64)
    blocks = (group_entries(params, block) * GROUP_ENTRY_BYTES
              if block > 1 and estimator.group_blocks else 0)
    peak = (2 * model_bytes + step_vectors + cost.working_bytes + blocks
            + (2 * rows_at_once * d * 4 if needs_gradients else 0)
            + (nbytes if place == "memory" else 0))
    fwd = forward_flops(model, example) if needs_gradients else 0.0
    samples = m * grad_batch if needs_gradients else 0
    grad_s = (0.0 if not needs_gradients else
              sampling_seconds(model, params, example, loss_fn, target, m, grad_batch,
                               fisher.get("grad_method", "auto"), store) if calibrate
              else math.nan)
    stages = estimator.stage_seconds(layout, m, device) if calibrate else None
    if stages is None:  # the flops at the measured matrix-multiply rate
        rate = matmul_rate(device) if calibrate else math.nan
        stages = ((cost.flops - cost.update_flops) / rate, cost.update_flops / rate)
    algebra_s, update_s = stages[0] + stages[1], stages[1]
    passes = cost.store_passes if place == "disk" else 0.0
    update_passes = cost.update_store_passes if place == "disk" else 0.0
    notes = [f"estimator: {cost.note}"] if cost.note else []
    return Plan(d=d, m=m, grad_batch=grad_batch, estimator=estimator_name, store_place=place,
                store_dir=str(store_dir), store_bytes=nbytes, model_bytes=model_bytes,
                working_bytes=cost.working_bytes, peak_bytes=peak,
                memory_available=available_memory(device if device.type == "cuda" else "cpu"),
                disk_available=free_disk(store_dir), gradient_flops=3 * fwd * samples,
                algebra_flops=cost.flops, gradient_seconds=grad_s, algebra_seconds=algebra_s,
                store_passes=passes, store_read_seconds=passes * nbytes / STORE_READ_RATE,
                update_algebra_seconds=update_s, update_store_passes=update_passes,
                nproc=nproc, block=block, block_bytes=blocks, on_host=device.type != "cuda",
                notes=notes, store=store)


def group_entries(params: dict[str, nn.Parameter], block: int) -> int:
    """The numbers of every ``structure.block`` group's b x b block [F^-1]_GG: b a weight,
    with a row's last group padded to b (``wfcore.masks.to_groups``)."""
    total = 0
    for p in params.values():
        b = group_size(p.shape, block)
        if b > 1:
            rows = p.numel() // p.shape[1]
            total += rows * -(-p.shape[1] // b) * b * b
        else:
            total += p.numel()
    return total
