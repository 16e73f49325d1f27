"""K-FAC: the Fisher of each Linear / Conv2d weight as a Kronecker product of two factors.

For a layer s = W a (W of shape (out, in); a Conv2d weight (out, C, kh, kw) acts on the
(C*kh*kw,) input patches), the gradient of one sample is g a^T with g = dL/ds, and
F ~ A (x) G with A = E[a a^T] (in, in) and G = E[g g^T] (out, out) (Martens & Grosse
2015; Grosse & Martens 2016 for convolutions, positions treated as independent). In the
column-major vec of the papers that is A (x) G; over PyTorch's row-major flattening of W
it is ``torch.kron(G, A)``. Layers are independent blocks (block-diagonal F).

Statistics come from the problem's model and mini-batches (``problem.batches``: the
data's labels or sampled ones, as ``fisher.labels`` says): forward hooks record the layer
inputs, ``autograd.grad`` w.r.t. the layer outputs gives g. Each of the m "gradients" is a
group of ``fisher.grad_batch`` samples, as in the empirical
Fisher: A averages over samples and positions, G sums g g^T over the samples and
positions of a group (g of the group's mean loss) and averages over the m groups.

Damping: ``factored`` (default) splits damp between the factors with the pi heuristic,
(A + pi sqrt(damp) I) (x) (G + sqrt(damp)/pi I), pi = sqrt((tr A / dim A) / (tr G / dim G));
``exact`` inverts A (x) G + damp I. With ``damp_mode: relative``, damp is first
multiplied by the Fisher's scale, the mean of diag(A (x) G) = mean(diag A) mean(diag G)
over all prunable weights (one number for all layers, whose scores meet in one global
threshold). Both go through the eigendecompositions
A = Q_A diag(a) Q_A^T, G = Q_G diag(g) Q_G^T, so the Kronecker product is never formed:
F^-1 V = Q_G [(Q_G^T V Q_A) / D] Q_A^T and diag(F^-1) = (Q_G o Q_G) (1 / D) (Q_A o Q_A)^T,
with D[i, j] = g_i a_j (+ damp) the eigenvalues of the damped F, all in float64.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from wfcore.plugins.diag_fisher import DiagonalCurvature

from wfcore import (
    DAMP_MODES,
    Curvature,
    EstimatorCost,
    HessianEstimator,
    PruningProblem,
    Tensors,
    WfcoreError,
    hookimpl,
)
from wfcore import progress as progress_bars

log = logging.getLogger(__name__)

DAMPINGS = ("factored", "exact")


@dataclass
class KroneckerBlock:
    """One layer's damped F = (Q_G (x) Q_A) diag(vec D) (Q_G (x) Q_A)^T, row-major order.

    D = g a^T + extra: ``a``, ``g`` the (damped) eigenvalues of the factors; the damped F is
    G_f (x) A_f + extra I with G_f = Q_G diag(g) Q_G^T, A_f = Q_A diag(a) Q_A^T.
    """

    Q_A: torch.Tensor  # (in, in) eigenvectors of A
    a: torch.Tensor  # (in,) eigenvalues of A_f
    Q_G: torch.Tensor  # (out, out) eigenvectors of G
    g: torch.Tensor  # (out,) eigenvalues of G_f
    extra: float  # damp for damping=exact, 0 for factored
    shape: tuple[int, ...]  # the weight's shape

    def __post_init__(self) -> None:
        self.D = torch.outer(self.g, self.a) + self.extra  # (out, in)

    def factor(self, which: str, power: float = 1.0) -> torch.Tensor:
        """A_f^power or G_f^power, explicit (in, in) / (out, out)."""
        Q, e = (self.Q_A, self.a) if which == "A" else (self.Q_G, self.g)
        return (Q * e.pow(power)) @ Q.T

    def mul(self, V: torch.Tensor) -> torch.Tensor:
        """F V for V of shape (out, in)."""
        return self.Q_G @ ((self.Q_G.T @ V @ self.Q_A) * self.D) @ self.Q_A.T

    def inverse_mul(self, V: torch.Tensor) -> torch.Tensor:
        """F^-1 V for V of shape (out, in), through the eigenbasis."""
        return self.Q_G @ ((self.Q_G.T @ V @ self.Q_A) / self.D) @ self.Q_A.T

    def submatrix(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Explicit F[S, S] over the flat (row-major) indices S = (rows, cols)."""
        G_f, A_f = self.factor("G"), self.factor("A")
        F_S = G_f[rows][:, rows] * A_f[cols][:, cols]  # (|S|, |S|)
        return F_S + self.extra * torch.eye(len(rows), dtype=F_S.dtype, device=F_S.device)


