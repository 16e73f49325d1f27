"""The run directory's rules, against ``wfcore.run.directory.RunDirectory`` alone (no CLI, no
model trained): its files' names (old runs' included), what --force clears, which
directories it refuses, its lock, and in progress / interrupted / finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wfcore.errors import WfcoreError
from wfcore.run import checkpoint
from wfcore.run import saved as runs
from wfcore.run.directory import LOCK, MARKER, RunDirectory, RunLock


def a_run(path: Path, steps: tuple[int, ...] = (0, 1), finished: bool = True) -> RunDirectory:
    """A run directory as a run leaves it (the files' contents stand in)."""
    run = RunDirectory(path)
    path.mkdir(parents=True)
    run.claim()
    run.config.write_text("name: x\n")
    run.report_path.write_text(json.dumps({
        "finished": finished, "config": {"name": "x"},
        "steps": [{"index": i, "target_sparsity": 0.5 + 0.4 * i} for i in steps]}))
    for i in steps:
        torch.save({"w": torch.zeros(1)}, run.step_state(i))
    torch.save({"w": torch.zeros(1)}, run.dense)
    return run


def test_the_names_are_the_ones_old_runs_have(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.step_state(12).name == "model_step12.pt"
    assert run.step_onnx(3).name == "model_step3.onnx"
    assert (run.config.name, run.report_path.name, run.dense.name, run.checkpoint.name) == (
        "config.yaml", "report.json", "dense.pt", "checkpoint.pt")
    assert checkpoint.path(tmp_path) == run.checkpoint
    assert runs.step_state(tmp_path, 4) == run.step_state(4)  # the old function names


def test_where_a_config_runs():
    cfg = OmegaConf.create({"name": "mag", "output": None})
    assert RunDirectory.of(cfg).path == Path("runs/mag")
    assert RunDirectory.of(cfg, prefix="sweep-").path == Path("runs/sweep-mag")
    cfg.output = "~/elsewhere"
    assert RunDirectory.of(cfg).path == Path("~/elsewhere").expanduser()


def test_steps_and_report(tmp_path):
    run = a_run(tmp_path / "run", steps=(0, 2, 10))
    (run.path / "model_step_x.pt").write_text("not a step")
    assert run.steps() == [0, 2, 10] and runs.steps_in(run.path) == [0, 2, 10]
    assert run.report_steps() == {0, 2, 10} and run.is_finished()
    run.report_path.write_text("[1, 2]")  # JSON, but not a report
    assert run.report() is None and run.report_steps() is None and not run.is_finished()


def test_a_step_the_report_does_not_list_is_not_exported(tmp_path):
    run = a_run(tmp_path / "run")
    torch.save({"w": torch.zeros(1)}, run.step_state(7))  # planted by hand
    for step in (None, 7):  # the last saved, or named: refused
        with pytest.raises(WfcoreError, match="model_step7.pt is not a step of the run's"):
            runs.choose_step(run.path, step=step)
    assert runs.choose_step(run.path, step=1) == 1
    assert runs.choose_step(run.path, sparsity=0.5) == 0


def test_force_clears_exactly_what_a_run_writes(tmp_path):
    run = a_run(tmp_path / "run")
    (run.path / "notes.txt").write_text("mine\n")
    (run.path / "model_step0.onnx").write_bytes(b"onnx")
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == [MARKER, "notes.txt"]


def test_a_directory_with_files_no_run_wrote_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("a user's config\n")
    with pytest.raises(WfcoreError, match="holds config.yaml, which no wfcore run wrote"):
        RunDirectory(tmp_path).check_usable()
    with pytest.raises(WfcoreError, match="is a file, not a directory"):
        RunDirectory(tmp_path / "config.yaml").check_usable()


def test_a_run_from_before_the_marker_is_still_a_run(tmp_path):
    run = a_run(tmp_path / "run")
    (run.path / MARKER).unlink()
    assert run.is_owned()
    run.check_usable()


def test_the_states(tmp_path):
    run = a_run(tmp_path / "run", finished=False)
    assert run.state() == "empty"  # nothing to continue: no checkpoint
    checkpoint.save(run.path, digest="0", position={}, model={"w": torch.zeros(1)}, masks={},
                    trainer=None, sampler={}, report={})
    assert run.state() == "interrupted"
    with run.lock():  # this process's own lock: still its run, not another's
        assert run.holder() is None
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from wfcore.run.directory import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.state() == "in progress" and run.holder() == holder.pid
        with pytest.raises(WfcoreError, match=rf"another wfcore run \(pid {holder.pid}\)"):
            run.lock().__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert run.state() == "interrupted"  # the holder died: a stale lock is no lock
    run.report_path.write_text(json.dumps({"finished": True, "config": {}, "steps": []}))
    assert run.state() == "finished"


def test_a_lock_that_fails_before_writing_leaves_no_directory(tmp_path):
    run = RunDirectory(tmp_path / "new")
    with pytest.raises(RuntimeError), RunLock(run.path):
        assert (run.path / LOCK).is_file()
        raise RuntimeError("the run failed at once")
    assert not run.path.exists()
