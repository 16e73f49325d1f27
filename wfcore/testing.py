"""Contract checks for plugin authors: call them from your own tests.

Each check builds a small problem, runs the component and compares it with brute force in
float64, raising ``AssertionError`` with what is wrong. The built-in test suite runs the
same checks over every registered component.

    from wfcore.testing import check_curvature
    check_curvature(MyEstimator(MyOptions()))
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import TensorDataset

from wfcore.fisher.gradients import GradientSampler, ParamLayout
from wfcore.interfaces import (
    Allocator,
    Curvature,
    DataBundle,
    HessianEstimator,
    PruningProblem,
    Scorer,
)
from wfcore.masks import Masks, select_params


def small_problem(seed: int = 0, num_grads: int = 16) -> PruningProblem:
    """A two-layer float64 MLP (6 -> 5 -> 3, 45 prunable weights) with 64 labelled samples
    and its gradient sampler: small enough for explicit d x d matrices."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(64, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (64,), generator=g))
    params = select_params(model, None)
    masks = Masks(params)
    loss_fn = nn.CrossEntropyLoss()
    sampler = GradientSampler(model, params, masks.keep, data, loss_fn, num_grads=num_grads,
                              seed=seed, dtype=torch.float64, progress=False)
    return PruningProblem(model, params, masks, sampler, loss_fn, torch.device("cpu"))


def fit(estimator: HessianEstimator, problem: PruningProblem) -> Curvature:
    """``estimator.fit(problem)``, its gradient rows sampled first when it reads them and the
    problem holds none (as a run's gradient stage does)."""
    if estimator.needs_gradients and problem.gradients is None:
        problem = problem.with_gradients()
    return estimator.fit(problem)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    scale = float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"{what}: max |difference| {err:.3g} (scale {scale:.3g})"


