"""oneshot fits the dense model once for all its targets (wfcore/run/dense_fit.py), and the
plan counts the safeguard (wfcore/run/safeguard_plan.py)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from wfcore import config as config_mod
from wfcore.fisher.gradients import GradientSampler
from wfcore.run import pipeline
from wfcore.run.safeguard_plan import planned_forward_samples

FAST = ["model.name=mlpnet", "train.epochs=1", "data.batch_size=500", "fisher.num_grads=32",
        "estimator.name=woodfisher", "scorer.update=joint", "scheduler.name=oneshot",
        "scheduler.sparsities=[0.5,0.8,0.9]", "safeguard.calibration_samples=200",
        "device=cpu"]


def run(tmp_path, name, overrides):
    cfg = config_mod.load(None, [*FAST, *overrides, f"output={tmp_path / name}"])
    pipeline.run(cfg, force=True)
    return json.loads((tmp_path / name / "report.json").read_text())


def test_oneshot_samples_the_dense_gradients_once_with_the_same_result(tmp_path, monkeypatch,
                                                                        one_thread):
    calls: list[int] = []
    real = GradientSampler.sample_into
    monkeypatch.setattr(GradientSampler, "sample_into",
                        lambda self, store: calls.append(1) or real(self, store))
    reused = run(tmp_path, "reused", [])
    assert len(calls) == 1
    fresh = run(tmp_path, "fresh", ["fisher.reuse_dense=false"])
    assert len(calls) == 1 + 3
    for a, b in zip(reused["steps"], fresh["steps"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["layers"] == b["layers"]
        assert a["safeguard"][0]["alpha"] == b["safeguard"][0]["alpha"]
    assert reused["steps"][1]["timings"]["gradients"] == 0.0


def test_plan_counts_the_safeguard_and_nothing_for_a_baseline():
    cfg = OmegaConf.structured(config_mod.Config)
    cfg.safeguard.screen_samples = 0
    k = cfg.safeguard.calibration_samples
    # 5 alphas (0 among them) and the fallback mask, each on all k samples, plus one at
    # the current weights
    assert planned_forward_samples(cfg, baseline=False, has_stats=False) == k + 6 * k
    cfg.safeguard.screen_samples = 100
    assert planned_forward_samples(cfg, False, False) == k + 6 * 100 + 2 * (k - 100)
    stats = cfg.batchnorm.samples
    assert planned_forward_samples(cfg, False, True) == k + 6 * 100 + 2 * (k - 100) + 7 * stats
    assert planned_forward_samples(cfg, True, True) == stats  # the refresh after the step
    assert planned_forward_samples(cfg, True, False) == 0
    # a pool smaller than what they ask for: both draw all of it (no screening below it)
    assert planned_forward_samples(cfg, True, True, pool=64) == 64
    assert planned_forward_samples(cfg, False, True, pool=64) == 64 + 6 * 64 + 7 * 64
    cfg.batchnorm.recalibrate = False
    assert planned_forward_samples(cfg, True, True) == 0


@pytest.mark.parametrize("key", ["batchnorm.samples=0", "safeguard.screen_samples=-1"])
def test_bad_counts_name_the_key(key):
    with pytest.raises(Exception, match=key.split("=")[0]):
        config_mod.load(None, [key])
