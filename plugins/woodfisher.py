"""WoodFisher: the empirical Fisher, blockwise, inverted with the Woodbury identity.

Lifecycle (``WoodFisher.fit``): sample the (m, d) gradients G of the masked weights ->
cut the flat weights into blocks -> factorise every block (blocks of one size batched) ->
the ``WoodFisherCurvature`` answers ``inverse_diagonal``, ``inverse_mul`` and
``prune_update`` -> it is dropped after the pruning step.

Per block, with G the (m, B) gradients of its weights and damp = lambda,

    F = lambda*I + (1/m) G^T G.

Damping (``damp_mode``): ``relative`` (the default) reads ``damp`` in units of the
Fisher's own scale, lambda = damp * mean(diag(G^T G / m)) over all live prunable weights
(``fisher_scale``), so one value means the same on any model, loss scale or m;
``absolute`` uses ``damp`` as lambda itself. The scale is one number for all blocks: the
scores of different blocks meet in one global threshold, and a per-block lambda would
rescale whole blocks against each other (w_q^2 lambda / 2 for weights the data does not
constrain).

Forms (``form``):
  dual       K = G G^T + m*lambda*I (m x m, Cholesky). Nothing of size B x B is formed:
             diag(F^-1) = (1 - colsum(G o K^-1 G)) / lambda, F^-1 v = (v - G^T K^-1 G v) / lambda.
             The exact joint OBS update for a pruned set Q needs S^-1 = (E_Q^T F^-1 E_Q)^-1
             = lambda * (I + G_Q^T (K - G_Q G_Q^T)^-1 G_Q); K - G_Q G_Q^T is formed directly
             as G_R G_R^T + m*lambda*I (R = the rest of the block), again m x m.
  primal     F itself (B x B, Cholesky, explicit inverse): cheaper when m >= B.
  recursive  the original method's m sequential rank-1 Woodbury updates of F^-1, starting
             from I/lambda. Slow; kept as the reference the tests and benchmarks compare to.
  auto       dual when m < B, else primal.

Blocks (``block_size``): ``full`` is one block over all prunable weights (layers coupled),
``layer`` one block per parameter, an int cuts each parameter's flat weights into
contiguous chunks of that size (the last chunk of a parameter may be shorter). Blocks of
equal size are stacked and solved batched (bmm, batched Cholesky) on ``device``.

Pruned weights. The sampler zeroes the gradient columns of already pruned weights, so
inside a block a pruned weight j has G[:, j] = 0: F couples it to nothing, [F^-1]_jj is
1/lambda and (F^-1 v)_j = v_j / lambda. Both updates are built from F^-1 applied to a
vector that is zero at j (u or x below is supported on the newly pruned set Q), so they
leave earlier pruned weights exactly where they are (zero), bit for bit: OBS over the
live weights with the earlier pruned ones held at zero, which is what the iterative
schedule needs. The pipeline re-applies the masks after every update in any case.

Safeguards: a failed Cholesky raises that block's damping x10 (logged, up to 8 times);
non-finite gradients are an error naming the parameter (sampler); the memory a fit needs
is computed before anything is allocated and a fit that does not fit is refused with it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from wfcore import hookimpl
from wfcore.errors import WfcoreError
from wfcore.gradients import ParamLayout
from wfcore.interfaces import (
    DAMP_MODES,
    UPDATE_MODES,
    Curvature,
    HessianEstimator,
    PruningProblem,
    Tensors,
)

log = logging.getLogger(__name__)

FORMS = ("auto", "dual", "primal", "recursive")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
MAX_DAMP_RAISES = 8


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
    max_memory_gb: Optional[float] = None  # refuse fits needing more; null = what is free

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


def choose_form(form: str, m: int, B: int) -> str:
    if form == "auto":
        return "dual" if m < B else "primal"
    return form


def memory_needed(form: str, n: int, m: int, B: int, itemsize: int) -> tuple[int, int]:
    """(bytes kept, transient bytes) of one group of n blocks of size B."""
    grads = n * m * B * itemsize  # (n, m, B)
    if form == "dual":
        return grads + 2 * n * m * m * itemsize, n * m * B * itemsize + 2 * n * m * m * itemsize
    return grads + n * B * B * itemsize, 2 * n * B * B * itemsize


def available_memory(device: torch.device) -> int:
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


def cholesky_raising_damp(matrix_at, damp: torch.Tensor, what) -> torch.Tensor:
    """Cholesky of ``matrix_at(damp)`` (batched); failing blocks get damp x10 (in place)."""
    for _ in range(MAX_DAMP_RAISES + 1):
        L, info = torch.linalg.cholesky_ex(matrix_at(damp))
        failed = (info != 0).nonzero().flatten().tolist()
        if not failed:
            return L
        for k in failed:
            log.warning("woodfisher: Cholesky failed for %s at damp %.3g; raising damp to %.3g",
                        what(k), float(damp[k]), float(damp[k]) * 10)
            damp[k] *= 10
    raise WfcoreError(f"woodfisher: Cholesky still fails for {what(failed[0])} after raising "
                      f"damp {MAX_DAMP_RAISES} times; check the gradients or use a larger damp")


def fisher_scale(G: torch.Tensor, chunk: int = 65536) -> float:
    """mean(diag(G^T G / m)) over the live columns of G (m, d) (weights pruned earlier,
    with all-zero columns, do not dilute it); 1.0 when no column is live. Read by column
    chunks in float64, so a float16 buffer is never copied whole.
    """
    total, live = 0.0, 0
    for start in range(0, G.shape[1], chunk):
        col = G[:, start:start + chunk].double().square().sum(0)  # (chunk,)
        total += float(col.sum())
        live += int((col > 0).sum())
    return total / (G.shape[0] * live) if live else 1.0


def absolute_damp(damp: float, mode: str, G: torch.Tensor) -> float:
    """lambda: ``damp`` itself (absolute) or ``damp * fisher_scale(G)`` (relative)."""
    if mode == "absolute":
        return damp
    if mode != "relative":
        raise ValueError(f"damp mode '{mode}' is not one of {', '.join(DAMP_MODES)}")
    return damp * fisher_scale(G)


def add_diagonal(A: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A + diag_embed(values) for a batch A (n, k, k) and values (n,); A is not changed."""
    out = A.clone()
    out.diagonal(dim1=1, dim2=2).add_(values[:, None])
    return out


def solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^-1 b for a batch of SPD matrices, with LU where Cholesky breaks down."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, L)
    return torch.linalg.solve(A, b)


class BlockGroup:
    """n blocks of size B, solved together. Tensors are (n, ...) batches."""

    def __init__(self, G: torch.Tensor, damp: float, form: str, what):
        self.G = G  # (n, m, B), solve dtype
        n, m, B = G.shape
        self.m, self.form = m, form
        self.damp = torch.full((n,), damp, dtype=G.dtype, device=G.device)
        self._diag: torch.Tensor | None = None
        if form == "dual":
            GGt = G @ G.transpose(1, 2)  # (n, m, m)
            self.L = cholesky_raising_damp(lambda d: add_diagonal(GGt, m * d),
                                           self.damp, what)  # (n, m, m), K = L L^T
        elif form == "primal":
            GtG = G.transpose(1, 2) @ G / m  # (n, B, B)
            L = cholesky_raising_damp(lambda d: add_diagonal(GtG, d), self.damp, what)
            eye = torch.eye(B, dtype=G.dtype, device=G.device).expand_as(L)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # (n, B, B)
            # L^-T L^-1 rather than torch.cholesky_inverse, which is very slow on CPU
            self.F_inv = L_inv.transpose(1, 2) @ L_inv  # (n, B, B)
        else:
            F_inv = add_diagonal(G.new_zeros(n, B, B), 1 / self.damp)  # (n, B, B)
            for i in range(m):  # F_inv -= v v^T / (m + g^T v), v = F_inv g
                g = G[:, i, :, None]  # (n, B, 1)
                v = F_inv @ g  # (n, B, 1)
                u = v / (m + g.transpose(1, 2) @ v)
                F_inv.baddbmm_(u, v.transpose(1, 2), alpha=-1)
            self.F_inv = F_inv

    def diag(self) -> torch.Tensor:
        """(n, B): diag(F^-1)."""
        if self._diag is None:
            if self.form == "dual":
                A = torch.linalg.solve_triangular(self.L, self.G, upper=False)  # (n, m, B)
                self._diag = (1 - A.square_().sum(1)) / self.damp[:, None]
            else:
                self._diag = self.F_inv.diagonal(dim1=1, dim2=2).clone()
        return self._diag

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """(n, B): F^-1 v for v (n, B)."""
        if self.form != "dual":
            return (self.F_inv @ v[..., None])[..., 0]
        Gv = self.G @ v[..., None]  # (n, m, 1)
        return (v - (self.G.transpose(1, 2) @ torch.cholesky_solve(Gv, self.L))[..., 0]) \
            / self.damp[:, None]

    def joint(self, mask: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact OBS update removing ``mask`` (n, B) of ``w`` (n, B), and the loss increase.

        x = S^-1 w_Q embedded in (n, B) (zero off Q), dw = -F^-1 x, increase = w_Q.x / 2.
        """
        w_Q = torch.where(mask, w, torch.zeros_like(w))
        if self.form == "dual":
            m = self.m
            G_R = self.G * (~mask)[:, None, :]  # (n, m, B): the block less Q
            K_Q = add_diagonal(G_R @ G_R.transpose(1, 2), m * self.damp)  # (n, m, m)
            r = self.G @ w_Q[..., None]  # (n, m, 1) = G_Q w_Q
            z = (self.G.transpose(1, 2) @ solve_spd(K_Q, r))[..., 0]  # (n, B)
            x = self.damp[:, None] * (w_Q + torch.where(mask, z, torch.zeros_like(z)))
        else:
            both = mask[:, :, None] & mask[:, None, :]
            S = torch.where(both, self.F_inv, torch.diag_embed((~mask).to(w.dtype)))
            x = solve_spd(S, w_Q[..., None])[..., 0]
        return -self.mul(x), 0.5 * (w_Q * x).sum(1)

    def quadratic(self, dw: torch.Tensor) -> torch.Tensor:
        """(n,): dw^T F dw / 2, from G (F itself is never formed)."""
        Gdw = self.G @ dw[..., None]  # (n, m, 1)
        return 0.5 * (self.damp * (dw * dw).sum(1) + (Gdw * Gdw).sum((1, 2)) / self.m)


class WoodFisherCurvature(Curvature):
    """F^-1 of every block of the prunable weights, answered block by block."""

    def __init__(self, layout: ParamLayout, groups: list[tuple[torch.Tensor, BlockGroup]],
                 out_device: torch.device):
        self.layout = layout
        self.groups = groups  # (flat indices (n, B), the group's factors)
        self.out_device = out_device
        first = groups[0][1].G
        self.dtype, self.device = first.dtype, first.device

    def _flat(self, tensors: Tensors) -> torch.Tensor:
        return self.layout.flatten({n: t.to(self.device, self.dtype) for n, t in
                                    tensors.items()})

    def _out(self, flat: torch.Tensor) -> Tensors:
        return {n: t.to(self.out_device) for n, t in self.layout.unflatten(flat).items()}

    def _map(self, fn, *flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.layout.d, dtype=self.dtype, device=self.device)
        for idx, group in self.groups:
            out[idx] = fn(group, *(f[idx] for f in flat))
        return out

    def inverse_diagonal(self) -> Tensors:
        return self._out(self._map(lambda g: g.diag()))

    def inverse_mul(self, v: Tensors) -> Tensors:
        return self._out(self._map(BlockGroup.mul, self._flat(v)))

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; expected one of {UPDATE_MODES}")
        mask = self.layout.flatten({n: t.to(self.device) for n, t in prune_mask.items()})
        w_flat = self._flat(w)
        if mode == "independent":
            u = torch.where(mask, w_flat / self._map(lambda g: g.diag()), 0.0)
            return self._out(-self._map(BlockGroup.mul, u))
        return self._out(self._map(lambda g, q, x: g.joint(q, x)[0], mask, w_flat))

    def predicted_increase(self, prune_mask: Tensors, w: Tensors) -> float:
        """The quadratic model's loss increase of the joint update: sum of w_Q^T S^-1 w_Q / 2."""
        mask = self.layout.flatten({n: t.to(self.device) for n, t in prune_mask.items()})
        w_flat, total = self._flat(w), 0.0
        for idx, group in self.groups:
            total += float(group.joint(mask[idx], w_flat[idx])[1].sum())
        return total

    def quadratic(self, dw: Tensors) -> float:
        """dw^T F dw / 2: the quadratic model's loss increase of a weight change."""
        flat = self._flat(dw)
        return sum(float(group.quadratic(flat[idx]).sum()) for idx, group in self.groups)

    def damping(self) -> float:
        """The mean lambda over all blocks (after any raise on a failed Cholesky)."""
        damps = torch.cat([group.damp for _, group in self.groups])
        return float(damps.mean())


class WoodFisher(HessianEstimator):
    Options = WoodFisherOptions

    def __init__(self, options: WoodFisherOptions | None = None):
        self.options = options or WoodFisherOptions()

    def _device(self, problem: PruningProblem) -> torch.device:
        if self.options.device == "auto":
            return torch.device(problem.device)
        device = torch.device(self.options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise WfcoreError("estimator.device: CUDA asked for, but it is not available")
        return device

    def check_memory(self, starts: dict[int, list[int]], m: int, device: torch.device,
                     itemsize: int) -> None:
        kept, transient, biggest = 0, 0, (0, 0, "")
        for B, offsets in starts.items():
            form = choose_form(self.options.form, m, B)
            k, t = memory_needed(form, len(offsets), m, B, itemsize)
            kept, transient = kept + k, max(transient, t)
            biggest = max(biggest, (k + t, B, form))
        need = kept + transient
        limit = (self.options.max_memory_gb * 2**30 if self.options.max_memory_gb is not None
                 else available_memory(device))
        if need > limit:
            _, B, form = biggest
            raise WfcoreError(
                f"woodfisher: block_size={self.options.block_size} (largest block {B} weights, "
                f"form {form}, m={m}) needs {need / 2**30:.2f} GiB on {device}, more than the "
                f"{limit / 2**30:.2f} GiB available; use a smaller estimator.block_size, "
                "form=dual, fewer fisher.num_grads or estimator.dtype=float32")

    def fit(self, problem: PruningProblem) -> WoodFisherCurvature:
        opts, layout = self.options, problem.sampler.layout
        device, dtype = self._device(problem), DTYPES[opts.dtype]
        starts = block_starts(layout, opts.block_size)
        m = problem.sampler.num_grads
        self.check_memory(starts, m, device, dtype.itemsize)
        G = problem.sampler.sample()  # (m, d), storage dtype, maybe in CPU memory
        damp = absolute_damp(opts.damp, opts.damp_mode, G)
        groups = []
        for B, offsets in starts.items():
            form = choose_form(opts.form, m, B)
            idx = (torch.tensor(offsets)[:, None] + torch.arange(B)).to(G.device)  # (n, B)
            block_G = G[:, idx].to(device=device, dtype=dtype).transpose(0, 1)  # (n, m, B)

            def what(k: int, offsets=offsets, B=B) -> str:
                return describe_block(layout, offsets[k], B)

            groups.append((idx.to(device), BlockGroup(block_G.contiguous(), damp, form,
                                                      what)))
            log.debug("woodfisher: %d block(s) of %d weights, %s form", len(offsets), B, form)
        log.info("woodfisher: %d blocks (%s), m=%d, damp %.3g (%s %g), %s on %s",
                 sum(len(o) for o in starts.values()),
                 ", ".join(f"{len(o)} x {B} {choose_form(opts.form, m, B)}"
                           for B, o in starts.items()), m, damp, opts.damp_mode, opts.damp,
                 opts.dtype, device)
        return WoodFisherCurvature(layout, groups, torch.device(problem.device))


def describe_block(layout: ParamLayout, offset: int, size: int) -> str:
    """'the block of <size> weights at <param>[i:j]' for log and error messages."""
    name = next(n for n in reversed(layout.names) if layout.offsets[n] <= offset)
    start = offset - layout.offsets[name]
    return f"the block of {size} weights at {name}[{start}:{start + size}]"


@hookimpl
def wfcore_estimators():
    return {"woodfisher": WoodFisher}
