"""A data set with a loss of its own (regression, MSE) pruned end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wfcore import config, hookimpl, manager
from wfcore.errors import ConfigError
from wfcore.interfaces import DataBundle
from wfcore.run import pipeline

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"


def linear_targets(options, data) -> DataBundle:
    """y = x W + noise, x of 8 features, y of 2: a regression the MLP fits well."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 2, generator=g)

    def split(n: int) -> TensorDataset:
        x = torch.randn(n, 8, generator=g)
        return TensorDataset(x, x @ W + 0.05 * torch.randn(n, 2, generator=g))

    return DataBundle(train=split(512), test=split(256), num_classes=2, input_shape=(8,),
                      loss=nn.MSELoss())


@hookimpl
def wfcore_datasets():
    return {"linear_targets": linear_targets}


PLUGINS = manager.build(extra_plugins=[("linear_targets", sys.modules[__name__])])
FAST = ["model.name=mlp", "model.options.hidden=[32]", "data.name=linear_targets",
        "data.batch_size=32", "train.epochs=15", "train.lr=0.03", "fisher.num_grads=128",
        "safeguard.calibration_samples=256", "scheduler.sparsities=[0.3,0.6]", "export=null"]


def prune(out: Path, *extra: str) -> dict:
    cfg = config.load(CONFIG, [*FAST, f"output={out}", *extra])
    return pipeline.run(cfg, plugins=PLUGINS)


@pytest.mark.usefixtures("one_thread")
def test_a_regression_is_pruned_with_its_own_loss(tmp_path):
    reports = {"woodfisher": prune(tmp_path / "woodfisher", "estimator.block_size=layer"),
               "magnitude": prune(tmp_path / "magnitude", "estimator.name=magnitude")}
    for name, report in reports.items():
        run = tmp_path / name
        assert report["finished"] and report["dense"]["accuracy"] is None
        assert report["dense"]["loss"] < 0.05  # trained: the noise alone is 0.0025
        written = json.loads((run / "report.json").read_text())
        assert [s["accuracy"] for s in written["steps"]] == [None, None]
        assert "| dense | - | 0.00% | - |" in (run / "report.md").read_text()
        state = torch.load(run / "model_step1.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values())
        for step in report["steps"]:
            assert abs(step["sparsity"] - step["target_sparsity"]) < 0.01
            assert math.isfinite(step["loss"])
    woodfisher, magnitude = reports["woodfisher"]["steps"], reports["magnitude"]["steps"]
    for wf, mag in zip(woodfisher, magnitude, strict=True):
        predicted = wf["safeguard"][0]["predicted_increase"]
        actual = wf["safeguard"][0]["actual_increase"]
        # At a well-fitted regression the empirical Fisher is the Gauss-Newton matrix scaled
        # by the squared residuals: it predicts an increase, but less than the actual one.
        assert 0 < predicted <= actual, wf["safeguard"]
        # second order: a smaller increase than magnitude pruning's mask (the fallback
        # candidate; magnitude's own run has nothing to choose and runs no calibration)
        fallback = next(t for t in wf["safeguard"][0]["tried"] if t["mask"] == "magnitude")
        assert actual < fallback["increase"]
        assert mag["safeguard"][0]["skipped"]
        assert wf["loss"] < mag["loss"]


def test_sampled_labels_need_a_classification_loss(tmp_path):
    with pytest.raises(ConfigError, match="fisher.labels"):
        prune(tmp_path / "run", "fisher.labels=sampled")