def kron_damp(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], damp: float,
              mode: str) -> float:
    """The absolute damp: ``damp`` itself, or (relative) ``damp`` times the mean of
    diag(A (x) G) over the weights of all layers (1 if that is 0).
    """
    if mode == "absolute":
        return damp
    if mode != "relative":
        raise ValueError(f"damp mode '{mode}' is not one of {', '.join(DAMP_MODES)}")
    total, numel = 0.0, 0
    for A, G in factors.values():  # sum of diag(A (x) G) = tr A tr G
        total += float(torch.diagonal(A).double().sum() * torch.diagonal(G).double().sum())
        numel += A.shape[0] * G.shape[0]
    scale = total / numel if numel else 0.0
    return damp * (scale if scale > 0 else 1.0)


def damped_block(A: torch.Tensor, G: torch.Tensor, damp: float, damping: str,
                 shape: tuple[int, ...]) -> KroneckerBlock:
    """Eigendecompose A (in, in) and G (out, out) in float64 and damp them."""
    A, G = A.double(), G.double()
    a, Q_A = torch.linalg.eigh(A)  # (in,), (in, in)
    g, Q_G = torch.linalg.eigh(G)  # (out,), (out, out)
    a, g = a.clamp_min(0.0), g.clamp_min(0.0)  # PSD up to round-off
    if damping == "factored":
        mean_a = torch.diagonal(A).mean().item()
        mean_g = torch.diagonal(G).mean().item()
        pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
        gamma = math.sqrt(damp)
        return KroneckerBlock(Q_A, a + pi * gamma, Q_G, g + gamma / pi, 0.0, tuple(shape))
    if damping == "exact":
        return KroneckerBlock(Q_A, a, Q_G, g, damp, tuple(shape))
    raise ValueError(f"damping '{damping}' is not one of {', '.join(DAMPINGS)}")


