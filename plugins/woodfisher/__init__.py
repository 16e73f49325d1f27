"""WoodFisher: the empirical Fisher, blockwise, inverted with the Woodbury identity.

Lifecycle (``WoodFisher.fit``): cut the flat weights into blocks -> group consecutive
blocks into chunks whose working set fits the memory budget -> for each chunk, read its
columns of the step's (m, d) gradient store, factorise its blocks (blocks of one size
batched) and keep only diag(F^-1) -> the ``WoodFisherCurvature`` answers
``inverse_diagonal`` from that, and ``inverse_mul`` and ``prune_update`` by streaming the
chunks again (factors cached instead when all of them fit the budget; each streamed pass
in the direction opposite to the one before, so that it starts with the chunks the page
cache still holds; the update's pass also takes the quadratic model's value of the step's
change, which the safeguard's record asks for next) -> it is dropped with the store after
the pruning step. On CUDA the chunks go to the GPU; the store stays
on the host. Under torchrun the chunks are dealt to the ranks and the per-weight results
summed over them (``wfcore.distributed``). The chunking changes only the order of the
work: every block is solved the same way, so scores, masks and updates equal those of
one chunk holding every block.

Per block, with G the (m, B) gradients of its weights and damp = lambda,

    F = lambda*I + (1/m) G^T G.

Damping (``damp_mode``): ``relative`` (the default) reads ``damp`` in units of the
Fisher's own scale, lambda = damp * mean(diag(G^T G / m)) over all live prunable weights
(``fisher_scale``), so one value means the same on any model, loss scale or m;
``absolute`` uses ``damp`` as lambda itself. The scale is one number for all blocks: the
scores of different blocks meet in one global threshold, and a per-block lambda would
rescale whole blocks against each other (w_q^2 lambda / 2 for weights the data does not
constrain).

Forms (``form``): ``dual``, ``primal``, ``recursive`` or ``auto``; the per-block algebra
of each is in ``wfcore.plugins.woodfisher.algebra``.

Blocks (``block_size``): ``full`` is one block over all prunable weights (layers coupled),
``layer`` one block per parameter, an int cuts each parameter's flat weights into
contiguous chunks of that size (the last chunk of a parameter may be shorter). Blocks of
equal size are stacked and solved batched (bmm, batched Cholesky) on ``device``.

Safeguards: a failed Cholesky raises that block's damping x10 (logged, up to 8 times; the
streamed passes reuse the damping the fit settled on); non-finite gradients are an error
naming the parameter (sampler); the chunks are planned against the memory budget before
anything is read, and a block that alone does not fit is refused with the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import torch
from tqdm.auto import tqdm
from wfcore.plugins.diag_fisher import live_mean
from wfcore.plugins.woodfisher.algebra import (
    PROBE_BYTES,
    PROBE_MAX_BLOCK,
    BlockGroup,
    choose_form,
    group_pairs,
    memory_needed,
    pair_entries,
    probe_seconds,
)

from wfcore import (
    DAMP_MODES,
    UPDATE_MODES,
    Curvature,
    EstimatorCost,
    GradientRows,
    HessianEstimator,
    ParamLayout,
    PruningProblem,
    Tensors,
    WfcoreError,
    available_memory,
    distributed,
    hookimpl,
    progress,
)
from wfcore.masks import to_groups

log = logging.getLogger(__name__)

FORMS = ("auto", "dual", "primal", "recursive")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_MEMORY_SHARE = 0.25  # of the solve device's free memory, when max_memory_gb is null
CPU_MEMORY_CAP = 4 * 2**30  # ... and at most this on a CPU


@dataclass
class WoodFisherOptions:
    # relative: lambda = damp * mean(diag(G^T G / m)) over all live weights, unit-free.
    # 0.1 had the best worst-case margin over magnitude of {0.1, 1, 10} across the seven
    # pairs of the README's robustness table (chosen on all of them, not on one).
    # absolute: lambda = damp (the paper's 1e-5 on MNIST, in F's units).
    damp: float = 0.1
    damp_mode: str = "relative"  # relative | absolute
    # int | layer | full. 500 with m=1000 (primal form) was the best on both MNIST models
    # (mnist_cnn, 95%, joint: 80.0% against 78.6% for full and 76.7% for layer).
    block_size: Union[int, str] = 500
    form: str = "auto"  # auto (dual if m < B else primal) | dual | primal | recursive
    dtype: str = "float64"  # dtype of the solves; float64 keeps 1 - colsum(...) accurate
    device: str = "auto"  # where the solves run: auto = the run's device | cpu | cuda[:N]
    # memory budget of the solves: blocks are factorised in chunks that fit it, and a block
    # that alone does not is refused before any gradient is sampled. null = a quarter of the
    # free memory of the solve device, at most 4 GiB on a CPU (the store, the model and the
    # per-weight results need the rest)
    max_memory_gb: Optional[float] = None

    def validate(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.damp_mode not in DAMP_MODES:
            raise ValueError(f"damp_mode '{self.damp_mode}' is not one of {', '.join(DAMP_MODES)}")
        if isinstance(self.block_size, str) and self.block_size not in ("layer", "full"):
            raise ValueError(f"block_size '{self.block_size}' is not an int, layer or full")
        if isinstance(self.block_size, int) and self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.form not in FORMS:
            raise ValueError(f"form '{self.form}' is not one of {', '.join(FORMS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")


def block_starts(layout: ParamLayout, block_size: int | str) -> dict[int, list[int]]:
    """{block size: flat offsets of the blocks of that size}, in flat order."""
    if block_size == "full":
        return {layout.d: [0]}
    groups: dict[int, list[int]] = {}
    for n in layout.names:
        start, numel = layout.offsets[n], layout.numels[n]
        size = numel if block_size == "layer" else int(block_size)
        for offset in range(0, numel, size):
            groups.setdefault(min(size, numel - offset), []).append(start + offset)
    return groups


def fisher_scale(source: GradientRows) -> float:
    """mean(diag(G^T G / m)) over the live columns of the gradients (weights pruned earlier,
    with all-zero columns, do not dilute it); 1.0 when no column is live. One streamed pass
    over the store's columns."""
    return live_mean(source.square_mean())


