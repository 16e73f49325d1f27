"""The per-layer algebra of exact_obs, sparsegpt and wanda against float64 brute force."""

from __future__ import annotations

import pytest
import reference
import torch
from torch.testing import assert_close
from wfcore.plugins import exact_obs, sparsegpt, wanda
from wfcore.plugins.layer_hessian import HessianSum, obs_with_mask, prepare


def layer(rows: int = 64, cols: int = 32, n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, cols)
    acc = HessianSum(cols, "cpu")
    acc.add(X[:n // 2])
    acc.add(X[n // 2:])
    return W, X, acc.H


def test_hessian_is_2xxt_over_n():
    _, X, H = layer()
    assert_close(H, 2 * X.T @ X / X.shape[0])


@pytest.mark.parametrize("zeros", [1300, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2048, marks=pytest.mark.slow)])
def test_exact_obs_equals_greedy_obs_with_explicit_inverses(zeros):
    W, _, H = layer()
    keep = torch.ones_like(W, dtype=torch.bool)
    got = exact_obs.prune(W, H, keep, zeros, damp=0.01, chunk=16)
    want_w, want_keep = reference.exact_obs_layer(W, reference.damped(H, 0.01), zeros)
    assert torch.equal(got.keep, want_keep)
    assert int((~got.keep).sum()) == zeros
    assert_close(got.weights, want_w, rtol=0, atol=1e-9)
    assert (got.weights[~got.keep] == 0).all()


def test_exact_obs_keeps_pruned_weights_pruned_and_predicts_its_error():
    W, _, H = layer(rows=8, cols=12)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    W = W * keep
    got = exact_obs.prune(W, H, keep, 60, damp=0.01)
    assert not (got.keep & ~keep).any() and int((~got.keep).sum()) == 60
    # the error of the chosen weights equals the path's (on the damped H)
    _, Hd, Hinv = prepare(W, H, 0.01)
    again = obs_with_mask(W, Hinv, ~got.keep)
    assert_close(again, got.weights, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block", [4, 8, 32])
def test_sparsegpt_equals_its_formulas_with_explicit_inverses(block):
    W, _, H = layer(rows=16, cols=32)
    keep = torch.ones_like(W, dtype=torch.bool)
    got = sparsegpt.prune(W, H, keep, zeros=16 * 32 // 2, damp=0.01, block_size=block)
    want_w, want_keep = reference.sparsegpt_layer(W, reference.damped(H, 0.01), 0.5, block)
    assert torch.equal(got.keep, want_keep)
    assert_close(got.weights, want_w, rtol=0, atol=1e-9)


def test_sparsegpt_nm_equals_its_formulas():
    W, _, H = layer(rows=16, cols=32)
    keep = torch.ones_like(W, dtype=torch.bool)
    got = sparsegpt.prune(W, H, keep, zeros=0, damp=0.01, block_size=8, pattern=(2, 4))
    want_w, want_keep = reference.sparsegpt_layer(W, reference.damped(H, 0.01), 0.5, 8,
                                                  nm=(2, 4))
    assert torch.equal(got.keep, want_keep)
    assert_close(got.weights, want_w, rtol=0, atol=1e-9)
    assert (got.keep.reshape(16, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_count_is_exact_at_any_sparsity():
    W, _, H = layer(rows=7, cols=30)
    for zeros in (1, 50, 123, 209):
        got = sparsegpt.prune(W, H, torch.ones_like(W, dtype=torch.bool), zeros, 0.01, 8)
        assert int((~got.keep).sum()) == zeros and (got.weights[~got.keep] == 0).all()


def test_wanda_equals_its_reference():
    W, X, H = layer()
    got = wanda.prune(W, H, torch.ones_like(W, dtype=torch.bool), zeros=64 * 16)
    assert_close(got.weights, reference.wanda_layer(W, X, 0.5), rtol=0, atol=0)


def test_wanda_spreads_an_uneven_count_over_rows():
    W, _, H = layer(rows=5, cols=10)
    got = wanda.prune(W, H, torch.ones_like(W, dtype=torch.bool), zeros=23)
    per_row = (~got.keep).sum(1)
    assert int(per_row.sum()) == 23 and int(per_row.max() - per_row.min()) <= 1


@pytest.mark.parametrize("method", ["exact_obs", "sparsegpt", "wanda"])
def test_nm_pattern_gives_n_of_every_m(method):
    W, _, H = layer(rows=6, cols=16)
    keep = torch.ones_like(W, dtype=torch.bool)
    if method == "exact_obs":
        got = exact_obs.prune(W, H, keep, 0, 0.01, pattern=(2, 4))
    elif method == "sparsegpt":
        got = sparsegpt.prune(W, H, keep, 0, 0.01, block_size=None, pattern=(2, 4))
    else:
        got = wanda.prune(W, H, keep, 0, pattern=(2, 4))
    assert (got.keep.reshape(6, 4, 4).sum(-1) == 2).all()
    assert (got.weights[~got.keep] == 0).all()


def test_exact_obs_nm_beats_wanda_nm_on_reconstruction():
    W, _, H = layer(rows=6, cols=16)
    keep = torch.ones_like(W, dtype=torch.bool)
    assert exact_obs.prune(W, H, keep, 0, 0.0, pattern=(2, 4)).error < \
        wanda.prune(W, H, keep, 0, pattern=(2, 4)).error