def group_blocks(F_inv: torch.Tensor, layout: ParamLayout, block: int) -> dict[str, torch.Tensor]:
    """The reference for ``Curvature.inverse_blocks``: [F^-1]_GG of every ``structure.block``
    group, read entry by entry from an explicit (d, d) ``F_inv``.

    Weight (o, c, *k) is member c % block of group (o, *k, c // block); a row's smaller
    last group is padded with the identity; a parameter of fewer than 2 dimensions has
    groups of one weight, (*shape, 1, 1).
    """
    out = {}
    for n, shape in layout.shapes.items():
        flat = torch.arange(layout.numels[n]).view(shape) + layout.offsets[n]
        if len(shape) < 2:
            out[n] = F_inv.diagonal()[flat][..., None, None].clone()
            continue
        groups = -(-shape[1] // block)
        S = torch.eye(block, dtype=torch.float64).repeat(shape[0], *shape[2:], groups, 1, 1)
        for index in itertools.product(*map(range, shape)):
            g, i = divmod(index[1], block)
            for j in range(min(block, shape[1] - g * block)):
                other = (index[0], g * block + j, *index[2:])
                at = (index[0], *index[2:], g, i, j)
                S[at] = F_inv[flat[index], flat[other]]
        out[n] = S
    return out


def check_curvature(estimator: HessianEstimator, problem: PruningProblem | None = None,
                    rtol: float = 1e-6) -> None:
    """Fit ``estimator`` on a small problem and check its Curvature against brute force:

    - ``inverse_diagonal`` has each parameter's shape, finite and positive values;
    - ``inverse_mul`` is linear, symmetric and positive definite, and its diagonal is
      ``inverse_diagonal`` (the explicit F^-1 is built column by column);
    - ``prune_update(..., "independent")`` is the sum of single-weight OBS updates;
    - ``inverse_blocks(block)``, where supported, holds the blocks of that F^-1 over the
      groups of 4 and of 3 input channels (``group_blocks``);
    - ``prune_update(..., "joint")``, where supported, is -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q.
    """
    problem = problem or small_problem()
    layout = ParamLayout(problem.params)
    curvature = fit(estimator, problem)
    diag = curvature.inverse_diagonal()
    for n, p in problem.params.items():
        assert n in diag, f"inverse_diagonal has no entry for '{n}'"
        assert diag[n].shape == p.shape, f"inverse_diagonal['{n}'] has shape " \
            f"{tuple(diag[n].shape)}, not {tuple(p.shape)}"
        assert torch.isfinite(diag[n]).all() and (diag[n] > 0).all(), \
            f"inverse_diagonal['{n}'] is not finite and positive"
    d = layout.d
    eye = torch.eye(d, dtype=torch.float64)
    columns = [layout.flatten({k: t.double() for k, t in curvature.inverse_mul(
        {k: v.to(problem.params[k].dtype) for k, v in layout.unflatten(eye[j]).items()}
    ).items()}) for j in range(d)]
    F_inv = torch.stack(columns, dim=1)  # (d, d)
    _close(F_inv, F_inv.T, "inverse_mul is not symmetric", rtol)
    assert float(torch.linalg.eigvalsh((F_inv + F_inv.T) / 2).min()) > 0, \
        "inverse_mul is not positive definite"
    _close(F_inv.diagonal(), layout.flatten({k: t.double() for k, t in diag.items()}),
           "the diagonal of inverse_mul is not inverse_diagonal", rtol)
    for block in (4, 3):
        blocks = curvature.inverse_blocks(block)
        if blocks is None:
            break
        for n, expected in group_blocks(F_inv, layout, block).items():
            assert n in blocks and blocks[n].shape == expected.shape, \
                f"inverse_blocks({block}) has no entry of shape {tuple(expected.shape)} for '{n}'"
            _close(blocks[n].double(), expected, f"inverse_blocks({block})['{n}'] is not the "
                   "groups' blocks of inverse_mul", rtol)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    Q = torch.zeros(d, dtype=torch.bool)
    Q[torch.randperm(d, generator=g)[: d // 3]] = True
    weights = {k: t.to(problem.params[k].dtype) for k, t in layout.unflatten(w).items()}
    prune = layout.unflatten(Q)
    independent = layout.flatten({k: t.double() for k, t in curvature.prune_update(
        prune, weights, "independent").items()})
    u = torch.where(Q, w / F_inv.diagonal(), torch.zeros_like(w))
    _close(independent, -F_inv @ u, "prune_update(independent) is not the sum of "
           "single-weight OBS updates", rtol)
    try:
        joint_update = curvature.prune_update(prune, weights, "joint")
    except NotImplementedError:
        return
    joint = layout.flatten({k: t.double() for k, t in joint_update.items()})
    idx = Q.nonzero().flatten()
    x = torch.zeros(d, dtype=torch.float64)
    x[idx] = torch.linalg.solve(F_inv[idx][:, idx], w[idx])
    _close(joint, -F_inv @ x, "prune_update(joint) is not the exact OBS update", rtol)


def check_scorer(scorer: Scorer, estimator: HessianEstimator,
                 problem: PruningProblem | None = None) -> None:
    """One finite score per weight, of each parameter's shape, and an update (if any) of the
    same shapes, on a small problem with ``estimator``'s curvature."""
    problem = problem or small_problem()
    curvature = fit(estimator, problem)
    weights = problem.weights()
    gradient = None
    if scorer.needs_gradient:
        gradient = ParamLayout(problem.params).unflatten(problem.source.sample().mean(0))
    scores = scorer.scores(weights, curvature, gradient)
    prune = {}
    for n, w in weights.items():
        assert scores[n].shape == w.shape, f"scores['{n}'] has shape {tuple(scores[n].shape)}"
        assert torch.isfinite(scores[n]).all(), f"scores['{n}'] are not all finite"
        prune[n] = scores[n] <= scores[n].flatten().median()
    update = scorer.update(weights, curvature, prune, gradient)
    if update is not None:
        for n, w in weights.items():
            assert update[n].shape == w.shape and torch.isfinite(update[n]).all(), \
                f"update['{n}'] is misshapen or not finite"


def check_allocator(allocator: Allocator, targets: tuple[float, ...] = (0.3, 0.6, 0.9)) \
        -> None:
    """Masks of the scores' shapes that reach each target (to one weight per layer) and
    never bring back a pruned weight."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (8, 6), "b.weight": (4, 8), "c.weight": (3, 4)}
    scores = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    total = sum(s.numel() for s in scores.values())
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    for target in targets:
        new = allocator.allocate(scores, {n: m.clone() for n, m in masks.items()}, target)
        for n, m in masks.items():
            assert new[n].shape == m.shape and new[n].dtype == torch.bool, \
                f"mask of '{n}' is not a bool tensor of its shape"
            assert not (new[n] & ~m).any(), f"allocator brought back pruned weights in '{n}'"
        zeros = sum(int((~k).sum()) for k in new.values())
        assert abs(zeros - target * total) <= len(shapes), \
            f"target {target}: {zeros} of {total} weights pruned"
        masks = new


def check_dataset(bundle: DataBundle, samples: int = 4) -> None:
    """Non-empty splits whose samples have ``input_shape`` and, for the default
    cross-entropy (no ``loss`` of the data set's own), labels in range."""
    for split in ("train", "test"):
        data = getattr(bundle, split)
        assert len(data) > 0, f"the {split} split is empty"
        for i in range(min(samples, len(data))):
            item = data[i]
            x = item[0] if isinstance(item, (tuple, list)) else item
            assert tuple(x.shape) == tuple(bundle.input_shape), \
                f"{split}[{i}] has shape {tuple(x.shape)}, not {tuple(bundle.input_shape)}"
            if bundle.loss is None and isinstance(item, (tuple, list)) and len(item) > 1:
                y = int(item[1])
                assert 0 <= y < bundle.num_classes, f"{split}[{i}] has label {y} outside " \
                    f"0..{bundle.num_classes - 1}"
