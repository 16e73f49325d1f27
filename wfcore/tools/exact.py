"""Exact curvatures of the loss over a fixed set of samples, for `wfcore analyze`.

The loss is a function of the analysed weights only (flattened in ``ParamLayout`` order);
every other parameter and buffer is held fixed. With N samples (x_n, y_n) and the
per-sample loss l(w; x, y):

    L(w)    = (1/N) sum_n l(w; x_n, y_n)
    H       = d^2 L / dw^2                                  (torch.func: forward-over-reverse)
    F_emp   = (1/N) sum_n g_n g_n^T,  g_n = dl(w; x_n, y_n)/dw   (the data's labels)
    F_true  = (1/N) sum_n sum_c p_c(x_n) g_nc g_nc^T, g_nc = dl(w; x_n, c)/dw

F_true is the expectation over the model's own predicted label distribution, summed
exactly over the classes (not sampled). Everything is accumulated in float64; the model
computes in its own dtype (a float64 model gives float64 throughout, as the tests use).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from wfcore import progress as progress_bars
from wfcore.fisher.gradients import ParamLayout
from wfcore.interfaces import Curvature, Loss, Tensors

log = logging.getLogger(__name__)

HVP_COLUMNS = 32  # Hessian columns (tangent vectors) per vmapped forward-over-reverse call
WEIGHT_ROWS = 32  # perturbed weight vectors per vmapped loss evaluation
PER_CLASS_BYTES = 256 * 2**20  # per-sample, per-class gradients held at once


class ExactLoss:
    """The mean loss over fixed samples as a function of the flat analysed weights."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor,
                 y: torch.Tensor, loss_fn: Loss, *, batch_size: int = 256,
                 progress: bool = True):
        self.model = model
        self.layout = ParamLayout(params)
        self.w0 = self.layout.flatten({n: p.detach() for n, p in params.items()})  # (d,)
        self.fixed = {n: t.detach() for n, t in
                      [*model.named_parameters(), *model.named_buffers()] if n not in params}
        self.x, self.y = x, y  # (N, *input), (N,)
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.progress = progress

    @property
    def d(self) -> int:
        return self.layout.d

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def _batches(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(x, y, weight) chunks; the weights (chunk size / N) sum to one."""
        n = self.num_samples
        return [(self.x[i:i + self.batch_size], self.y[i:i + self.batch_size],
                 min(self.batch_size, n - i) / n) for i in range(0, n, self.batch_size)]

    def logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.fixed, **self.layout.unflatten(w)}, (x,))

    def batch_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.logits(w, x), y)

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, delay=1,
                    disable=progress_bars.disabled(not self.progress))

    # -- values -------------------------------------------------------------------------
    def loss(self, w: torch.Tensor | None = None) -> float:
        w = self.w0 if w is None else w
        with torch.no_grad():
            return float(sum(c * self.batch_loss(w, x, y).double() for x, y, c in self._batches()))

    def losses(self, W: torch.Tensor, desc: str = "losses") -> torch.Tensor:
        """(k,) float64: L at each row of W (k, d)."""
        batched = vmap(self.batch_loss, in_dims=(0, None, None))
        out = torch.zeros(len(W), dtype=torch.float64)
        with torch.no_grad(), self._bar(len(W), desc) as bar:
            for i in range(0, len(W), WEIGHT_ROWS):
                rows = W[i:i + WEIGHT_ROWS].to(self.w0)
                out[i:i + len(rows)] = sum(c * batched(rows, x, y).double().cpu()
                                           for x, y, c in self._batches())
                bar.update(len(rows))
        return out

    def gradient(self) -> torch.Tensor:
        """(d,) float64: dL/dw at w0."""
        return sum(c * grad(self.batch_loss)(self.w0, x, y).double()
                   for x, y, c in self._batches())

    # -- curvatures ---------------------------------------------------------------------
    def hessian_columns(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(k, d): H_batch v for each row v of V (k, d), forward-over-reverse."""
        def hvp(v: torch.Tensor) -> torch.Tensor:
            return jvp(lambda w: grad(self.batch_loss)(w, x, y), (self.w0,), (v,))[1]

        return vmap(hvp)(V)

    def hessian(self) -> torch.Tensor:
        """(d, d) float64: the exact Hessian of L at w0."""
        d = self.d
        H = torch.zeros(d, d, dtype=torch.float64)
        eye = torch.eye(d, dtype=self.w0.dtype, device=self.w0.device)
        batches = self._batches()
        with self._bar(d * len(batches), "exact Hessian") as bar:
            for x, y, c in batches:
                for j in range(0, d, HVP_COLUMNS):
                    V = eye[j:j + HVP_COLUMNS]
                    H[j:j + len(V)] += c * self.hessian_columns(V, x, y).double().cpu()
                    bar.update(len(V))
        return (H + H.T) / 2  # rows are H e_j; symmetric up to round-off

    def per_class_gradients(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(n, C, d): dl(w0; x_n, c)/dw for every sample of x and every class c."""
        def sample_loss(w: torch.Tensor, x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.batch_loss(w, x1.unsqueeze(0), c.unsqueeze(0))

        per_class = vmap(grad(sample_loss), in_dims=(None, None, 0))
        return vmap(per_class, in_dims=(None, 0, None))(self.w0, x, classes)

    def fishers(self, keep_gradients: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact empirical and true Fisher (d, d), float64, and the first
        ``keep_gradients`` per-sample gradients with the data's labels (k, d).
        """
        d = self.d
        with torch.no_grad():
            num_classes = self.logits(self.w0, self.x[:1]).shape[-1]
        classes = torch.arange(num_classes, device=self.x.device)
        rows = max(1, min(self.batch_size, PER_CLASS_BYTES // (num_classes * d * 8)))
        F_emp = torch.zeros(d, d, dtype=torch.float64)
        F_true = torch.zeros(d, d, dtype=torch.float64)
        kept, have = [], 0
        n = self.num_samples
        with self._bar(n, "exact Fishers") as bar:
            for i in range(0, n, rows):
                x, y = self.x[i:i + rows], self.y[i:i + rows]
                G = self.per_class_gradients(x, classes).double().cpu()  # (r, C, d)
                with torch.no_grad():
                    p = torch.softmax(self.logits(self.w0, x).double(), dim=-1).cpu()  # (r, C)
                g = G[torch.arange(len(x)), y.cpu()]  # (r, d): the data's labels
                weighted = (G * p.sqrt().unsqueeze(-1)).reshape(-1, d)  # (r*C, d)
                F_emp += g.T @ g
                F_true += weighted.T @ weighted
                kept.append(g[:keep_gradients - have])
                have += len(kept[-1])
                bar.update(len(x))
        return F_emp / n, F_true / n, torch.cat(kept)


def damped_inverse(A: torch.Tensor, damp: float, psd: bool) -> tuple[torch.Tensor, dict]:
    """(A + damp I)^-1 through the eigendecomposition of a symmetric A (float64).

    ``psd``: negative eigenvalues are clipped to zero first (the OBS quadratic model needs a
    positive semi-definite curvature). Returns the inverse and a summary of the spectrum.
    """
    eigvals, Q = torch.linalg.eigh(A.double())
    spectrum = {"min": float(eigvals[0]), "max": float(eigvals[-1]),
                "negative": int((eigvals < 0).sum()),
                "negative_mass": float(eigvals.clamp(max=0).abs().sum() / eigvals.abs().sum())}
    if psd:
        eigvals = eigvals.clamp(min=0)
    return (Q / (eigvals + damp)) @ Q.T, spectrum


class DenseCurvature(Curvature):
    """An explicit (d, d) inverse curvature over the flat analysed weights."""

    def __init__(self, inverse: torch.Tensor, layout: ParamLayout):
        self.inverse = inverse  # (d, d) float64
        self.layout = layout

    def inverse_diagonal(self) -> Tensors:
        return self.layout.unflatten(torch.diagonal(self.inverse).clone())

    def inverse_mul(self, v: Tensors) -> Tensors:
        return self.layout.unflatten(self.inverse @ self.layout.flatten(v).double())

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        if mode != "joint":
            return super().prune_update(prune_mask, w, mode)
        Q = self.layout.flatten(prune_mask).nonzero().squeeze(1)  # (|Q|,)
        w_Q = self.layout.flatten(w).double()[Q]
        dw = -self.inverse[:, Q] @ torch.linalg.solve(self.inverse[Q][:, Q], w_Q)
        return self.layout.unflatten(dw)
