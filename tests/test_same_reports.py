"""`wfcore prune` and `wfcore sweep`, now clients of the Python API, give the reports
they gave before it (tests/fixtures/reports_before.json: the same small config run with
the command before the API existed): the same masks, accuracies and losses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from wfcore import cli

ROOT = Path(__file__).parents[1]
BEFORE = json.loads((ROOT / "tests" / "fixtures" / "reports_before.json").read_text())
TINY = ["model.name=mlp", "model.options.hidden=[16]", "data.name=digits",
        "data.batch_size=256", "train.epochs=2", "fisher.num_grads=32",
        "safeguard.calibration_samples=128", "scheduler.sparsities=[0.5,0.9]"]


def masks(run: Path) -> dict[str, str]:
    out = {}
    for path in sorted(run.glob("model_step*.pt")):
        state = torch.load(path, weights_only=True)
        h = hashlib.sha256()
        for k in sorted(state):
            if k.endswith("weight"):
                h.update(k.encode())
                h.update((state[k] == 0).numpy().tobytes())
        out[path.name] = h.hexdigest()[:16]
    return out


@pytest.fixture
def argv(tmp_path):
    return ["-q", "prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"), *TINY,
            f"cache_dir={tmp_path / 'cache'}"]


@pytest.mark.parametrize("estimator", ["woodfisher", "magnitude"])
def test_prune_gives_the_report_it_gave_before(tmp_path, argv, estimator, one_thread):
    run = tmp_path / estimator
    assert cli.main([*argv, f"estimator.name={estimator}", f"output={run}"]) == 0
    report = json.loads((run / "report.json").read_text())
    before = BEFORE[f"prune {estimator}"]
    assert report["dense"]["accuracy"] == pytest.approx(before["dense"], abs=1e-12)
    values = [v for s in report["steps"] for v in (s["sparsity"], s["accuracy"], s["loss"])]
    assert values == pytest.approx([v for step in before["steps"] for v in step], abs=1e-6)
    assert masks(run) == before["masks"]


def test_sweep_gives_the_table_it_gave_before(tmp_path, argv, one_thread):
    out = tmp_path / "sweep"
    assert cli.main(["-q", "sweep", *argv[2:], "estimator.name=woodfisher,magnitude",
                     f"output={out}"]) == 0
    rows = [line.split(",")[:5] for line in (out / "results.csv").read_text().splitlines()]
    assert rows == BEFORE["sweep"]
