"""wfcore.testing's contract checks over every registered component (timm-style), and the
checks themselves failing on a broken component. The layering of the imports is
tests/test_architecture.py's."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from wfcore import manager, testing
from wfcore.interfaces import Curvature, HessianEstimator

PLUGINS = manager.build()


def make(kind: str, name: str, **options):
    entry, extra = PLUGINS.registry(kind).lookup(name, name)
    cls = entry.options_class
    return entry.factory(cls(**options) if cls is not None else {}, **extra)


@pytest.mark.parametrize("name", PLUGINS.registry("estimators").names())
def test_every_estimator_meets_the_curvature_contract(name):
    options = {"damp_mode": "absolute", "damp": 1e-2} if name in ("woodfisher",
                                                                   "diag_fisher") else {}
    testing.check_curvature(make("estimators", name, **options))


@pytest.mark.parametrize("name", PLUGINS.registry("scorers").names())
def test_every_scorer_gives_finite_scores_and_updates(name):
    testing.check_scorer(make("scorers", name), make("estimators", "diag_fisher"))


@pytest.mark.parametrize("name", [n for n in PLUGINS.registry("allocators").names()
                                  if n != "manual"])
def test_every_allocator_reaches_its_targets(name):
    testing.check_allocator(make("allocators", name))


@pytest.mark.parametrize("name, options", [("mnist5k", {}), ("digits", {}),
                                           ("fake", {"train_size": 8, "test_size": 4})])
def test_every_embedded_dataset_is_consistent(name, options):
    entry, _ = PLUGINS.registry("datasets").lookup(name, name)
    data = OmegaConf.create({"name": name, "root": None, "batch_size": 8, "num_workers": 0})
    cls = entry.options_class
    testing.check_dataset(entry.factory(cls(**options) if cls else {}, data))


class Asymmetric(Curvature):
    """A broken curvature: F^-1 v mixes weights one way only."""

    def __init__(self, params):
        self.params = params

    def inverse_diagonal(self):
        return {n: torch.ones_like(p) for n, p in self.params.items()}

    def inverse_mul(self, v):
        first = next(iter(v))
        out = {n: t.clone() for n, t in v.items()}
        out[first] = out[first] + 0.5 * torch.roll(v[first], 1)
        return out


class Broken(HessianEstimator):
    def fit(self, problem):
        return Asymmetric(problem.params)


def test_check_curvature_catches_a_broken_curvature():
    with pytest.raises(AssertionError, match="not symmetric"):
        testing.check_curvature(Broken())


class SwappedBlocks(HessianEstimator):
    """A broken curvature: the groups' blocks of F^-1 come in the wrong order."""

    def fit(self, problem):
        curvature = make("estimators", "woodfisher", damp_mode="absolute",
                         damp=1e-2).fit(problem)
        blocks = curvature.inverse_blocks
        curvature.inverse_blocks = lambda block: {n: t.flip(-3) for n, t in
                                                  blocks(block).items()}
        return curvature


def test_check_curvature_catches_wrong_inverse_blocks():
    with pytest.raises(AssertionError, match=r"inverse_blocks\(4\)"):
        testing.check_curvature(SwappedBlocks())
