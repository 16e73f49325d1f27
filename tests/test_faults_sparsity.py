"""A target sparsity below 1 whose rounding prunes every weight, or empties a layer under a
per-layer allocator, is refused in one line before anything is trained or removed
(issue 25, case 5). MLPNet: 784-40-20-10, 32,360 prunable weights, fc3.weight 200.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import fails
from torch import nn

from wfcore.errors import ConfigError
from wfcore.interfaces import PruneStep
from wfcore.run import directory as rundir
from wfcore.run import targets

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "estimator.name=magnitude", "scorer.update=none",
        "scheduler.name=oneshot"]


def finished_run(out: Path) -> dict[str, bytes]:
    """A run directory holding a finished run (its report), as --force would replace."""
    out.mkdir()
    rundir.claim(out)
    (out / "report.json").write_text(json.dumps({"finished": True, "config": {}, "steps": []}))
    (out / "model_step0.pt").write_bytes(b"the earlier run's step")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_sparsity_that_rounds_to_every_weight_is_refused_before_force_removes(
        tmp_path, capsys):
    out = tmp_path / "run"
    before = finished_run(out)
    line = fails(capsys, "prune", CONFIG, *FAST, "scheduler.sparsities=[0.5,0.999999]",
                 f"output={out}", "--force")
    assert "config key 'scheduler'" in line and "0.999999 prunes all 32360" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != rundir.LOCK} == before


def test_plan_refuses_a_layer_emptied_by_a_per_layer_allocator(tmp_path, capsys):
    line = fails(capsys, "plan", CONFIG, *FAST, "allocator.name=uniform",
                 "scheduler.sparsities=[0.998]", f"output={tmp_path / 'run'}")
    assert "prunes all 200 weights of fc3.weight" in line


def layers(*sizes: int) -> dict[str, nn.Parameter]:
    return {f"l{i}": nn.Parameter(torch.zeros(n)) for i, n in enumerate(sizes)}


@pytest.mark.parametrize(("sparsity", "allocator", "refused"), [
    (0.999999, "global", True),   # round(0.999999 * 1100) = 1100
    (0.9995, "global", False),    # 1099 of 1100: one weight kept
    (0.996, "uniform", True),     # round(0.996 * 100) = 100: l1 emptied
    (0.996, "global", False),     # a global allocation may keep l1: the scores decide
    (0.994, "uniform", False),    # 99 of l1's 100
    (0.0, "uniform", False),
])
def test_rounding_is_checked_on_every_target_and_substep(sparsity, allocator, refused):
    params = layers(1000, 100)
    plan = [PruneStep(index=0, target_sparsity=0.5),
            PruneStep(index=1, target_sparsity=0.5, substeps=[sparsity, 0.5])]
    if refused:
        with pytest.raises(ConfigError, match="step 1's sparsity"):
            targets.check(plan, params, allocator)
    else:
        targets.check(plan, params, allocator)
