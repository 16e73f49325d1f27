"""The input Hessian of one layer, H = 2 X X^T / n, and the algebra the layer-wise methods
share: damping, dead inputs, the inverse, the OBS solution for a given pruned set, and the
layer's reconstruction error.

A layer's rows (output units) act on input columns: for Linear the input features, for
Conv1d/Conv2d the unfolded patches (``torch.nn.Unfold``, as IST-DASLab/OBC trueobs.py
``TrueOBS.add_batch`` does), column order (in channel, kernel row, kernel column), the
order of ``weight.flatten(1)``. A conv of ``groups`` g is g independent layers: output
rows ``[k*out/g, (k+1)*out/g)`` see input channels ``[k*C/g, (k+1)*C/g)`` only, each with
its own H. ``nn.MultiheadAttention``'s ``in_proj_weight`` (3E, E) is three layers: its
query, key and value rows see the query, key and value inputs. Everything here is tensors
in, tensors out (float64); ``wfcore.plugins.layerwise`` runs the model and the hooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerResult:
    """What a layer-wise method gives for one (rows, columns) weight matrix."""

    weights: torch.Tensor  # (rows, cols) float64, pruned entries exactly 0
    keep: torch.Tensor  # (rows, cols) bool
    error: float  # the reconstruction error tr(dW H dW^T) / 2 it predicts


def columns_of(module: nn.Module, x: torch.Tensor, part: int) -> torch.Tensor:
    """(n, cols): the input columns that the rows of ``part`` (a conv group, or 0) see,
    one row per sample and output position."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise NotImplementedError(f"{type(module).__name__} with padding "
                                      f"{module.padding!r} / {module.padding_mode!r}")
        if isinstance(module, nn.Conv1d):  # as a conv2d of height 1
            x, kernel = x.unsqueeze(-2), (1, *module.kernel_size)
            stride, padding, dilation = (1, *module.stride), (0, *module.padding), \
                (1, *module.dilation)  # (padding: not a string, checked above)
        else:
            kernel, stride, padding, dilation = (module.kernel_size, module.stride,
                                                 module.padding, module.dilation)
        per_group = x.shape[1] // module.groups
        x = x[:, part * per_group:(part + 1) * per_group]
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (n * L, cols)
    raise NotImplementedError(type(module).__name__)


def parts_of(module: nn.Module) -> int:
    """How many independent row blocks (each with its own H) the module's weight has."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups
    if isinstance(module, nn.MultiheadAttention):
        return 3
    return 1


class HessianSum:
    """H = 2 X X^T / n accumulated over batches in float64 (OBC's running mean)."""

    def __init__(self, cols: int, device: torch.device | str):
        self.H = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, X: torch.Tensor) -> None:
        """``X`` (n, cols): more input columns."""
        X = X.detach()
        k = X.shape[0]
        self.H *= self.n / (self.n + k)
        self.n += k
        # X^T X in the inputs' precision, accumulated in float64 (OBC ``add_batch``)
        self.H += (2.0 / self.n) * (X.T @ X).double()


class PairedSum(HessianSum):
    """H of the pruned model's inputs X^ and C = 2 (X - X^)^T X^ / n with the dense
    model's inputs X of the same samples: the layer fitted to W X from X^ starts from
    W* = W + W C (H + damp)^-1, the least-squares weights of ||W X - W* X^||^2 (then
    ||W X - V X^||^2 = ||W* X^ - V X^||^2 + const for every V)."""

    def __init__(self, cols: int, device: torch.device | str):
        super().__init__(cols, device)
        self.C = torch.zeros(cols, cols, dtype=torch.float64, device=device)

    def add_pair(self, X: torch.Tensor, Xh: torch.Tensor) -> None:
        """``X``, ``Xh`` (n, cols): the dense and the pruned model's input columns."""
        k = Xh.shape[0]
        self.C *= self.n / (self.n + k)
        self.add(Xh)
        Xh = Xh.detach().double()
        self.C += (2.0 / self.n) * ((X.detach().double() - Xh).T @ Xh)

    def target(self, W: torch.Tensor, damp: float) -> torch.Tensor:
        """W* (float64) of the (rows, cols) weights ``W`` of the dense model."""
        W = W.double()
        _, _, Hinv = prepare(W, self.H, damp)
        return W + W @ self.C @ Hinv


