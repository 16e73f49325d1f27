"""The Runner drives a run through methods alone (``wfcore.run.runner.PrunedRun``): a stand-in
with no attributes, whose steps return their records and timings, is run, interrupted and
resumed in milliseconds, without a model or data."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from wfcore import config as config_mod
from wfcore.interfaces import PruneStep
from wfcore.run import checkpoint
from wfcore.run.report import Report
from wfcore.run.runner import Runner, StepResult


class StandIn:
    """A PrunedRun of one weight per step: methods only (``__slots__`` holds the state)."""

    __slots__ = ("calls", "state", "stop_after")

    def __init__(self, stop_after: int | None = None):
        self.calls: list[str] = []
        self.state = {"pruned": 0}
        self.stop_after = stop_after  # Ctrl-C in the evaluation after that many prunings

    def evaluate(self) -> dict[str, float]:
        if self.state["pruned"] == self.stop_after:
            raise KeyboardInterrupt
        return {"accuracy": 1.0 - 0.1 * self.state["pruned"], "loss": 0.5}

    def restore_dense(self) -> None:
        self.calls.append("restore_dense")

    def prune_to(self, target: float) -> StepResult:
        self.state["pruned"] += 1
        self.calls.append(f"prune {target}")
        return StepResult(record(target), {"gradients": 1.0, "estimate": 2.0, "prune": 0.25})

    def trainer(self, train_cfg: Any, **kwargs: Any) -> Any:
        raise AssertionError("no fine-tuning in this plan")

    def sparsity(self) -> float:
        return self.state["pruned"] / 4

    def layer_sparsity(self) -> dict[str, dict[str, float]]:
        return {"w": {"numel": 4, "sparsity": self.sparsity()}}

    def zero_optimizer_state(self, optimizer: Any) -> None:
        raise AssertionError("no optimizer in this plan")

    def step_start(self, step: PruneStep) -> None:
        self.calls.append(f"start {step.index}")

    def step_end(self, step: PruneStep, record: dict[str, Any]) -> None:
        self.calls.append(f"end {step.index}")

    def model_state(self) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor([float(self.state["pruned"])])}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model_state(), "masks": {}, "sampler": {}, "components": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state["pruned"] = int(state["model"]["w"])
        self.calls.append("load_state_dict")


def record(target: float) -> dict[str, Any]:
    """A step's record as the safeguard makes it (report.md's columns)."""
    return {"target_sparsity": target, "damp": 1e-4, "mask": "scores", "alpha": 1.0,
            "predicted_increase": 0.1, "actual_increase": 0.2}


PLAN = [PruneStep(0, 0.5, substeps=[0.25, 0.5]), PruneStep(1, 0.75)]


def runner(run: StandIn, tmp_path) -> Runner:
    cfg = config_mod.load(None, [f"output={tmp_path}"])
    return Runner(run, PLAN, Report(tmp_path, config_mod.to_dict(cfg)), cfg, tmp_path, {})


def test_the_runner_records_what_the_steps_return(tmp_path):
    run = StandIn()
    r = runner(run, tmp_path)
    r.run()
    assert run.calls == ["start 0", "prune 0.25", "prune 0.5", "end 0",
                         "start 1", "prune 0.75", "end 1"]
    steps = r.report.data["steps"]
    assert [s["safeguard"] for s in steps] == [[record(0.25), record(0.5)], [record(0.75)]]
    # the step's own timings, summed over its sub-steps; each step starts from zero
    assert steps[0]["timings"]["gradients"] == 2.0 and steps[1]["timings"]["estimate"] == 2.0
    assert [s["sparsity"] for s in steps] == [0.5, 0.75]


def test_a_step_interrupted_after_its_pruning_resumes_with_its_records(tmp_path):
    """Stopped between the pruning of step 0 and its record: the checkpoint holds the
    records the step returned, and the resumed run reports them without pruning again."""
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        runner(StandIn(stop_after=2), tmp_path).run()
    saved = checkpoint.load(tmp_path, config_mod.load(None, [f"output={tmp_path}"]))
    resumed = StandIn()
    r = runner(resumed, tmp_path)
    r.restore(saved)
    r.run()
    assert resumed.calls == ["load_state_dict", "start 0", "end 0",
                             "start 1", "prune 0.75", "end 1"]
    steps = r.report.data["steps"]
    assert [s["safeguard"] for s in steps] == [[record(0.25), record(0.5)], [record(0.75)]]
    assert steps[0]["timings"]["gradients"] == 2.0  # the timings were saved with them