def absolute_damp(damp: float, mode: str, source: GradientRows) -> float:
    """lambda: ``damp`` itself (absolute) or ``damp * fisher_scale(source)`` (relative)."""
    if mode == "absolute":
        return damp
    if mode != "relative":
        raise ValueError(f"damp mode '{mode}' is not one of {', '.join(DAMP_MODES)}")
    return damp * fisher_scale(source)


@dataclass
class Chunk:
    """Consecutive blocks solved together: columns ``start:stop`` of the gradient store."""

    start: int
    stop: int
    groups: dict[int, list[int]]  # {block size B: flat offsets of its blocks}
    nbytes: int  # working set of the chunk's solves


def block_bytes(form: str, m: int, B: int, itemsize: int) -> int:
    """Working set of one block's factorisation (kept + transient)."""
    kept, transient = memory_needed(form, 1, m, B, itemsize)
    return kept + transient


def plan_chunks(layout: ParamLayout, block_size: int | str, form: str, m: int, itemsize: int,
                budget: int) -> list[Chunk]:
    """Consecutive blocks in flat order, as many to a chunk as fit ``budget`` bytes (the
    chunk's columns in the solve dtype included). A block that alone exceeds the budget is
    refused with the numbers."""
    blocks = sorted((o, B) for B, offsets in block_starts(layout, block_size).items()
                    for o in offsets)
    chunks: list[Chunk] = []
    current: Chunk | None = None
    for offset, B in blocks:
        cost = block_bytes(choose_form(form, m, B), m, B, itemsize) + m * B * itemsize
        if cost > budget:
            raise WfcoreError(
                f"woodfisher: {describe_block(layout, offset, B)} (form "
                f"{choose_form(form, m, B)}, m={m}) needs {cost / 2**30:.2f} GiB, more than the "
                f"{budget / 2**30:.2f} GiB memory budget; use a smaller estimator.block_size, "
                "form=dual, fewer fisher.num_grads, estimator.dtype=float32 or a larger "
                "estimator.max_memory_gb")
        if current is None or current.nbytes + cost > budget:
            current = Chunk(offset, offset, {}, 0)
            chunks.append(current)
        current.groups.setdefault(B, []).append(offset)
        current.stop, current.nbytes = offset + B, current.nbytes + cost
    return chunks