def prepare(W: torch.Tensor, H: torch.Tensor, damp: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, H, H^-1) in float64 as the reference code starts them: inputs that never fire
    (diag(H) = 0) get H_jj = 1, then ``damp`` times the mean of diag(H) is added to the
    diagonal (sparsegpt.py ``fasterprune``'s ``percdamp``). The reference also zeroes the
    weights of dead inputs; here they keep their values (they do nothing on this data),
    so that the layer holds exactly the zeros its mask says. A Cholesky that fails raises
    the damping tenfold (said in the log)."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    mean = float(torch.diagonal(H).mean())
    step = damp * mean
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + step * eye)
        if int(info) == 0:
            return W, H + step * eye, torch.cholesky_inverse(L)
        log.warning("layer Hessian not positive definite at damp %.3g; raising it tenfold",
                    step / mean)
        step = max(step * 10, 1e-8 * mean)
    raise RuntimeError("layer Hessian is not positive definite even with large damping")


def obs_with_mask(W: torch.Tensor, Hinv: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """(rows, cols): each row's exact OBS solution for its pruned set Q (``prune`` True),
    w - Hinv[:, Q] (Hinv[Q, Q])^-1 w_Q, with w_Q then exactly zero. Sequential single-
    weight OBS removals end at this same point (the greedy path's weights)."""
    out = W.clone()
    for i in range(W.shape[0]):
        Q = prune[i].nonzero().squeeze(1)
        if Q.numel() == 0:
            continue
        w = W[i]
        S = Hinv[Q][:, Q]
        x = torch.linalg.solve(S, w[Q])
        out[i] = w - Hinv[:, Q] @ x
        out[i, Q] = 0.0
    return out


def obs_solve(W: torch.Tensor, H: torch.Tensor, Hinv: torch.Tensor, prune: torch.Tensor
              ) -> torch.Tensor:
    """``obs_with_mask`` through the smaller system of each row: with few weights kept
    (K), w_K + (H_KK)^-1 H_KQ w_Q, the same minimiser of (w' - w)^T H (w' - w) with
    w'_Q = 0; with few pruned, ``obs_with_mask``'s (Hinv_QQ)^-1 form. ``H`` is the damped
    H whose inverse is ``Hinv``."""
    out = W.clone()
    for i in range(W.shape[0]):
        Q = prune[i].nonzero().squeeze(1)
        K = (~prune[i]).nonzero().squeeze(1)
        w = W[i]
        if Q.numel() == 0:
            continue
        if K.numel() < Q.numel():
            row = torch.zeros_like(w)
            if K.numel():
                row[K] = w[K] + torch.linalg.solve(H[K][:, K], H[K][:, Q] @ w[Q])
            out[i] = row
        else:
            out[i] = w - Hinv[:, Q] @ torch.linalg.solve(Hinv[Q][:, Q], w[Q])
            out[i, Q] = 0.0
    return out


def reconstruction_error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W0) H (W - W0)^T) / 2: the layer's squared output error (H = 2 X X^T / n)."""
    dW = (W - W0).double()
    return 0.5 * float(((dW @ H.double()) * dW).sum())


def split_counts(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over parts in proportion to ``sizes``, by cumulative rounding, so
    that the parts add up to ``total`` exactly."""
    whole = sum(sizes)
    out, done, cum = [], 0, 0
    for s in sizes:
        cum += s
        upto = round(total * cum / whole) if whole else 0
        out.append(upto - done)
        done = upto
    return out


def nm_groups(cols: int, m: int) -> torch.Tensor:
    """(cols // m, m): column indices of each group of m consecutive columns."""
    return torch.arange(cols - cols % m).reshape(-1, m)
