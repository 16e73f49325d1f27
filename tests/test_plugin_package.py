"""docs/plugins.md against the code: its packages are the fixture packages verbatim, its
other plugins register and meet their contracts, and the estimator written from it
installs with pip, meets the curvature contract and prunes a run of the wfcore command."""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from plugin_packages import FIXTURES, wfcore_subprocess
from wfcore.plugins.diag_fisher import DiagFisher

from wfcore import manager
from wfcore.interfaces import Exporter, Scheduler
from wfcore.testing import check_curvature, check_dataset, check_scorer

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "plugins.md").read_text()
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"
PACKAGE = "wfcore-example-estimator"
# MLP 64 -> 16 -> 10 on scikit-learn's digits: two layers of 1,024 and 160 weights
TINY = ["model.name=mlp", "model.options.hidden=[16]", "data.name=digits",
        "data.batch_size=256", "train.epochs=2", "fisher.num_grads=32",
        "safeguard.calibration_samples=128"]


@pytest.mark.parametrize("path, fence", [
    ("wfcore-dense-first/pyproject.toml", "toml"),
    ("wfcore-dense-first/wfcore_dense_first/allocator.py", "python"),
    ("wfcore-example-estimator/pyproject.toml", "toml"),
    ("wfcore-example-estimator/wfcore_example_estimator/estimator.py", "python"),
])
def test_the_doc_shows_each_fixture_file_verbatim(path, fence):
    text = (FIXTURES / path).read_text()
    assert f"```{fence}\n{text}```" in DOC, f"docs/plugins.md does not show {path} as it is"


def test_the_other_plugins_of_the_doc_register_and_meet_their_contracts(monkeypatch, tmp_path):
    snippets = [code for code in re.findall(r"```python\n(.*?)```", DOC, re.S)
                if "@wfcore.hookimpl" in code and "Options = DenseFisherOptions" not in code
                and "Options = DenseFirstOptions" not in code]
    modules = []
    for i, code in enumerate(snippets):
        module = types.ModuleType(f"plugins_md_{i}")
        monkeypatch.setitem(sys.modules, module.__name__, module)  # for its dataclasses
        exec(compile(code, f"docs/plugins.md snippet {i}", "exec"), module.__dict__)
        modules.append((module.__name__, module))
    plugins = manager.build(extra_plugins=modules)

    def build(kind, name, *args):
        entry = plugins.registry(kind).entries[name]
        return entry.factory(entry.options_class() if entry.options_class else {}, *args)

    check_scorer(build("scorers", "obd"), DiagFisher())
    scheduler = build("schedulers", "stairs")
    assert isinstance(scheduler, Scheduler)
    assert [s.target_sparsity for s in scheduler.plan()] == [0.5, 0.8]
    bundle = build("datasets", "blobs", OmegaConf.create({}))
    check_dataset(bundle)
    model = build("models", "wide", bundle.num_classes, bundle.input_shape)
    assert model(bundle.train[0][0].unsqueeze(0)).shape == (1, bundle.num_classes)
    exporter = build("exporters", "sparse_state")
    assert isinstance(exporter, Exporter) and exporter.step is None
    result = exporter.export(model.eval(), bundle.test[0][0].unsqueeze(0), str(tmp_path / "m"))
    assert result["same_weights"] and (tmp_path / "m").is_file()
    assert "wfcore_step_end" in plugins.info[modules[-1][0]].hooks


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