def algebra_flops(layout: ParamLayout, block_size: int | str, form: str,
                  m: int) -> tuple[float, float]:
    """Floating-point operations of the fit (diag(F^-1)) and of one update, all blocks."""
    fit = update = 0.0
    for B, offsets in block_starts(layout, block_size).items():
        f = choose_form(form, m, B)
        if f == "dual":  # G G^T, Cholesky, L^-1 G; update: G_R G_R^T, Cholesky, products
            one = (3 * m * m * B + m ** 3 / 3, 2 * m * m * B + m ** 3 / 3)
        elif f == "primal":  # G^T G, Cholesky, inverse; update: S solve
            one = (m * B * B + B ** 3 / 3 + 2 * B ** 3, B ** 3 / 3)
        else:
            one = (4 * m * B * B, B ** 3 / 3)
        fit, update = fit + one[0] * len(offsets), update + one[1] * len(offsets)
    return fit, update


class WoodFisherCurvature(Curvature):
    """F^-1 of every block of the prunable weights, answered chunk by chunk.

    diag(F^-1) is kept (computed at fit); products and updates stream the chunks through
    ``groups()``, re-reading the store and re-factorising with the damping the fit settled
    on, unless the fit cached every chunk's factors.
    """

    def __init__(self, layout: ParamLayout, source: GradientRows, chunks: list[Chunk],
                 damps: list[dict[int, torch.Tensor]], diag: torch.Tensor,
                 options: WoodFisherOptions, device: torch.device, out_device: torch.device,
                 cache: list[tuple[torch.Tensor, BlockGroup]] | None):
        self.layout, self.source, self.chunks, self.damps = layout, source, chunks, damps
        self.diag, self.options, self.cache = diag, options, cache
        self.device, self.dtype, self.out_device = device, DTYPES[options.dtype], out_device
        self.backward = False  # the direction of the last pass over the chunks (the fit's)
        # the change of the last update (flat, solve dtype: dw where kept, -w where pruned)
        # and its dw^T F dw / 2, taken in the update's pass
        self.last_change: tuple[torch.Tensor, float] | None = None

    def groups(self) -> Iterator[tuple[torch.Tensor, BlockGroup]]:
        """(flat indices (n, B), the group's factors) of every block group of this rank's
        chunks (all of them in one process), chunk by chunk.

        Streamed passes alternate their direction: the fit read the chunks first to last,
        the next pass reads them last to first, and so on. Of a disk store larger than the
        page cache, the chunks a pass read last are the ones still cached, and the next
        pass starts with them (the same direction again would evict each chunk just before
        reading it). Each block's answer does not depend on the order.
        """
        if self.cache is not None:
            yield from self.cache
            return
        order = list(zip(self.chunks, self.damps, strict=True))
        self.backward = not self.backward
        for chunk, damps in tqdm(order[::-1] if self.backward else order,
                                 desc="woodfisher pass", unit="chunk", leave=False, delay=1,
                                 disable=progress.disabled(len(order) < 2)):
            yield from chunk_groups(self.layout, self.source, chunk, damps, self.options,
                                    self.device)

    def _flat(self, tensors: Tensors) -> torch.Tensor:
        return self.layout.flatten({n: t.to(self.device, self.dtype) for n, t in
                                    tensors.items()})

    def _out(self, flat: torch.Tensor) -> Tensors:
        return {n: t.to(self.out_device) for n, t in self.layout.unflatten(flat).items()}

    def _map(self, fn, *flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.layout.d, dtype=self.dtype, device=self.device)
        for idx, group in self.groups():
            out[idx] = fn(group, *(f[idx] for f in flat))
        return distributed.sum_(out)  # each rank filled its own chunks' blocks

    def inverse_diagonal(self) -> Tensors:
        return self._out(self.diag)

    def inverse_mul(self, v: Tensors) -> Tensors:
        return self._out(self._map(BlockGroup.mul, self._flat(v)))

    def inverse_blocks(self, block: int) -> Tensors:
        """[F^-1]_GG of every ``structure.block`` group (``Curvature.inverse_blocks``), in
        the solve dtype: b^2 numbers a group of b weights (b = ``structure.block`` capped at
        the layer's input channels; 128 bytes a weight for blocks of 4 in float64). Entries
        across two curvature blocks are 0 (F^-1 is block-diagonal); streamed, cached and
        dealt to the ranks as ``inverse_mul``."""
        members = {n: to_groups(torch.arange(self.layout.numels[n], device=self.device)
                                .view(shape) + self.layout.offsets[n], block, -1)
                   for n, shape in self.layout.shapes.items()}  # (*group index, b)
        rows, cols, diagonal = group_pairs(list(members.values()))
        flat = distributed.sum_(pair_entries(self.groups(), rows, cols, self.dtype))
        flat[(rows < 0) & diagonal] = 1.0  # padding: rows and columns of the identity
        sizes = [g.numel() * g.shape[-1] for g in members.values()]
        return {n: t.view(*g.shape, g.shape[-1]).to(self.out_device)
                for (n, g), t in zip(members.items(), flat.split(sizes), strict=True)}

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; expected one of {UPDATE_MODES}")
        mask = self.layout.flatten({n: t.to(self.device) for n, t in prune_mask.items()})
        w_flat = self._flat(w)
        out = torch.zeros(self.layout.d, dtype=self.dtype, device=self.device)
        total = 0.0
        for idx, group in self.groups():
            q, x = mask[idx], w_flat[idx]
            # the change the step makes, dw where kept and -w where pruned: the quadratic
            # model's value of it (the safeguard's record asks next) from this pass. The
            # joint update is the quadratic's minimum under the constraint, so its value is
            # the update's own loss increase, w_Q^T S^-1 w_Q / 2 (no pass over G for it)
            if mode == "independent":
                out[idx] = -group.mul(torch.where(q, x / self.diag[idx], 0.0))
                total += float(group.quadratic(torch.where(q, -x, out[idx])).sum())
            else:
                out[idx], increase = group.joint(q, x)
                total += float(increase.sum())
        out = distributed.sum_(out)  # each rank filled its own chunks' blocks
        self.last_change = (torch.where(mask, -w_flat, out), distributed.sum_float(total))
        return self._out(out)

    def predicted_increase(self, prune_mask: Tensors, w: Tensors) -> float:
        """The quadratic model's loss increase of the joint update: sum of w_Q^T S^-1 w_Q / 2."""
        mask = self.layout.flatten({n: t.to(self.device) for n, t in prune_mask.items()})
        w_flat, total = self._flat(w), 0.0
        for idx, group in self.groups():
            total += float(group.joint(mask[idx], w_flat[idx])[1].sum())
        return distributed.sum_float(total)

    def quadratic(self, dw: Tensors) -> float:
        """dw^T F dw / 2: the quadratic model's loss increase of a weight change. Of the
        change of the last ``prune_update`` (dw where kept, -w where pruned, equal value
        for value), the value its pass took: no pass over the store."""
        flat = self._flat(dw)
        if self.last_change is not None and torch.equal(flat, self.last_change[0]):
            return self.last_change[1]
        return distributed.sum_float(sum(float(group.quadratic(flat[idx]).sum())
                                         for idx, group in self.groups()))

    def damping(self) -> float:
        """The mean lambda over all blocks (after any raise on a failed Cholesky)."""
        damps = torch.cat([d.flatten() for chunk in self.damps for d in chunk.values()])
        return float(damps.mean())


