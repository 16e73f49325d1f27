"""diag_fisher and random: their curvatures against explicit references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wfcore.plugins.diag_fisher import DiagFisher, DiagFisherOptions
from wfcore.plugins.random_pruning import (
    RandomEstimator,
    RandomOptions,
    RandomScorer,
    RandomScorerOptions,
)

from wfcore.fisher.gradients import GradientSampler
from wfcore.fisher.store import GradientStore
from wfcore.interfaces import PruningProblem
from wfcore.masks import Masks, select_params


def problem(seed: int = 0) -> PruningProblem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(30, 6, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (30,), generator=g))
    params = select_params(model, None)
    masks = Masks(params)
    loss_fn = nn.CrossEntropyLoss()
    sampler = GradientSampler(model, params, masks.keep, data, loss_fn, num_grads=12,
                              seed=seed, dtype=torch.float64, progress=False)
    return PruningProblem(model, params, masks, sampler, loss_fn, torch.device("cpu"))


def test_diag_fisher_is_the_inverse_of_the_damped_gradient_second_moment():
    prob = problem()
    G = prob.source.sample()  # (m, d)
    prob.gradients = GradientStore.from_tensor(G)
    curvature = DiagFisher(DiagFisherOptions(damp=1e-4)).fit(prob)
    expected = prob.source.layout.unflatten(1.0 / (G.pow(2).mean(0) + 1e-4))
    diag = curvature.inverse_diagonal()
    v = {n: torch.randn_like(p) for n, p in prob.params.items()}
    mul = curvature.inverse_mul(v)
    for n in prob.params:
        torch.testing.assert_close(diag[n], expected[n], rtol=1e-12, atol=0)
        torch.testing.assert_close(mul[n], expected[n] * v[n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["independent", "joint"])
def test_diagonal_updates_only_zero_the_pruned_weights(mode):
    prob = problem()
    curvature = DiagFisher(DiagFisherOptions()).fit(prob.with_gradients())
    w = prob.weights()
    prune = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.4
             for n, t in w.items()}
    dw = curvature.prune_update(prune, w, mode)
    for n in w:
        torch.testing.assert_close(w[n] + dw[n], torch.where(prune[n], 0.0, w[n]))


def test_random_scores_are_seeded_uniform_draws():
    prob = problem()
    w = prob.weights()
    first = next(iter(w))
    w[first][0] = 0.0  # weights already at zero score 0 and go first
    curvature = RandomEstimator(RandomOptions()).fit(prob)
    scorers = [RandomScorer(RandomScorerOptions(seed=3)), RandomScorer(RandomScorerOptions(seed=3)),
               RandomScorer(RandomScorerOptions(seed=4)), RandomScorer(seed=3)]
    scores = [s.scores(w, curvature, None) for s in scorers]
    g = torch.Generator().manual_seed(3)
    for n in w:  # u, the seed's draws parameter by parameter, where the weight is not zero
        u = 1.0 - torch.rand(w[n].shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(scores[0][n], torch.where(w[n] != 0, u, 0.0), rtol=0, atol=0)
        assert torch.equal(scores[0][n], scores[1][n])
        assert torch.equal(scores[0][n], scores[3][n])  # no seed option: the run's seed
        assert not torch.equal(scores[0][n], scores[2][n])
    again = scorers[0].scores(w, curvature, None)  # each step draws afresh
    assert not torch.equal(again[first], scores[0][first])


def test_the_random_estimator_pairs_an_identity_curvature_with_random_scores():
    prob = problem()
    estimator = RandomEstimator(RandomOptions(seed=5))
    scorer = estimator.paired_scorer()
    assert isinstance(scorer, RandomScorer) and scorer.options.seed == 5
    w = prob.weights()
    prune = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.4
             for n, t in w.items()}
    curvature = estimator.fit(prob)
    for mode in ("independent", "joint"):  # the update only zeroes the pruned weights
        dw = curvature.prune_update(prune, w, mode)
        for n in w:
            assert torch.equal(w[n] + dw[n], torch.where(prune[n], 0.0, w[n]))
    assert scorer.update(w, curvature, prune, None) is None
