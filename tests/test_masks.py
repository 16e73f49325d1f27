"""Masks keep pruned weights exactly zero through optimizer steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wfcore.masks import Masks, select_params


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.BatchNorm1d(5))


def test_default_selection_is_linear_and_conv_weights():
    params = select_params(small_model(), None)
    assert list(params) == ["0.weight", "3.weight"]


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-2),
], ids=["sgd", "nesterov", "adam", "adamw"])
def test_pruned_weights_stay_zero_after_optimizer_steps(make_opt):
    model = small_model()
    params = select_params(model, None)
    masks = Masks(params)
    opt = make_opt(model.parameters())
    # Build up optimizer state (momentum) before pruning, as in fine-tuning after a step.
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    masks.set({n: torch.rand(p.shape, generator=g) > 0.7 for n, p in params.items()})
    masks.zero_optimizer_state(opt)
    masks.attach(opt)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in params.items():
            assert torch.count_nonzero(p[~masks.keep[n]]) == 0, n
            assert p[masks.keep[n]].ne(0).all(), n  # kept weights still train
    masks.detach()
    for n, p in params.items():
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert torch.count_nonzero(value[~masks.keep[n]]) == 0


def test_sparsity_and_state_round_trip():
    params = select_params(small_model(), None)
    masks = Masks(params)
    keep = {n: torch.arange(p.numel()).reshape(p.shape) % 4 != 0 for n, p in params.items()}
    masks.set(keep)
    zeros = sum(int((~k).sum()) for k in keep.values())
    assert masks.sparsity() == zeros / masks.numel()
    other = Masks(params)
    other.load_state_dict(masks.state_dict())
    assert all(torch.equal(other.keep[n], keep[n]) for n in keep)


def test_block_scores_are_the_mean_over_each_blocks_kept_weights():
    from wfcore.masks import block_scores

    torch.manual_seed(1)
    scores = {"conv": torch.rand(3, 6, 2, 2), "fc": torch.rand(4, 9), "bias": torch.rand(4)}
    keep = {n: torch.rand(s.shape) > 0.3 for n, s in scores.items()}
    got = block_scores(scores, keep, 4)
    assert torch.equal(got["bias"], scores["bias"])
    for name in ("conv", "fc"):
        s, k = scores[name].double(), keep[name]
        for index in torch.cartesian_prod(*[torch.arange(n) for n in s.shape]).tolist():
            channel = index[1]
            first = channel - channel % 4
            members = [tuple(index[:1] + [c] + index[2:])
                       for c in range(first, min(first + 4, s.shape[1]))]
            kept = [s[m] for m in members if k[m]]
            expected = sum(kept) / len(kept) if kept else 0.0
            assert float(got[name][tuple(index)]) == pytest.approx(float(expected), rel=1e-6)


def test_block_of_one_changes_nothing():
    from wfcore.masks import block_scores

    scores = {"fc": torch.rand(4, 8)}
    assert block_scores(scores, {"fc": torch.ones(4, 8, dtype=torch.bool)}, 1) is scores
