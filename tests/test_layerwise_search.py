"""``search`` of ``allocation: reconstruction`` (plugins/layer_search.py): the database's
weights, the counts it tries, and that the chosen counts are never worse on the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wfcore.plugins.exact_obs import prune as exact_prune
from wfcore.plugins.layer_hessian import obs_solve, obs_with_mask, prepare
from wfcore.plugins.layer_search import PathDatabase, counts_for, keep_with_count, rank_slopes
from wfcore.plugins.layerwise import ExactOBS, ExactOBSOptions

from tests.test_layerwise import problem


def test_obs_solve_equals_the_explicit_inverse_form_on_both_sides():
    torch.manual_seed(0)
    X = torch.randn(40, 12, dtype=torch.float64)
    W = torch.randn(5, 12, dtype=torch.float64)
    Wp, Hd, Hinv = prepare(W, 2 * X.T @ X / 40, 0.01)
    prune = torch.rand(5, 12) < torch.tensor([0.1, 0.5, 0.9, 1.0, 0.0]).unsqueeze(1)
    assert torch.allclose(obs_solve(Wp, Hd, Hinv, prune), obs_with_mask(Wp, Hinv, prune),
                          atol=1e-10)


@pytest.mark.parametrize("zeros", [7, 30, 55])
def test_path_database_weights_are_exact_obs_at_that_count(zeros):
    torch.manual_seed(1)
    X = torch.randn(80, 12, dtype=torch.float64)
    W = torch.randn(5, 12, dtype=torch.float64)
    H = 2 * X.T @ X / 80
    keep = torch.ones(5, 12, dtype=torch.bool)
    db = PathDatabase(W, H, keep, 0.01, 64, torch.float64, lambda *a: None)
    db.errors([10, 30, 55])
    ref = exact_prune(W, H, keep, zeros, 0.01)
    assert torch.allclose(db.weights(zeros), ref.weights, atol=1e-9)
    assert int((db.weights(zeros) == 0).sum()) == zeros


def test_counts_for_meets_the_total_respects_caps_and_follows_the_coefficients():
    slopes = {"a": rank_slopes([0, 50, 100], [0.0, 0.1, 0.5], 100, 0),
              "b": rank_slopes([0, 50, 100], [0.0, 0.2, 1.0], 100, 0)}
    now, caps = {"a": 0, "b": 0}, {"a": 90, "b": 100}
    base = counts_for(slopes, now, caps, 120, {"a": 0.0, "b": 0.0})
    assert sum(base.values()) == 120 and base["a"] <= 90
    assert base["a"] > base["b"]  # a's curve is cheaper
    shifted = counts_for(slopes, now, caps, 120, {"a": 3.0, "b": 0.0})
    assert sum(shifted.values()) == 120 and shifted["a"] < base["a"]


def test_keep_with_count_prunes_the_zeros_first_then_the_smallest():
    w = torch.tensor([[0.5, -0.1, 2.0], [0.3, 1.0, -0.2]])
    keep = torch.tensor([[True, True, False], [True, True, True]])
    out = keep_with_count(w, keep, 3)
    assert out.tolist() == [[True, False, False], [True, True, False]]


def test_search_meets_the_target_and_is_no_worse_on_the_calibration_loss():
    from wfcore.plugins.allocators import GlobalAllocator

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    x = torch.randn(60, 12, dtype=torch.float64)
    results = {}
    for budget in (0, 12):
        prob = problem(model, x)
        est = ExactOBS(ExactOBSOptions(samples=60, batch_size=60, dtype="float64",
                                       allocation="reconstruction", search=budget))
        curvature = est.fit(prob)
        scores = est.paired_scorer().scores(prob.weights(), curvature, None)
        keep = GlobalAllocator().allocate(scores, dict(prob.masks.keep), 0.7)
        if budget:
            base = {n: int((~k).sum()) for n, k in keep.items()}
            base_loss = est.stitched_loss(prob, keep, base)
            searched = est.searched_keep(prob, keep)
            counts = {n: int((~k).sum()) for n, k in searched.items()}
            assert sum(counts.values()) == sum(base.values())
            assert est.stitched_loss(prob, keep, counts) <= base_loss
        before = prob.weights()
        update, new_keep = est.prune_layers(prob, keep)
        assert all(torch.equal(p.detach(), before[n]) for n, p in prob.params.items())
        zeros = sum(int((~k).sum()) for k in new_keep.values())
        assert zeros == round(0.7 * (12 * 16 + 16 * 8 + 8 * 3))
        results[budget] = new_keep


@pytest.mark.parametrize("seed", [3, 6])  # the guide wins on 3, the curves on 6
def test_choose_keeps_the_allocation_of_lower_calibration_loss_at_the_exact_target(seed):
    from wfcore.plugins.allocators import GlobalAllocator

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(5.0)  # magnitude's global threshold spares this layer
    x = torch.randn(60, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(0))  # problem's
    prob = problem(model, x)
    est = ExactOBS(ExactOBSOptions(samples=60, batch_size=60, dtype="float64",
                                   allocation="choose", correct=True))
    curvature = est.fit(prob)  # no guide set: magnitude's
    scores = est.paired_scorer().scores(prob.weights(), curvature, None)
    keep = GlobalAllocator().allocate(scores, dict(prob.masks.keep), 0.8)
    target = round(0.8 * (12 * 16 + 16 * 8 + 8 * 3))
    candidates = {"reconstruction": keep, "guide": est.guide_keep(prob, keep)}
    assert {n: int((~k).sum()) for n, k in candidates["reconstruction"].items()} != \
        {n: int((~k).sum()) for n, k in candidates["guide"].items()}
    before = prob.weights()

    def loss(update, masks):  # every calibration sample, float64, by hand
        with torch.no_grad():
            h = x
            for i in (0, 2, 4):
                w = (before[f"{i}.weight"] + update[f"{i}.weight"]) * masks[f"{i}.weight"]
                h = h @ w.T + model[i].bias
                h = torch.relu(h) if i < 4 else h
            return float(nn.functional.cross_entropy(h, y))

    losses = {k: loss(*est.sequential(prob, m, None)) for k, m in candidates.items()}
    update, new_keep = est.prune_layers(prob, keep)
    record = est.step_record()
    assert record["allocation"] == min(losses, key=lambda k: losses[k])
    assert record["calibration_loss"] == pytest.approx(losses, rel=1e-9)
    assert loss(update, new_keep) == pytest.approx(min(losses.values()), rel=1e-9)
    assert sum(int((~k).sum()) for k in new_keep.values()) == target
    assert record["zeros"] == {n: int((~k).sum()) for n, k in new_keep.items()}
    assert all(torch.equal(p.detach(), before[n]) for n, p in prob.params.items())


def test_search_needs_the_reconstruction_allocation():
    with pytest.raises(ValueError, match="search needs allocation: reconstruction"):
        ExactOBSOptions(search=4).validate()


def test_paired_target_is_the_least_squares_fit_to_the_dense_output():
    from wfcore.plugins.layer_hessian import PairedSum

    torch.manual_seed(4)
    X = torch.randn(200, 6, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(200, 6, dtype=torch.float64)
    W = torch.randn(4, 6, dtype=torch.float64)
    acc = PairedSum(6, "cpu")
    for a, b in zip(X.split(64), Xh.split(64), strict=True):
        acc.add_pair(a, b)
    want = torch.linalg.lstsq(Xh, X @ W.T).solution.T  # argmin ||X W^T - Xh V^T||
    assert torch.allclose(acc.target(W, 0.0), want, atol=1e-9)
    # the objective ||W X - V Xh||^2 differs from ||W* Xh - V Xh||^2 by a constant
    V1, V2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    Ws = acc.target(W, 0.0)

    def gap(V):
        return float(((X @ W.T - Xh @ V.T) ** 2).sum() - ((Xh @ Ws.T - Xh @ V.T) ** 2).sum())
    assert gap(V1) == pytest.approx(gap(V2), rel=1e-9)


def test_correct_fits_later_layers_to_the_dense_output_and_leaves_the_first_alone():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x = torch.randn(80, 10, dtype=torch.float64)
    out = {}
    for correct in (False, True):
        prob = problem(model, x)
        est = ExactOBS(ExactOBSOptions(samples=80, batch_size=40, dtype="float64",
                                       correct=correct))
        keep = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.6
                for n, p in prob.params.items()}
        update, new_keep = est.prune_layers(prob, keep)
        out[correct] = {n: prob.params[n].detach() + update[n] for n in update}
    assert torch.allclose(out[True]["0.weight"], out[False]["0.weight"], atol=1e-12)
    assert not torch.allclose(out[True]["2.weight"], out[False]["2.weight"])
    with torch.no_grad():
        hidden = torch.relu(x @ out[True]["0.weight"].T + model[0].bias)
        dense = model(x)

        def err(w):
            return float(((hidden @ w.T + model[2].bias.detach() - dense) ** 2).sum())
    assert err(out[True]["2.weight"]) < err(out[False]["2.weight"])


@pytest.mark.parametrize("name", ["best_oneshot", "best_oneshot_mlpnet"])
def test_the_best_configs_load_and_agree(name):
    from pathlib import Path

    from wfcore import config

    root = Path(__file__).resolve().parents[1]
    cfg = config.load(str(root / "configs" / f"{name}.yaml"), [])
    assert cfg.estimator.name == "exact_obs"
    assert cfg.estimator.allocation == "choose" and cfg.estimator.correct
    assert cfg.allocator.name == "global"
    assert cfg.model.name == ("mlpnet" if name.endswith("mlpnet") else "mnist_cnn")
