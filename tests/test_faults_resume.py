"""Settings that only place files may change on resume, and the export's limits are checked
before anything is pruned (issue 25, case 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import fails

from wfcore import cli, config
from wfcore.errors import WfcoreError
from wfcore.run import checkpoint, pipeline
from wfcore.run import directory as rundir

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "data.batch_size=500", "fisher.num_grads=16",
        "estimator.name=magnitude", "scorer.update=none", "scheduler.name=oneshot"]


def saved_checkpoint(run_dir: Path, digest: str) -> None:
    """The smallest checkpoint ``load`` reads: its digest is what is under test."""
    run_dir.mkdir(exist_ok=True)
    checkpoint.save(run_dir, digest=digest, position={}, model={"w": torch.zeros(2)},
                    masks={}, trainer=None, sampler={}, report={})


def test_store_dir_may_change_on_resume_and_a_result_key_may_not(tmp_path):
    cfg = config.load(CONFIG, [f"fisher.store_dir={tmp_path / 'a_file'}"])
    saved_checkpoint(tmp_path / "run", checkpoint.config_digest(cfg))
    moved = config.load(CONFIG, [f"fisher.store_dir={tmp_path / 'elsewhere'}"])
    checkpoint.load(tmp_path / "run", moved)  # accepted: the store only moved
    with pytest.raises(WfcoreError, match="different config"):
        checkpoint.load(tmp_path / "run", config.load(CONFIG, ["fisher.num_grads=17"]))


def test_a_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    """Before fisher.store_dir was a placement key its value was digested too."""
    cfg = config.load(CONFIG, [])
    saved_checkpoint(tmp_path / "run", checkpoint.config_digest(cfg, placement=()))
    checkpoint.load(tmp_path / "run", cfg)


def test_resume_with_a_corrected_store_dir(tmp_path, capsys, monkeypatch):
    """The run stops at its second step (a store directory that fails, here simulated by
    an interrupt); it resumes with another fisher.store_dir."""
    out = tmp_path / "run"
    real, calls = pipeline.Pruning.prune_to, []

    def interrupt_second(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(pipeline.Pruning, "prune_to", interrupt_second)
    assert cli.main(["-q", "prune", CONFIG, *FAST, "scheduler.sparsities=[0.5,0.9]",
                     f"output={out}", f"fisher.store_dir={tmp_path / 'a'}"]) == 130
    monkeypatch.undo()
    assert cli.main(["-q", "prune", "--resume", str(out),
                     f"fisher.store_dir={tmp_path / 'b'}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["finished"] and len(report["steps"]) == 2
    assert report["config"]["fisher"]["store_dir"] == str(tmp_path / "b")


def test_calibration_samples_above_the_training_set_is_refused_before_pruning(
        tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    rundir.claim(out)
    (out / "report.json").write_text(json.dumps({"finished": True, "config": {}, "steps": []}))
    (out / "model_step0.pt").write_bytes(b"the earlier run's step")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = fails(capsys, "prune", CONFIG, *FAST, "export.name=onnx", "export.quantize=int8",
                 "export.calibration_samples=100000000", f"output={out}", "--force")
    assert "config key 'export.calibration_samples': 100000000 is more than the" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != rundir.LOCK} == before