def spd_solve(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """M^-1 b for a symmetric positive definite M (float64 Cholesky, LU if it fails)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    log.warning("kfac: Cholesky failed on a %d x %d system; solving with LU", *M.shape)
    return torch.linalg.solve(M, b)


def joint_update(block: KroneckerBlock, W: torch.Tensor, C: torch.Tensor,
                 max_size: int) -> torch.Tensor:
    """Exact OBS change of W (out, in) that zeroes the set C (bool (out, in)) of one layer.

    dw = -F^-1 E_C (E_C^T F^-1 E_C)^-1 w_C. Solved on the smaller side: |C| <= |K| (K the
    free weights) in the dual with explicit (F^-1)_CC (factored damping only, where F^-1 is
    itself a Kronecker product); otherwise in the primal, dw_C = -w_C and
    dw_K = F_KK^-1 F_KC w_C, with explicit F_KK.
    """
    K = ~C
    num_c, num_k = int(C.sum()), int(K.sum())
    dW = torch.zeros_like(W)
    if num_c == 0:
        return dW
    if num_k == 0:
        return -W
    if block.extra == 0.0 and num_c <= num_k:
        if num_c > max_size:
            return row_joint_update(block, W, C, num_c, max_size)
        G_inv, A_inv = block.factor("G", -1.0), block.factor("A", -1.0)
        rows, cols = C.nonzero(as_tuple=True)
        S = G_inv[rows][:, rows] * A_inv[cols][:, cols]  # (|C|, |C|) = (F^-1)_CC
        X = torch.zeros_like(W)
        X[rows, cols] = spd_solve(S, W[rows, cols])
        return -(G_inv @ X @ A_inv)
    if num_k > max_size:
        return row_joint_update(block, W, C, min(num_c, num_k), max_size)
    rows, cols = K.nonzero(as_tuple=True)
    F_KC_w = block.mul(torch.where(C, W, torch.zeros_like(W)))[rows, cols]  # (|K|,)
    dW[rows, cols] = spd_solve(block.submatrix(rows, cols), F_KC_w)
    dW[C] = -W[C]
    return dW


def row_joint_update(block: KroneckerBlock, W: torch.Tensor, C: torch.Tensor, size: int,
                     max_size: int) -> torch.Tensor:
    """The exact OBS change inside each output row, for a layer whose joint system (``size``
    weights) is over ``joint_max``: F restricted to row i is G_f[i, i] A_f (+ extra I), so
    row i's kept weights K_i move by dw_K = (F_KK)^-1 F_KC w_C (primal; the dual
    -A_f^-1[:, C] (A_f^-1[C, C])^-1 w_C when fewer are pruned than kept and the damping is
    factored) and its pruned ones go to zero. The coupling between rows (G's off-diagonal)
    is dropped: the row-wise update of OBC / SparseGPT, with A as the row Hessian. Systems
    are at most ``in`` weights (the factor A itself is already that large)."""
    log.info("kfac: the joint update of %d weights in one layer exceeds joint_max=%d; solved "
             "row by row (exact within each output row)", size, max_size)
    A_f = block.factor("A")  # (in, in)
    A_inv = block.factor("A", -1.0) if block.extra == 0.0 else None
    g = torch.diagonal(block.factor("G"))  # (out,) G_f[i, i]
    dW = torch.zeros_like(W)
    for i in range(W.shape[0]):
        c = C[i]
        k = ~c
        num_c, num_k = int(c.sum()), int(k.sum())
        if num_c == 0:
            continue
        dW[i, c] = -W[i, c]
        if num_k == 0:
            continue
        if A_inv is not None and num_c <= num_k:
            x = spd_solve(A_inv[c][:, c], W[i, c])  # (|C|,)
            dW[i, k] = -(A_inv[k][:, c] @ x)
        else:
            M = g[i] * A_f[k][:, k] + block.extra * torch.eye(num_k, dtype=W.dtype,
                                                                device=W.device)
            dW[i, k] = spd_solve(M, g[i] * (A_f[k][:, c] @ W[i, c]))
    return dW


class KfacCurvature(Curvature):
    """Block-diagonal F^-1 over the prunable weights, one Kronecker block per layer.

    ``joint``: the exact OBS update inside each layer (see ``joint_update``).
    """

    def __init__(self, blocks: dict[str, KroneckerBlock], joint_max: int = 8192,
                 damp: float | None = None, diagonal: DiagonalCurvature | None = None):
        self.blocks = blocks
        self.joint_max = joint_max
        self.damp = damp  # the absolute damp the blocks were given, for the report
        # the parameters without Kronecker factors (see ``kronecker_modules``): diagonal F
        self.diagonal = diagonal or DiagonalCurvature({}, damp)

    def _diagonal_part(self, t: Tensors) -> Tensors:
        return {n: t[n] for n in self.diagonal.inverse_diag}

    def quadratic(self, dw: Tensors) -> float:
        return sum(0.5 * float((self._matrix(n, dw[n]) * b.mul(self._matrix(n, dw[n]))).sum())
                   for n, b in self.blocks.items()) + \
            self.diagonal.quadratic(self._diagonal_part(dw))

    def damping(self) -> float | None:
        return self.damp

    def inverse_diagonal(self) -> Tensors:
        out = {}
        for n, b in self.blocks.items():
            diag = (b.Q_G ** 2) @ (1.0 / b.D) @ (b.Q_A ** 2).T  # (out, in)
            out[n] = diag.reshape(b.shape)
        return {**out, **self.diagonal.inverse_diagonal()}

    def _matrix(self, n: str, t: torch.Tensor) -> torch.Tensor:
        b = self.blocks[n]
        return t.to(device=b.D.device, dtype=torch.float64).reshape(b.D.shape)  # (out, in)

    def inverse_mul(self, v: Tensors) -> Tensors:
        return {**{n: b.inverse_mul(self._matrix(n, v[n])).reshape(b.shape)
                   for n, b in self.blocks.items()},
                **self.diagonal.inverse_mul(self._diagonal_part(v))}

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode != "joint":
            return super().prune_update(prune_mask, w, mode)
        out = {}
        for n, b in self.blocks.items():
            W = self._matrix(n, w[n])
            # weights already at zero stay there: they join the constrained set
            C = self._matrix(n, prune_mask[n]).bool() | (W == 0)
            out[n] = joint_update(b, W, C, self.joint_max).reshape(b.shape)
        return {**out, **self.diagonal.prune_update(self._diagonal_part(prune_mask),
                                                    self._diagonal_part(w), mode)}


def modelled(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """Whether K-FAC factors ``p``: the weight of a Linear, or of a Conv2d without groups,
    string padding or a non-zero padding mode (the layers whose input patches it unfolds)."""
    if name.rpartition(".")[2] != "weight" or getattr(module, "weight", None) is not p:
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and \
        not isinstance(module.padding, str) and module.padding_mode == "zeros"


def layer_modules(model: nn.Module,
                  params: dict[str, nn.Parameter]) -> dict[str, nn.Linear | nn.Conv2d | None]:
    """The Linear / Conv2d module that owns each prunable weight K-FAC factors
    (``modelled``); None for the other prunable parameters."""
    modules: dict[str, nn.Linear | nn.Conv2d | None] = {}
    for name, p in params.items():
        owner = name.rpartition(".")[0]
        module = model.get_submodule(owner) if owner else model
        modules[name] = module if isinstance(module, (nn.Linear, nn.Conv2d)) \
            and modelled(module, name, p) else None
    return modules


def diagonal_fisher(problem: PruningProblem, names: list[str], damp: float,
                    chunk_bytes: int = 256 * 2**20) -> DiagonalCurvature:
    """The diagonal empirical Fisher (``diag_fisher``'s, with K-FAC's damp) of the
    parameters ``names`` that K-FAC has no Kronecker factors for, from the problem's m
    gradients, sampled a few rows at a time (``chunk_bytes`` of rows) and reduced to
    these parameters' squares at once: never the whole (m, d) store."""
    source, layout = problem.source, problem.layout()
    rows_at_once = max(1, chunk_bytes // (4 * layout.d))
    sums = {n: torch.zeros(layout.numels[n], dtype=torch.float64) for n in names}
    done = 0
    while done < source.num_grads:
        rows = source.sample(min(rows_at_once, source.num_grads - done))  # (k, d)
        for n in names:
            sums[n] += rows[:, layout.slice(n)].double().pow(2).sum(0).cpu()
        done += rows.shape[0]
    inverse = {n: (1.0 / (sums[n] / done + damp)).reshape(layout.shapes[n]).to(problem.device)
               for n in names}
    return DiagonalCurvature(inverse, damp)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, in) inputs of the layer: features, or unfolded patches of a Conv2d."""
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):  # (``modelled`` leaves these layers out)
            raise NotImplementedError(f"Conv2d with padding {module.padding!r}")
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)  # (B, C*kh*kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """(rows, out) gradients w.r.t. the layer outputs, rows matching ``layer_inputs``."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])  # (B*L, out)
    return g.reshape(-1, g.shape[-1])


def collect_factors(problem: PruningProblem, num_grads: int, grad_batch: int,
                    batch_size: int = 256,
                    progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A (in, in) and G (out, out) of every prunable layer, in float64, from the problem's
    mini-batches (``PruningProblem.batches``: the data's labels or sampled ones)."""
    model, device = problem.model, problem.device
    modules = {n: m for n, m in layer_modules(model, problem.params).items() if m is not None}
    if not modules:
        return {}
    total = num_grads * grad_batch
    chunk = max(grad_batch, (batch_size // grad_batch) * grad_batch)  # whole groups only
    A = {n: torch.zeros(m.weight[0].numel(), m.weight[0].numel(), dtype=torch.float64,
                        device=device) for n, m in modules.items()}
    G = {n: torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64,
                        device=device) for n, m in modules.items()}
    rows = dict.fromkeys(modules, 0)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
    handles = [m.register_forward_hook(
        lambda mod, inp, out, n=n: seen[n].append((inp[0].detach(), out)))
        for n, m in modules.items()]
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.enable_grad(), tqdm(
                total=total, desc="kfac factors", unit="sample", leave=False,
                disable=progress_bars.disabled(not progress)) as bar:
            for x, y in problem.batches(total, chunk):
                for n in seen:  # only this forward pass (the source may have run one)
                    seen[n].clear()
                logits = model(x)
                # sum over groups of each group's mean loss: dL/ds is g of its group
                loss = problem.loss_fn(logits, y) * (len(x) / grad_batch)
                outputs = [out for n in modules for _, out in seen[n]]
                grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True,
                                                 materialize_grads=True))
                for n, module in modules.items():
                    for inp, _ in seen[n]:
                        a = layer_inputs(module, inp)  # (rows, in)
                        g = output_grads(module, next(grads))  # (rows, out)
                        # products in the model's dtype, sums over chunks in float64
                        A[n] += (a.T @ a).double()
                        G[n] += (g.T @ g).double()
                        rows[n] += a.shape[0]
                done += len(x)
                bar.update(len(x))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    groups = done / grad_batch
    for n in modules:
        A[n] /= max(rows[n], 1)
        G[n] /= groups
        if not (torch.isfinite(A[n]).all() and torch.isfinite(G[n]).all()):
            raise WfcoreError(f"estimator 'kfac': non-finite factors for '{n}'")
    return {n: (A[n], G[n]) for n in modules}


@dataclass
class KfacOptions:
    # Tikhonov damping of F (split between the factors when damping=factored); K-FAC
    # factors are much larger than the per-weight Fisher, hence more than diag_fisher's.
    damp: float = 1e-3
    damp_mode: str = "absolute"  # absolute | relative (damp * mean(diag A) * mean(diag G))
    damping: str = "factored"  # factored (pi heuristic, the K-FAC papers) | exact (A (x) G + damp)
    batch_size: int = 256  # samples per forward/backward pass while collecting the factors
    # joint update: largest explicit system (min of pruned and kept weights of a layer)
    # solved; 8192 is 512 MiB of float64
    joint_max: int = 8192

    def validate(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.damp_mode not in DAMP_MODES:
            raise ValueError(f"damp_mode '{self.damp_mode}' is not one of {', '.join(DAMP_MODES)}")
        if self.damping not in DAMPINGS:
            raise ValueError(f"damping '{self.damping}' is not one of {', '.join(DAMPINGS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.joint_max < 1:
            raise ValueError(f"joint_max must be >= 1, got {self.joint_max}")


class Kfac(HessianEstimator):
    """K-FAC from ``fisher.num_grads`` groups of ``fisher.grad_batch`` samples."""

    Options = KfacOptions
    needs_gradients = False  # it collects its own statistics (layer inputs, output gradients)

    def __init__(self, options: KfacOptions | None = None):
        self.options = options or KfacOptions()

    def cost(self, layout, m: int, device) -> EstimatorCost:
        """The factors (in^2 + out^2 per layer, float64, with their eigenvectors) and one
        layer's explicit joint system. A joint update solves min(pruned, kept) weights of a
        layer, at most ``joint_max``: the note names how many layers cannot."""
        factors, flops = 0, 0.0
        for name in layout.names:
            shape = layout.shapes[name]
            out_dim, in_dim = shape[0], int(math.prod(shape[1:]))
            factors += 3 * (in_dim ** 2 + out_dim ** 2) * 8
            flops += 10 * (in_dim ** 3 + out_dim ** 3)  # eigendecompositions
        joint = self.options.joint_max
        large = [n for n in layout.names if layout.numels[n] > 2 * joint]
        # the largest system solved: min(pruned, kept) <= half a layer, at most joint_max
        system = min(joint, max((layout.numels[n] // 2 for n in layout.names), default=0))
        note = (f"{len(layout.names)} Kronecker blocks, {factors / 2**30:.3g} GiB of factors")
        if large:
            note += (f"; a joint update may be solved row by row in {len(large)} of "
                     f"{len(layout.names)} layers (more than 2 x joint_max={joint} weights, at "
                     "sparsities between joint_max/numel and 1 - joint_max/numel)")
        return EstimatorCost(working_bytes=factors + 4 * system * system * 8 + 4 * layout.d * 8,
                             flops=flops, note=note)

    def fit(self, problem: PruningProblem) -> Curvature:
        s, o = problem.source, self.options
        others = [n for n, m in layer_modules(problem.model, problem.params).items()
                  if m is None]
        diagonal = None
        if others:  # sampled first: the m gradients a diag_fisher fit would see
            log.warning("kfac: no Kronecker factors for %d prunable parameter(s) (attention "
                        "in-projections, grouped or transposed convolutions, Conv1d/3d, other "
                        "tensors): their curvature is the diagonal empirical Fisher: %s",
                        len(others), ", ".join(others[:4]) + (", ..." if len(others) > 4 else ""))
            diagonal = diagonal_fisher(problem, others, o.damp)
        factors = collect_factors(problem, s.num_grads, s.grad_batch,
                                  batch_size=o.batch_size, progress=s.progress)
        damp = kron_damp(factors, o.damp, o.damp_mode)
        blocks = {n: damped_block(A, G, damp, o.damping, tuple(problem.params[n].shape))
                  for n, (A, G) in factors.items()}
        log.debug("kfac: %d layers from %d groups of %d samples", len(blocks), s.num_grads,
                  s.grad_batch)
        if diagonal is not None and damp != o.damp:  # damp_mode relative: the same scale
            diagonal = DiagonalCurvature(
                {n: 1.0 / (1.0 / d - o.damp + damp) for n, d in diagonal.inverse_diag.items()},
                damp)
        return KfacCurvature(blocks, o.joint_max, damp, diagonal)


@hookimpl
def wfcore_estimators():
    return {"kfac": Kfac}
