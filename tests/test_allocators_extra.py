"""Floors, excluded layers and manual per-layer targets, against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from wfcore import config, manager
from wfcore.errors import ConfigError, WfcoreError

SHAPES = {"conv1.weight": (8, 1, 3, 3), "conv2.weight": (16, 8, 3, 3), "fc.weight": (10, 40)}


def layers(seed: int = 0, skew: bool = True):
    """Random scores; conv1 scores far below the rest, so a pure global threshold empties it."""
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    if skew:
        scores["conv1.weight"] *= 1e-3
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    return scores, masks


def allocator(name: str, **options):
    entry, _ = manager.build().registry("allocators").lookup(name, "allocator.name")
    return entry.factory(config.validate_options("allocator", options, entry.options_class))


def zeros(keep: dict[str, torch.Tensor]) -> int:
    return sum(int((~k).sum()) for k in keep.values())


def brute_force_capped(scores, caps, num_zeros):
    """Greedy by global order, skipping weights of full layers: the reference."""
    flat = [(float(s), n, i) for n, t in scores.items() for i, s in enumerate(t.reshape(-1))]
    order = sorted(range(len(flat)), key=lambda j: (flat[j][0], j))
    used = dict.fromkeys(scores, 0)
    keep = {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in scores.items()}
    for j in order:
        if num_zeros == 0:
            break
        _, n, i = flat[j]
        if used[n] < caps[n]:
            keep[n][i] = False
            used[n] += 1
            num_zeros -= 1
    return {n: k.reshape(scores[n].shape) for n, k in keep.items()}


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_floor_holds_and_target_is_exact(target):
    scores, masks = layers()
    floor = 0.04  # conv1 keeps 3 of 72: binds, its scores are the lowest
    new = allocator("global", floor=floor).allocate(scores, masks, target)
    total = sum(s.numel() for s in scores.values())
    assert zeros(new) == round(target * total)
    caps = {n: s.numel() - math.ceil(floor * s.numel()) for n, s in scores.items()}
    for n, k in new.items():
        assert int(k.sum()) >= math.ceil(floor * k.numel()), n
    expected = brute_force_capped(scores, caps, round(target * total))
    for n in scores:
        assert torch.equal(new[n], expected[n]), n


def test_without_floor_the_skewed_layer_is_emptied_and_with_it_is_not():
    scores, masks = layers()
    plain = allocator("global", floor=0.0).allocate(scores, masks, 0.9)
    assert int(plain["conv1.weight"].sum()) == 0
    floored = allocator("global", floor=0.05).allocate(scores, masks, 0.9)
    assert int(floored["conv1.weight"].sum()) == math.ceil(0.05 * 72)  # the floor binds
    assert zeros(floored) == zeros(plain)


def test_the_default_floor_keeps_a_layer_a_threshold_would_empty_and_warns(caplog):
    """By default (allocator.floor 0.005, rounded up to at least one weight) no layer is
    emptied; the floor that prevents it is a warning naming the layer."""
    scores, masks = layers()
    with caplog.at_level("WARNING"):
        new = allocator("global").allocate(scores, masks, 0.9)
    assert int(new["conv1.weight"].sum()) == math.ceil(0.005 * 72) == 1
    assert zeros(new) == round(0.9 * sum(s.numel() for s in scores.values()))
    assert "would empty 1 layer(s)" in caplog.text and "conv1.weight" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        allocator("global").allocate(*layers(skew=False), 0.9)
    assert "would empty" not in caplog.text  # no layer at risk: no warning


def test_per_layer_floors_by_glob_override_the_default():
    scores, masks = layers()
    new = allocator("global", floor=0.05, floors={"conv1.*": 0.5}).allocate(scores, masks, 0.9)
    assert int(new["conv1.weight"].sum()) == 36
    assert int(new["fc.weight"].sum()) >= 20
    assert zeros(new) == round(0.9 * sum(s.numel() for s in scores.values()))


@pytest.mark.parametrize("target", [0.1, 0.25])
def test_excluded_layers_stay_dense_and_the_rest_meets_the_target(target):
    scores, masks = layers(1)
    new = allocator("global", floor=0.0, exclude=["conv2.*"]).allocate(scores, masks, target)
    assert bool(new["conv2.weight"].all())
    assert zeros(new) == round(target * sum(s.numel() for s in scores.values()))
    rest = torch.cat([scores[n][~new[n]] for n in ("conv1.weight", "fc.weight")])
    kept = torch.cat([scores[n][new[n]] for n in ("conv1.weight", "fc.weight")])
    assert rest.max() <= kept.min()


def test_unreachable_target_says_why():
    scores, masks = layers()
    total = sum(s.numel() for s in scores.values())  # 1624; conv2 (1152) excluded
    with pytest.raises(WfcoreError, match="at most 472"):
        allocator("global", floor=0.0, exclude=["conv2.weight"]).allocate(scores, masks, 0.5)
    with pytest.raises(WfcoreError, match="floors"):
        allocator("global", floor=0.5).allocate(scores, masks, 0.6)
    assert total == 1624


def test_floors_never_unprune_and_count_existing_zeros():
    scores, masks = layers(2, skew=False)
    first = allocator("global").allocate(scores, masks, 0.5)
    new = allocator("global", floor=0.2).allocate(scores, first, 0.7)
    for n in scores:
        assert not (new[n] & ~first[n]).any()  # already pruned stay pruned
        # the floor only limits new zeros: a layer already below it keeps its zeros
        assert int(new[n].sum()) >= min(math.ceil(0.2 * new[n].numel()), int(first[n].sum()))
    assert zeros(new) == round(0.7 * sum(s.numel() for s in scores.values()))


def test_bad_options_name_the_key():
    scores, masks = layers()
    with pytest.raises(ConfigError, match="allocator: floor"):
        allocator("global", floor=1.5)
    with pytest.raises(WfcoreError, match="allocator.exclude.*nothing"):
        allocator("global", exclude=["nothing"]).allocate(scores, masks, 0.5)


def test_manual_sets_matched_layers_and_shares_the_rest():
    scores, masks = layers(3)
    new = allocator("manual", sparsities={"conv1.*": 0.5, "fc.*": 0.25}).allocate(
        scores, masks, 0.7)
    assert int((~new["conv1.weight"]).sum()) == 36
    assert int((~new["fc.weight"]).sum()) == 100
    total = sum(s.numel() for s in scores.values())
    assert zeros(new) == round(0.7 * total)
    for n in ("conv1.weight", "fc.weight"):
        assert scores[n][~new[n]].max() <= scores[n][new[n]].min()


def test_manual_with_every_layer_set_ignores_the_target_and_rejects_impossible_ones():
    scores, masks = layers(4)
    new = allocator("manual", sparsities={"*": 0.6}).allocate(scores, masks, 0.9)
    for k in new.values():
        assert int((~k).sum()) == round(0.6 * k.numel())
    with pytest.raises(WfcoreError, match="manual"):
        allocator("manual", sparsities={"conv2.*": 0.95}).allocate(scores, masks, 0.5)
