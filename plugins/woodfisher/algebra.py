"""The per-block algebra of WoodFisher: F = lambda*I + (1/m) G^T G for n blocks at once.

G is the (m, B) matrix of one block's gradients; blocks of one size are stacked (n, m, B)
and solved batched (bmm, batched Cholesky). ``plugins/woodfisher/__init__.py`` plans the blocks and
chunks, streams them from the gradient store and answers the Curvature contract.

Forms (``form``):
  dual       K = G G^T + m*lambda*I (m x m, Cholesky). Nothing of size B x B is formed:
             diag(F^-1) = (1 - colsum(G o K^-1 G)) / lambda, F^-1 v = (v - G^T K^-1 G v) / lambda.
             The exact joint OBS update for a pruned set Q keeps dw_Q = -w_Q and moves the
             rest R of the block by dw_R = F_RR^-1 F_RQ w_Q = G_R^T K_Q^-1 G_Q w_Q with
             K_Q = G_R G_R^T + m*lambda*I (Woodbury on F_RR): one m x m solve, from the live
             columns of R only, and no factor of K at all.
  primal     F itself (B x B, Cholesky, explicit inverse): cheaper when m >= B.
  recursive  the original method's m sequential rank-1 Woodbury updates of F^-1, starting
             from I/lambda. Slow; kept as the reference the tests and benchmarks compare to.
  auto       dual when m < B, else primal.

Pruned weights. The sampler zeroes the gradient columns of already pruned weights, so
inside a block a pruned weight j has G[:, j] = 0: F couples it to nothing, [F^-1]_jj is
1/lambda and (F^-1 v)_j = v_j / lambda. Both updates are built from F^-1 applied to a
vector that is zero at j (u or x below is supported on the newly pruned set Q), so they
leave earlier pruned weights exactly where they are (zero), bit for bit: OBS over the
live weights with the earlier pruned ones held at zero, which is what the iterative
schedule needs. The pipeline re-applies the masks after every update in any case.

Safeguard: a failed Cholesky raises that block's damping x10 (logged, up to 8 times).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from wfcore import WfcoreError

log = logging.getLogger("wfcore.plugins.woodfisher")  # one logger for the estimator

MAX_DAMP_RAISES = 8


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


def add_diagonal(A: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A + diag_embed(values) for a batch A (n, k, k) and values (n,); A is not changed."""
    out = A.clone()
    out.diagonal(dim1=1, dim2=2).add_(values[:, None])
    return out


def live_columns(G: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, m, R_max), (n, R_max)): the columns of G (n, m, B) where ``keep`` (n, B) holds
    and G is not zero, packed to the left and zero-padded to the longest block's count, and
    the column each packed one came from (B for padding)."""
    n, _, B = G.shape
    keep = keep & (G != 0).any(1)  # (n, B)
    counts = keep.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # order[k, j] = the j-th kept column of block k: scatter each kept column to its rank
    # (the dropped ones all land in an extra slot, cut off below)
    rank = torch.where(keep, keep.cumsum(1) - 1, width)  # (n, B)
    order = torch.full((n, width + 1), B, dtype=torch.long, device=G.device)
    order.scatter_(1, rank, torch.arange(B, device=G.device).expand(n, B))
    order = order[:, :width]
    valid = order < B  # (n, width)
    packed = torch.gather(G, 2, order.clamp(max=B - 1)[:, None, :].expand(-1, G.shape[1], -1))
    return packed * valid[:, None, :], order


# Rows of G in this many parts for the dual form's two m x m x B products: K = G G^T is
# symmetric and L^-1 is lower triangular, so of the parts' pairs only those on and below
# the diagonal are multiplied, 10 of 16 (the products' flops times 5/8). Fewer rows than
# TRIANGLE_MIN_ROWS: one product (small GEMMs run below the machine's rate).
TRIANGLE_PARTS = 4
TRIANGLE_MIN_ROWS = 128


def row_parts(m: int) -> list[tuple[int, int]]:
    """(start, stop) of each part of m rows (one part for a small m)."""
    parts = TRIANGLE_PARTS if m >= TRIANGLE_MIN_ROWS else 1
    bounds = [round(k * m / parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def gram(G: torch.Tensor) -> torch.Tensor:
    """(n, m, m): G G^T of a batch G (n, m, B), from the blocks on and below the diagonal
    of its row parts (``row_parts``), the others their mirror images."""
    parts = row_parts(G.shape[1])
    if len(parts) == 1:
        return G @ G.transpose(1, 2)
    K = G.new_empty(G.shape[0], G.shape[1], G.shape[1])
    for a, b in parts:
        K[:, a:b, :b] = G[:, a:b] @ G[:, :b].transpose(1, 2)
    for a, b in parts:
        K[:, :a, a:b] = K[:, a:b, :a].transpose(1, 2)
    return K


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(n, m, m): L^-1 of a batch of lower triangular L, a triangular solve of the identity."""
    eye = torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)


