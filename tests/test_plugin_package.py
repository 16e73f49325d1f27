"""The estimator package of docs/plugins.md installs with pip, meets the curvature
contract and prunes a run of the wfcore command."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from plugin_packages import wfcore_subprocess

from wfcore.testing import check_curvature

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"
PACKAGE = "wfcore-example-estimator"
# MLP 64 -> 16 -> 10 on scikit-learn's digits: two layers of 1,024 and 160 weights
TINY = ["model.name=mlp", "model.options.hidden=[16]", "data.name=digits",
        "data.batch_size=256", "train.epochs=2", "fisher.num_grads=32",
        "safeguard.calibration_samples=128"]


@pytest.fixture
def site(plugin_site) -> Path:
    return plugin_site(PACKAGE)


@pytest.fixture
def estimator_module(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    module = importlib.import_module("wfcore_example_estimator.estimator")
    assert str(site) in module.__file__  # the pip-installed copy, not the fixture source
    yield module
    for name in [n for n in sys.modules if n.startswith("wfcore_example_estimator")]:
        del sys.modules[name]


def test_installed_estimator_meets_the_curvature_contract(estimator_module):
    m = estimator_module
    check_curvature(m.DenseFisher(m.DenseFisherOptions()))  # brute force, float64


def test_installed_estimator_is_listed_and_prunes_a_run(site, tmp_path):
    listing = wfcore_subprocess(site, "plugins")
    assert listing.returncode == 0, listing.stderr
    assert f"{PACKAGE}:dense_fisher" in listing.stdout
    assert f"entry point ({PACKAGE}) 0.1.0" in listing.stdout
    assert "estimators: dense_fisher" in listing.stdout

    run = tmp_path / "run"
    result = wfcore_subprocess(site, "-q", "prune", str(CONFIG), *TINY,
                               "estimator.name=dense_fisher", "scorer.update=joint",
                               "scheduler.sparsities=[0.7]", f"output={run}")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["estimator"]["name"] == "dense_fisher"
    assert report["versions"]["plugins"][f"{PACKAGE}:dense_fisher"] == "0.1.0"
    [step] = report["steps"]
    prunable = sum(layer["numel"] for layer in step["layers"].values())
    zeros = sum(round(layer["sparsity"] * layer["numel"]) for layer in step["layers"].values())
    assert zeros == round(0.7 * prunable)
    assert step["sparsity"] == pytest.approx(zeros / prunable)


def test_installed_estimator_refuses_a_layer_too_large_in_one_line(site, tmp_path):
    result = wfcore_subprocess(site, "-q", "prune", str(CONFIG), *TINY,
                               "estimator.name=dense_fisher", "estimator.max_weights=500",
                               "scheduler.sparsities=[0.7]", f"output={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("wfcore: error: estimator.max_weights: 'layers.0.weight' "
                                     "has 1024 weights, more than 500; choose fewer parameters "
                                     "with model.params")
