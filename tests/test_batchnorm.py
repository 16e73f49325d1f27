"""Running statistics re-estimated after the weights change (wfcore/run/batchnorm.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from wfcore.plugins.magnitude import IdentityCurvature

from wfcore.run.batchnorm import RunningStats, pool_inputs, stat_modules
from wfcore.run.safeguard import Safeguard, calibration_batch


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(12, 3))


def test_refresh_gives_the_exact_statistics_of_the_samples():
    """After a weight change, the running mean / variance equal the batch statistics of
    the new pre-activations over the given samples, in float64 by hand; dropout is off
    while they are taken and the modes are left as they came."""
    model = bn_model()
    x = torch.randn(100, 5)
    model.train()
    for _ in range(5):  # statistics of the old weights
        model(torch.randn(32, 5) * 3 + 1)
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.5)  # prune
    stats = RunningStats(model, x, chunk=32)
    stale = model[1].running_mean.clone()
    stats.refresh()
    h = (x.double() @ model[0].weight.double().T + model[0].bias.double())  # (100, 12)
    torch.testing.assert_close(model[1].running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), h.var(0, unbiased=True),
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stale, model[1].running_mean)
    assert model.training and model[0].training  # as they came
    assert stats.record() == {"enabled": True, "modules": 1, "samples": 100, "calls": 1,
                              "seconds": stats.record()["seconds"]}


def test_stale_statistics_fail_and_fresh_ones_pass():
    """The eval-mode output of a pruned model with refreshed statistics equals a model
    calibrated on all the samples in one batch (float64); with the old ones it does not."""
    model = bn_model().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    RunningStats(model, x).refresh()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(model[0].weight.shape, generator=g) > 0.7)
    model.eval()
    stale = model(x)
    fresh_model = bn_model().double()
    fresh_model.load_state_dict(model.state_dict())
    with torch.no_grad():  # the reference: BatchNorm in train mode on all samples at once
        fresh_model.train()
        fresh_model[1].momentum = 1.0  # running stats := this batch's (unbiased var)
        fresh_model[0:2](x)
    fresh_model.eval()
    RunningStats(model, x).refresh()
    torch.testing.assert_close(model(x), fresh_model(x), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(stale, fresh_model(x), atol=1e-3)


def test_disabled_or_without_running_statistics_nothing_runs():
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    assert stat_modules(model) == []
    stats = RunningStats(model, torch.randn(10, 5))
    stats.refresh()
    assert not stats.active and stats.calls == 0
    off = RunningStats(bn_model(), torch.randn(10, 5), enabled=False)
    off.refresh()
    assert off.calls == 0 and off.record()["samples"] == 0


def test_pool_inputs_come_from_the_given_split_only():
    data = TensorDataset(torch.arange(50.0).view(50, 1), torch.zeros(50, dtype=torch.long))
    x = pool_inputs(data, 20, seed=3)
    assert x.shape == (20, 1) and set(x.flatten().tolist()) <= set(range(50))
    assert pool_inputs(data, 0, seed=3) is None


@pytest.mark.parametrize("refresh", [False, True])
def test_safeguard_judges_each_candidate_with_fresh_statistics(refresh):
    """A candidate that rescales the weights before a BatchNorm changes nothing once the
    statistics are fresh (BatchNorm undoes the scale): its loss increase is ~0. Judged
    with the stale statistics it looks harmful. The statistics are put back afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8, eps=1e-12), nn.ReLU(),
                          nn.Linear(8, 3))
    x = torch.randn(256, 4)
    RunningStats(model, x).refresh()
    y = model.eval()(x).argmax(1)
    params = {"0.weight": model[0].weight, "3.weight": model[3].weight}
    weights = {n: p.detach().clone() for n, p in params.items()}
    keep = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    update = {"0.weight": -0.8 * weights["0.weight"],  # alpha 1: the weights times 0.2
              "3.weight": torch.zeros_like(weights["3.weight"])}
    before = model[1].running_var.clone()
    guard = Safeguard(model, params, calibration_batch(TensorDataset(x, y), 256, seed=0),
                      alphas=[1.0], fallback=False, stats=RunningStats(model, x, enabled=refresh))
    _, _, record = guard.choose(weights, update, keep, IdentityCurvature(weights), None)
    rescaled = next(t for t in record["tried"] if t["alpha"] == 1.0)
    if refresh:
        assert abs(rescaled["increase"]) < 1e-6
    else:
        assert rescaled["increase"] > 0.01 and record["alpha"] == 0.0
    assert torch.equal(model[1].running_var, before)


@pytest.mark.slow
def test_bn_cnn_keeps_70_percent_at_80_percent_one_shot(tmp_path):
    """The residual CNN with BatchNorm (configs/bn_cnn.yaml, trained here: 5 epochs) pruned
    one-shot to 80% with WoodFisher keeps >= 70% top-1 with its statistics re-estimated,
    the safeguard keeps the OBS update (alpha > 0), and magnitude is not better. With the
    stale statistics the same WoodFisher step is worse. Minutes on two cores."""
    from wfcore import config as config_mod
    from wfcore.run import pipeline

    def run(name, *extra):
        cfg = config_mod.load("configs/bn_cnn.yaml", ["scheduler.sparsities=[0.8]", "export=null",
                                                      f"output={tmp_path / name}", *extra])
        return pipeline.run(cfg, force=True)["steps"][0]

    woodfisher = run("woodfisher")
    assert woodfisher["accuracy"] >= 0.70
    assert woodfisher["safeguard"][0]["alpha"] > 0
    assert woodfisher["safeguard"][0]["batchnorm"]["calls"] >= 2
    assert run("magnitude", "estimator.name=magnitude")["accuracy"] <= woodfisher["accuracy"]
    stale = run("stale", "batchnorm.recalibrate=false")
    assert stale["accuracy"] < woodfisher["accuracy"]  # measured: 86.1% against 91.2%


def test_from_pool_draws_samples_only_for_models_with_statistics():
    data = TensorDataset(torch.randn(40, 5), torch.zeros(40, dtype=torch.long))
    with_bn = RunningStats.from_pool(bn_model(), data, 30, seed=0, device="cpu")
    assert with_bn.active and with_bn.x.shape == (30, 5)
    plain = RunningStats.from_pool(nn.Linear(5, 3), data, 30, seed=0, device="cpu")
    assert not plain.active and plain.x is None
    off = RunningStats.from_pool(bn_model(), data, 30, seed=0, device="cpu", enabled=False)
    assert not off.active and off.x is None