def whitened_square_sums(L: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """(n, B): colsum((L^-1 G)^2) for lower triangular L (n, m, m): ``lower_inverse``, then
    each row part of L^-1 G from the columns of L^-1 left of the part's end only (the rest
    are zero), squared and summed as it comes (never all of L^-1 G at once)."""
    L_inv = lower_inverse(L)
    out = G.new_zeros(G.shape[0], G.shape[2])
    for a, b in row_parts(G.shape[1]):
        out += (L_inv[:, a:b, :b] @ G[:, :b]).square_().sum(1)
    return out


def solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^-1 b for a batch of SPD matrices, with LU where Cholesky breaks down."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, L)
    return torch.linalg.solve(A, b)


class BlockGroup:
    """n blocks of size B, solved together. Tensors are (n, ...) batches.

    The factorisation (K's Cholesky factor, or F^-1 itself) is made on first use: the dual
    joint update needs none.
    """

    def __init__(self, G: torch.Tensor, damp: float | torch.Tensor, form: str, what):
        self.G = G  # (n, m, B), solve dtype
        n, self.m, _ = G.shape
        self.form, self.what = form, what
        self.damp = torch.as_tensor(damp, dtype=G.dtype, device=G.device).expand(n).clone()
        self._diag: torch.Tensor | None = None
        self._L: torch.Tensor | None = None
        self._F_inv: torch.Tensor | None = None

    @property
    def L(self) -> torch.Tensor:
        """(n, m, m): the Cholesky factor of K = G G^T + m*damp*I (dual form)."""
        if self._L is None:
            GGt = gram(self.G)  # (n, m, m)
            self._L = cholesky_raising_damp(lambda d: add_diagonal(GGt, self.m * d),
                                            self.damp, self.what)
        return self._L

    @property
    def F_inv(self) -> torch.Tensor:
        """(n, B, B): F^-1 itself (primal and recursive forms)."""
        if self._F_inv is None:
            self._F_inv = self._primal() if self.form == "primal" else self._recursive()
        return self._F_inv

    def _primal(self) -> torch.Tensor:
        G, m = self.G, self.m
        GtG = G.transpose(1, 2) @ G / m  # (n, B, B)
        L = cholesky_raising_damp(lambda d: add_diagonal(GtG, d), self.damp, self.what)
        L_inv = lower_inverse(L)  # (n, B, B)
        # L^-T L^-1 rather than torch.cholesky_inverse, which is very slow on CPU
        return L_inv.transpose(1, 2) @ L_inv

    def _recursive(self) -> torch.Tensor:
        G, m = self.G, self.m
        n, _, B = G.shape
        F_inv = add_diagonal(G.new_zeros(n, B, B), 1 / self.damp)  # (n, B, B)
        for i in range(m):  # F_inv -= v v^T / (m + g^T v), v = F_inv g
            g = G[:, i, :, None]  # (n, B, 1)
            v = F_inv @ g  # (n, B, 1)
            u = v / (m + g.transpose(1, 2) @ v)
            F_inv.baddbmm_(u, v.transpose(1, 2), alpha=-1)
        return F_inv

    def whitened(self) -> torch.Tensor:
        """(n, m, B): A = L^-1 G (dual form), as L^-1 (m x m, a triangular solve of the
        identity) times G: one batched GEMM. A triangular solve with G's B columns on the
        right-hand side ran 5x slower on a CPU (ResNet-50's blocks, m = 100: 4.5 s against
        0.8 s for 80 blocks), and both agree to rounding (1e-16 there)."""
        return lower_inverse(self.L) @ self.G

    def drop_factors(self) -> None:
        """Free everything but diag(F^-1) and the settled damping."""
        del self.G
        self._L = self._F_inv = None

    def diag(self) -> torch.Tensor:
        """(n, B): diag(F^-1)."""
        if self._diag is None:
            if self.form == "dual":
                self._diag = (1 - whitened_square_sums(self.L, self.G)) / self.damp[:, None]
            else:
                self._diag = self.F_inv.diagonal(dim1=1, dim2=2).clone()
        return self._diag

    def entries(self, k: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(P,): [F^-1]_ij of block k, for index vectors k, i, j (P,).

        Dual form: (delta_ij - a_i.a_j) / damp with A = L^-1 G (n, m, B), read a slice of
        at most n*B pairs at a time (each slice gathers (slice, m), the size of G).
        """
        if self.form != "dual":
            return self.F_inv[k, i, j]
        A = self.whitened()  # (n, m, B)
        step = max(A.shape[0] * A.shape[2], 1)
        out = [((i[s:s + step] == j[s:s + step]).to(A.dtype)
                - (A[k[s:s + step], :, i[s:s + step]] * A[k[s:s + step], :, j[s:s + step]]).sum(-1))
               / self.damp[k[s:s + step]] for s in range(0, k.numel(), step)]
        return torch.cat(out) if out else A.new_zeros(0)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """(n, B): F^-1 v for v (n, B)."""
        if self.form != "dual":
            return (self.F_inv @ v[..., None])[..., 0]
        Gv = self.G @ v[..., None]  # (n, m, 1)
        return (v - (self.G.transpose(1, 2) @ torch.cholesky_solve(Gv, self.L))[..., 0]) \
            / self.damp[:, None]

    def joint(self, mask: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact OBS update removing ``mask`` (n, B) of ``w`` (n, B), and the loss increase.

        The update is dw_Q = -w_Q and, on the rest R of the block, dw_R = F_RR^-1 F_RQ w_Q.
        Dual form: with K_Q = G_R G_R^T + m*damp*I (m x m), Woodbury on F_RR gives
        dw_R = G_R^T K_Q^-1 G_Q w_Q and the increase damp/2 (|w_Q|^2 + r^T K_Q^-1 r),
        r = G_Q w_Q; neither K nor anything B x B is needed, and G_R keeps only the live
        columns of R. Primal forms: x = S^-1 w_Q, S = [F^-1]_QQ, dw = -F^-1 x, increase
        w_Q.x / 2.
        """
        zero = torch.zeros_like(w)
        w_Q = torch.where(mask, w, zero)
        if self.form == "dual":
            G, m = self.G, self.m
            r = G @ w_Q[..., None]  # (n, m, 1) = G_Q w_Q
            G_R, order = live_columns(G, ~mask)  # (n, m, R_max), zero-padded
            K_Q = add_diagonal(G_R @ G_R.transpose(1, 2), m * self.damp)  # (n, m, m)
            y = solve_spd(K_Q, r)  # (n, m, 1)
            # dw_R = G_R^T y on the packed columns only (a pass over R, not all of G),
            # put back in place; padding lands in an extra column, cut off
            dw = torch.zeros(w.shape[0], w.shape[1] + 1, dtype=w.dtype, device=w.device)
            dw.scatter_(1, order, (G_R.transpose(1, 2) @ y)[..., 0])
            increase = 0.5 * self.damp * ((w_Q * w_Q).sum(1) + (r * y).sum((1, 2)))
            return torch.where(mask, -w, dw[:, :-1]), increase
        both = mask[:, :, None] & mask[:, None, :]
        S = torch.where(both, self.F_inv, torch.diag_embed((~mask).to(w.dtype)))
        x = solve_spd(S, w_Q[..., None])[..., 0]
        return -self.mul(x), 0.5 * (w_Q * x).sum(1)

    def quadratic(self, dw: torch.Tensor) -> torch.Tensor:
        """(n,): dw^T F dw / 2, from G (F itself is never formed)."""
        Gdw = self.G @ dw[..., None]  # (n, m, 1)
        return 0.5 * (self.damp * (dw * dw).sum(1) + (Gdw * Gdw).sum((1, 2)) / self.m)


def group_pairs(members: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, diagonal), each (sum of n_groups * b * b,): the flat index pairs of
    every entry of every group's b x b block, groups given as (*group index, b) flat
    indices (-1: padding), and whether the entry is on its block's diagonal."""
    def pairs(g: torch.Tensor, row: bool) -> torch.Tensor:
        return (g[..., :, None] if row else g[..., None, :]).expand(*g.shape, g.shape[-1])

    rows = torch.cat([pairs(g, True).flatten() for g in members])
    cols = torch.cat([pairs(g, False).flatten() for g in members])
    diagonal = torch.cat([torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
                          .expand(*g.shape, g.shape[-1]).flatten() for g in members])
    return rows, cols, diagonal


def pair_entries(groups, rows: torch.Tensor, cols: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """(P,): [F^-1]_ab for the flat index pairs (rows[p], cols[p]), from the block groups
    ``groups`` yields as (flat indices (n, B), BlockGroup); 0 for a pair in two blocks or
    in blocks none of them holds (another rank's), and for an index < 0 (padding)."""
    out = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
    for idx, group in groups:
        lo, hi = int(idx.min()), int(idx.max())
        position = torch.full((hi - lo + 1,), -1, dtype=torch.long, device=idx.device)
        position[idx.flatten() - lo] = torch.arange(idx.numel(), device=idx.device)
        inside = ((rows >= lo) & (rows <= hi) & (cols >= lo) & (cols <= hi)).nonzero()[:, 0]
        pa, pb = position[rows[inside] - lo], position[cols[inside] - lo]  # (P',)
        B = idx.shape[1]
        same = (pa >= 0) & (pb >= 0) & (pa // B == pb // B)
        pa, pb = pa[same], pb[same]
        out[inside[same]] = group.entries(pa // B, pa % B, pb % B)
    return out


# the plan's timed piece of the algebra: blocks of about this many bytes of gradients in
# all (a chunk's rate, memory traffic included: a few blocks alone sit in the CPU's cache)
PROBE_BYTES = 256 * 2**20
PROBE_MAX_BLOCK = 4096  # ... of at most this size (larger ones counted from it in flops)
PROBE_PRUNED = 0.9  # the share of a block its timed update removes (the paper's one-shot)


def probe_seconds(form: str, m: int, B: int, n: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[float, float]:
    """Seconds of diag(F^-1) and of a joint update of ``n`` blocks of size B as a chunk
    runs them (the store's float32 columns stacked and converted included), on random
    gradients: the better of two timed runs after one untimed (kernels warm up)."""
    g = torch.Generator().manual_seed(0)
    columns = torch.randn(m, n * B, generator=g)  # (m, n*B), as read from a store
    w = torch.randn(n, B, generator=g, dtype=dtype).to(device)
    mask = (torch.rand(n, B, generator=g) < PROBE_PRUNED).to(device)

    def group() -> BlockGroup:
        G = torch.stack([columns[:, k * B:(k + 1) * B] for k in range(n)])  # (n, m, B)
        return BlockGroup(G.to(device=device, dtype=dtype), 1e-2, form,
                          lambda k: f"probe block {k}")

    def timed(run) -> float:
        best = math.inf
        for k in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:
                best = min(best, time.perf_counter() - start)
        return best

    return timed(lambda: group().diag()), timed(lambda: group().joint(mask, w))
