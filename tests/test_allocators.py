"""global and uniform reach the requested sparsity exactly and keep pruned weights pruned."""

from __future__ import annotations

import pytest
import torch

from wfcore import manager


def random_layers(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (30, 20), "b": (7, 3, 3, 3), "c": (10, 5)}
    scores = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    return scores, masks


def allocator(name: str, **options):
    entry, _ = manager.build().registry("allocators").lookup(name, "allocator.name")
    made = entry.options_class(**options) if entry.options_class else {}
    return entry.factory(made)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.5, 0.9, 0.95, 0.99])
def test_global_reaches_target_exactly_and_prunes_the_lowest(target):
    """A pure threshold (floor 0): the lowest scores go, whichever layer they are in."""
    scores, masks = random_layers()
    new = allocator("global", floor=0.0).allocate(scores, masks, target)
    total = sum(s.numel() for s in scores.values())
    zeros = sum(int((~k).sum()) for k in new.values())
    assert zeros == round(target * total)
    flat_s = torch.cat([scores[n].reshape(-1) for n in scores])
    flat_k = torch.cat([new[n].reshape(-1) for n in scores])
    if 0 < zeros < total:
        assert flat_s[~flat_k].max() <= flat_s[flat_k].min()


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9, 0.95])
def test_uniform_reaches_target_in_every_layer(target):
    scores, masks = random_layers(1)
    new = allocator("uniform").allocate(scores, masks, target)
    for n, k in new.items():
        assert int((~k).sum()) == round(target * k.numel())
        assert scores[n][~k].max() <= scores[n][k].min()


@pytest.mark.parametrize("name", ["global", "uniform"])
def test_already_pruned_weights_stay_pruned(name):
    scores, masks = random_layers(2)
    first = allocator(name).allocate(scores, masks, 0.5)
    # The previously pruned weights now get the highest scores: they must stay pruned.
    rescored = {n: torch.where(first[n], scores[n], torch.full_like(scores[n], 10.0))
                for n in scores}
    second = allocator(name).allocate(rescored, first, 0.8)
    for n in scores:
        assert not (second[n] & ~first[n]).any()
    total = sum(s.numel() for s in scores.values())
    zeros = sum(int((~k).sum()) for k in second.values())
    assert abs(zeros - 0.8 * total) <= len(scores)


@pytest.mark.parametrize("k", [0, 1, 7, 50, 199, 200, 250])
def test_lowest_equals_the_first_k_of_a_stable_sort(k):
    from wfcore.plugins.allocators import lowest

    g = torch.Generator().manual_seed(k)
    # few distinct values, infinities among them: ties everywhere, broken by position
    s = torch.randint(0, 5, (200,), generator=g).double()
    s[torch.randperm(200, generator=g)[:30]] = float("inf")
    s[torch.randperm(200, generator=g)[:10]] = float("-inf")
    expected = torch.zeros(200, dtype=torch.bool)
    expected[torch.argsort(s, stable=True)[:k]] = True
    assert torch.equal(lowest(s, k), expected)
