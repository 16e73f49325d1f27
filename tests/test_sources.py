"""The data an estimator sees: PruningProblem.source (a GradientSource) and its batches."""

from __future__ import annotations

import pytest
import torch

from wfcore import testing
from wfcore.errors import WfcoreDeprecationWarning, WfcoreError
from wfcore.fisher.store import GradientStore
from wfcore.interfaces import GradientRows, GradientSource, HessianEstimator, PruningProblem


class OldStyleDiagonal(HessianEstimator):
    """A third-party estimator written against the sampler field of earlier releases."""

    needs_gradients = False

    def fit(self, problem: PruningProblem):
        from wfcore.plugins.diag_fisher import DiagonalCurvature

        G = problem.sampler.sample()  # (m, d)
        inverse = problem.layout().unflatten(1.0 / (G.pow(2).mean(0) + 1e-3))
        return DiagonalCurvature(inverse)


def test_the_sampler_and_the_store_implement_their_protocols():
    problem = testing.small_problem()
    assert isinstance(problem.source, GradientSource)
    assert isinstance(GradientStore.from_tensor(torch.zeros(2, 3)), GradientRows)


def test_an_estimator_that_reads_problem_sampler_works_and_is_told_the_replacement():
    problem = testing.small_problem()
    with pytest.warns(WfcoreDeprecationWarning, match=r"PruningProblem\.source"):
        curvature = OldStyleDiagonal().fit(problem)
    G = testing.small_problem().source.sample()  # the same seed: the same gradients
    expected = problem.layout().unflatten(1.0 / (G.pow(2).mean(0) + 1e-3))
    diag = curvature.inverse_diagonal()
    for n in expected:
        torch.testing.assert_close(diag[n], expected[n], rtol=1e-12, atol=0)
    with pytest.warns(FutureWarning, match=r"gradient_rows\(\)"):  # shown by default
        problem.with_gradients().gradient_source()


def test_batches_give_the_data_or_labels_drawn_from_the_model():
    problem = testing.small_problem()
    x, y = problem.source.dataset.tensors
    seen_x, seen_y = zip(*problem.batches(100, 24), strict=True)
    assert [len(b) for b in seen_x] == [24, 24, 16, 24, 12]  # 64 samples, then a new pass
    first = torch.cat(seen_x[:3])
    order = [int((x == row).all(1).nonzero()) for row in first]
    assert sorted(order) == list(range(64))  # each sample once per pass
    assert torch.equal(torch.cat(seen_y[:3]), y[order])

    def sampled(seed: int) -> torch.Tensor:
        source = testing.small_problem(seed=0).source
        source.labels, source.seed = "sampled", seed
        source.reset()
        return torch.cat([t for _, t in source.batches(64, 64)])

    drawn = sampled(3)
    assert torch.equal(drawn, sampled(3)) and not torch.equal(drawn, sampled(4))
    assert drawn.dtype == torch.long and 0 <= int(drawn.min()) and int(drawn.max()) < 3


def test_gradient_rows_never_sample_on_their_own():
    problem = testing.small_problem()
    with pytest.raises(WfcoreError, match=r"no gradient rows.*with_gradients\(\)"):
        problem.gradient_rows()
    assert problem.gradients is None
    rows = problem.with_gradients().gradient_rows()
    torch.testing.assert_close(rows.tensor(), testing.small_problem().source.sample(),
                               rtol=0, atol=0)  # the same seed: the same rows
