"""obs and woodtaylor on a WoodFisher curvature, against the float64 references."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_woodfisher import (
    BLOCKS,
    CONV_BLOCKS,
    CONV_SHAPES,
    D,
    close,
    fit,
    flat,
    problem_data,
    tree,
)
from wfcore.plugins.diag_fisher import DiagonalCurvature
from wfcore.plugins.magnitude import IdentityCurvature
from wfcore.plugins.scorers import Obs, ObsOptions, WoodTaylor, WoodTaylorOptions, newton_step

from wfcore import manager
from wfcore.masks import block_scores

DAMP = 0.05


@pytest.fixture()
def G() -> torch.Tensor:
    return torch.randn(12, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def scorer_names() -> list[str]:
    return manager.build().registry("scorers").names()


@pytest.mark.parametrize("name", scorer_names())
@pytest.mark.parametrize("curvature", ["woodfisher", "identity"])
def test_every_scorer_gives_one_finite_score_per_weight(G, name, curvature):
    entry, _ = manager.build().registry("scorers").lookup(name, "scorer.name")
    scorer = entry.factory(entry.options_class() if entry.options_class else {})
    cur = fit(G, damp=DAMP, block_size=5)
    if curvature == "identity":
        cur = IdentityCurvature({n: torch.empty(s) for n, s in cur.layout.shapes.items()})
    w, mask, _ = problem_data()
    layout = fit(G).layout
    weights = layout.unflatten(w)
    gradient = layout.unflatten(G.mean(0)) if scorer.needs_gradient else None
    scores = scorer.scores(weights, cur, gradient)
    for n, s in scores.items():
        assert s.shape == weights[n].shape and torch.isfinite(s).all()
    update = scorer.update(weights, cur, layout.unflatten(mask), gradient)
    if update is not None:
        assert all(torch.isfinite(u).all() for u in update.values())


@pytest.mark.parametrize("mode", ["independent", "joint"])
def test_obs_update_is_the_curvature_update(G, mode):
    cur = fit(G, damp=DAMP, block_size="layer")
    F_inv = ref.inverse(ref.block_fisher(G, DAMP, BLOCKS["layer"]))
    w, mask, Q = problem_data()
    scorer = Obs(ObsOptions(update=mode))
    scores = flat(cur, scorer.scores(tree(cur, w), cur, None))
    torch.testing.assert_close(scores, w**2 / (2 * F_inv.diagonal()), rtol=1e-9, atol=0)
    dw = flat(cur, scorer.update(tree(cur, w), cur, tree(cur, mask), None))
    expected = (ref.joint_update if mode == "joint" else ref.independent_update)(F_inv, w, Q)
    torch.testing.assert_close(dw, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["independent", "joint"])
def test_woodtaylor_without_safeguard_matches_the_first_order_obs(G, mode):
    """damp=0: the full Newton step, then OBS on the stepped weights."""
    cur = fit(G, damp=DAMP, block_size="layer")
    F_inv = ref.inverse(ref.block_fisher(G, DAMP, BLOCKS["layer"]))
    w, mask, Q = problem_data()
    g = G.mean(0)
    scorer = WoodTaylor(WoodTaylorOptions(update=mode, damp=0.0))
    scores = flat(cur, scorer.scores(tree(cur, w), cur, tree(cur, g)))
    stepped = w - F_inv @ g
    torch.testing.assert_close(scores, stepped**2 / (2 * F_inv.diagonal()), rtol=1e-9, atol=0)
    dw = flat(cur, scorer.update(tree(cur, w), cur, tree(cur, mask), tree(cur, g)))
    obs = (ref.joint_update if mode == "joint" else ref.independent_update)(F_inv, stepped, Q)
    torch.testing.assert_close(dw, -F_inv @ g + obs, rtol=1e-9, atol=1e-12)
    if mode == "joint":  # the first-order joint update zeroes the pruned set too
        assert (w + dw)[mask].abs().max() < 1e-10


def test_woodtaylor_step_scale_is_the_line_search_minimum(G):
    cur = fit(G, damp=DAMP, block_size="full")
    F = ref.block_fisher(G, DAMP, BLOCKS["full"])
    g = G.mean(0)
    for damp in (0.0, 0.01, 0.1, 1.0):
        step, alpha = newton_step(cur, tree(cur, g), damp, max_step=1.0)
        s = -torch.linalg.solve(F, g)
        # alpha minimises a g^T s + a^2/2 (s^T F s + damp |s|^2)
        expected = -(g @ s) / (s @ F @ s + damp * s @ s)
        assert alpha == pytest.approx(float(expected), rel=1e-9)
        torch.testing.assert_close(flat(cur, step), alpha * s, rtol=1e-9, atol=1e-12)
    assert newton_step(cur, tree(cur, g), 1.0, 1.0)[1] < newton_step(cur, tree(cur, g), 0.1,
                                                                       1.0)[1]


def test_woodtaylor_with_zero_gradient_is_obs(G):
    cur = fit(G, damp=DAMP, block_size=5)
    w, mask, _ = problem_data()
    zero = tree(cur, torch.zeros(D, dtype=torch.float64))
    obs, wt = Obs(ObsOptions(update="joint")), WoodTaylor(WoodTaylorOptions(update="joint"))
    torch.testing.assert_close(flat(cur, wt.scores(tree(cur, w), cur, zero)),
                               flat(cur, obs.scores(tree(cur, w), cur, None)))
    torch.testing.assert_close(flat(cur, wt.update(tree(cur, w), cur, tree(cur, mask), zero)),
                               flat(cur, obs.update(tree(cur, w), cur, tree(cur, mask), None)))


def group_problem(seed: int = 3):
    """Weights of CONV_SHAPES (90), nonzero everywhere, and masks with a third pruned."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(90, generator=gen, dtype=torch.float64)
    keep = torch.rand(90, generator=gen) > 0.33
    return w, keep


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("block_size", list(CONV_BLOCKS))
def test_group_obs_scores_match_brute_force(form, block_size):
    G = torch.randn(12, 90, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cur = fit(G, CONV_SHAPES, damp=DAMP, form=form, block_size=block_size)
    F_inv = ref.inverse(ref.block_fisher(G, DAMP, CONV_BLOCKS[block_size]))
    w, keep = group_problem()
    scores = flat(cur, Obs().block_scores(tree(cur, w), cur, None, tree(cur, keep), 4))
    expected = torch.zeros(90, dtype=torch.float64)
    sizes = set()
    for group in ref.block_groups(CONV_SHAPES, 4):
        Q = [q for q in group if keep[q]]  # pruned members stay zero: out of the solve
        sizes.add((len(group), len(Q)))
        if Q:
            expected[Q] = ref.joint_increase(F_inv, w, Q) / len(Q)
    assert {(4, 2), (4, 4), (2, 2), (2, 1), (1, 1)} <= sizes  # the cases are all there
    close(scores[keep], expected[keep])


def test_group_obs_scores_differ_from_the_mean_of_single_scores(G):
    cur = fit(G, damp=DAMP, block_size="layer")
    w, keep = torch.randn(D, dtype=torch.float64), torch.ones(D, dtype=torch.bool)
    grouped = Obs().block_scores(tree(cur, w), cur, None, tree(cur, keep), 2)
    mean = block_scores(Obs().scores(tree(cur, w), cur, None), tree(cur, keep), 2)
    assert not torch.allclose(grouped["a"], mean["a"])


def test_block_of_one_gives_the_single_weight_scores(G):
    cur = fit(G, damp=DAMP, block_size=5)
    w, mask, _ = problem_data()
    single = Obs().scores(tree(cur, w), cur, None)
    grouped = Obs().block_scores(tree(cur, w), cur, None, tree(cur, ~mask), 1)
    assert all(torch.equal(grouped[n], single[n]) for n in single)


@pytest.mark.parametrize("curvature", ["diagonal", "identity"])
def test_group_obs_of_a_diagonal_curvature_is_the_mean_of_single_scores(curvature):
    gen = torch.Generator().manual_seed(6)
    inverse = {n: torch.rand(s, generator=gen, dtype=torch.float64) + 0.5
               for n, s in CONV_SHAPES.items()}
    cur = (DiagonalCurvature(inverse) if curvature == "diagonal"
           else IdentityCurvature({n: torch.empty(s) for n, s in CONV_SHAPES.items()}))
    w, keep = group_problem()
    layout = fit(torch.zeros(2, 90), CONV_SHAPES).layout
    weights, masks = layout.unflatten(w), layout.unflatten(keep)
    grouped = Obs().block_scores(weights, cur, None, masks, 4)
    mean = block_scores(Obs().scores(weights, cur, None), masks, 4)
    for n in grouped:
        close(grouped[n][masks[n]], mean[n][masks[n]])