def chunk_groups(layout: ParamLayout, source: GradientRows, chunk: Chunk,
                 damps: dict[int, torch.Tensor] | float, options: WoodFisherOptions,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, BlockGroup]]:
    """The chunk's block groups: its columns read once, each size's blocks batched.

    ``damps``: each group's damping as the fit settled it ({B: (n,)}), or the fit's
    lambda for every block.
    """
    dtype = DTYPES[options.dtype]
    columns = source.columns(chunk.start, chunk.stop)  # (m, cols), storage dtype, host
    m = columns.shape[0]
    stacked = {B: stack_blocks(columns, [o - chunk.start for o in offsets], B, dtype, device)
               for B, offsets in chunk.groups.items()}  # {B: (n, m, B)}
    del columns
    for B, offsets in chunk.groups.items():
        flat = torch.tensor(offsets, device=device)[:, None] \
            + torch.arange(B, device=device)  # (n, B)

        def what(k: int, offsets=offsets, B=B) -> str:
            return describe_block(layout, offsets[k], B)

        damp = damps[B] if isinstance(damps, dict) else damps
        yield flat, BlockGroup(stacked.pop(B), damp, choose_form(options.form, m, B), what)


def stack_blocks(columns: torch.Tensor, starts: list[int], B: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(n, m, B): the blocks of B columns of ``columns`` (m, cols) at ``starts``, in
    ``dtype`` on ``device``. Each run of adjacent blocks is one strided copy with the
    conversion (a run of n blocks is the (m, n, B) view, permuted): torch.stack of the
    float16 slices and a conversion after it took 16x longer on a CPU."""
    m = columns.shape[0]
    out = torch.empty(len(starts), m, B, dtype=dtype, device=device)
    k = 0
    while k < len(starts):
        end = k + 1
        while end < len(starts) and starts[end] == starts[end - 1] + B:
            end += 1
        run = columns[:, starts[k]:starts[k] + (end - k) * B]
        out[k:end].copy_(run.view(m, end - k, B).permute(1, 0, 2))
        k = end
    return out


def memory_budget(options: WoodFisherOptions, device: torch.device) -> int:
    """Bytes the solves may use: ``max_memory_gb``, else a quarter of what is free on the
    solve device, at most 4 GiB on a CPU (larger chunks run no faster there)."""
    if options.max_memory_gb is not None:
        return int(options.max_memory_gb * 2**30)
    share = int(DEFAULT_MEMORY_SHARE * available_memory(device))
    return share if device.type == "cuda" else min(share, CPU_MEMORY_CAP)


class WoodFisher(HessianEstimator):
    Options = WoodFisherOptions
    group_blocks = True  # WoodFisherCurvature.inverse_blocks

    def __init__(self, options: WoodFisherOptions | None = None):
        self.options = options or WoodFisherOptions()

    def _device(self, device: torch.device | str) -> torch.device:
        if self.options.device == "auto":
            return torch.device(device)
        device = torch.device(self.options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise WfcoreError("estimator.device: CUDA asked for, but it is not available")
        return device

    def chunks(self, layout: ParamLayout, m: int, device: torch.device,
               ranks: int = 1) -> list[Chunk]:
        """The chunks of a fit; with ``ranks`` > 1, at least as many as there are ranks
        where the blocks allow (smaller chunks: the same blocks, solved the same way)."""
        opts = self.options
        itemsize = DTYPES[opts.dtype].itemsize
        chunks = plan_chunks(layout, opts.block_size, opts.form, m, itemsize,
                             memory_budget(opts, device))
        if len(chunks) < ranks:
            largest = max(block_bytes(choose_form(opts.form, m, B), m, B, itemsize)
                          + m * B * itemsize for B in block_starts(layout, opts.block_size))
            chunks = plan_chunks(layout, opts.block_size, opts.form, m, itemsize,
                                 max(sum(c.nbytes for c in chunks) // ranks, largest))
        return chunks

    def cost(self, layout: ParamLayout, m: int, device: torch.device | str) -> EstimatorCost:
        device = self._device(device)
        chunks = self.chunks(layout, m, device)
        # besides the chunk: diag(F^-1) and the flat vectors of an update, solve dtype
        flat = 5 * layout.d * DTYPES[self.options.dtype].itemsize
        # the fit reads the store once (a relative damp's scale comes from the sums a disk
        # store takes while it is written); an update reads it again unless the chunks'
        # factors are kept (see ``fit``), and takes the quadratic model's value of its
        # change in the same pass (the safeguard's record reads no more)
        cached = sum(c.nbytes for c in chunks) <= memory_budget(self.options, device) / 2
        fit_flops, update_flops = algebra_flops(layout, self.options.block_size,
                                                self.options.form, m)
        return EstimatorCost(
            working_bytes=max(c.nbytes for c in chunks) + flat,
            flops=fit_flops + update_flops, update_flops=update_flops,
            note=f"{sum(len(o) for c in chunks for o in c.groups.values())} blocks in "
                 f"{len(chunks)} chunk(s)" + ("" if cached else ", the update reads the store "
                                             "again (factors not kept)"),
            store_passes=1.0 if cached else 2.0, update_store_passes=0.0 if cached else 1.0)

    def stage_seconds(self, layout: ParamLayout, m: int,
                      device: torch.device | str) -> tuple[float, float]:
        """(fit, joint update) seconds of the algebra: ``PROBE_BYTES`` of blocks of the size
        holding most weights (at most a chunk's) timed as a chunk runs them
        (``probe_seconds``), and every block counted at that rate in flops
        (``algebra_flops``) per stage."""
        device = self._device(device)
        starts = block_starts(layout, self.options.block_size)
        B = max(starts, key=lambda b: b * len(starts[b]))
        form, dtype = choose_form(self.options.form, m, B), DTYPES[self.options.dtype]
        per_chunk = max(len(c.groups.get(B, [])) for c in self.chunks(layout, m, device))
        B = min(B, PROBE_MAX_BLOCK)
        n = max(1, min(PROBE_BYTES // (m * B * dtype.itemsize), per_chunk))
        fit_s, update_s = probe_seconds(form, m, B, n, dtype, device)
        probed = ParamLayout({"probe": torch.empty(n * B)})
        probe_fit, probe_update = algebra_flops(probed, B, form, m)
        fit_flops, update_flops = algebra_flops(layout, self.options.block_size,
                                                self.options.form, m)
        return fit_s * fit_flops / probe_fit, update_s * update_flops / probe_update

    def fit(self, problem: PruningProblem) -> WoodFisherCurvature:
        opts = self.options
        layout, m = problem.layout(), problem.num_grads()
        device = self._device(problem.device)
        # refuses a block that cannot fit, first
        chunks = self.chunks(layout, m, device, distributed.world())
        source = problem.gradient_rows()
        damp = absolute_damp(opts.damp, opts.damp_mode, source)
        # under torchrun the chunks are dealt to the ranks: each solves its own, and the
        # per-weight results are summed over the ranks (zero where another rank's)
        own = [chunk for k, chunk in enumerate(chunks) if distributed.owns(k)]
        diag = torch.zeros(layout.d, dtype=DTYPES[opts.dtype], device=device)
        # every chunk's factors kept when they fit half the budget (the other half is the
        # working set of an update); else the update streams the chunks again
        cache: list | None = [] if sum(c.nbytes for c in own) <= memory_budget(
            opts, device) / 2 else None
        damps = []
        for chunk in tqdm(own, desc="woodfisher", unit="chunk", leave=False, delay=1,
                          disable=progress.disabled(len(own) < 2)):
            settled = {}
            for idx, group in chunk_groups(layout, source, chunk, damp, opts, device):
                diag[idx] = group.diag()
                settled[idx.shape[1]] = group.damp
                if cache is not None:
                    cache.append((idx, group))
                else:
                    group.drop_factors()
            damps.append(settled)
        distributed.sum_(diag)
        log.info("woodfisher: %d blocks in %d chunk(s)%s, m=%d, damp %.3g (%s %g), %s on %s",
                 sum(len(o) for c in chunks for o in c.groups.values()), len(chunks),
                 " (factors cached)" if cache is not None else "", m, damp, opts.damp_mode,
                 opts.damp, opts.dtype, device)
        return WoodFisherCurvature(layout, source, own, damps, diag, opts, device,
                                   torch.device(problem.device), cache)


def describe_block(layout: ParamLayout, offset: int, size: int) -> str:
    """'the block of <size> weights at <param>[i:j]' for log and error messages."""
    name = next(n for n in reversed(layout.names) if layout.offsets[n] <= offset)
    start = offset - layout.offsets[name]
    return f"the block of {size} weights at {name}[{start}:{start + size}]"


@hookimpl
def wfcore_estimators():
    return {"woodfisher": WoodFisher}
