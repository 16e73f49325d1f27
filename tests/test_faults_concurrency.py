"""Runs, exports and sweeps at the same time, and a rank lost (issue 25, case 7): a run in
progress (its lock held by a live process) is told apart from an interrupted one (a
checkpoint, no lock held); temporary files are named per process; a torchrun rank that
dies mid-run is one line naming it and the resume command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from cli_checks import fails

from wfcore import files
from wfcore.run import checkpoint
from wfcore.run import directory as rundir

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "fisher.num_grads=16", "estimator.name=magnitude",
        "scorer.update=none", "scheduler.name=oneshot"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def interrupted_run(out: Path) -> None:
    """A claimed run directory with a checkpoint: an interrupted run, as far as the start
    of another run can tell."""
    out.mkdir()
    rundir.claim(out)
    checkpoint.save(out, digest="0", position={}, model={"w": torch.zeros(2)}, masks={},
                    trainer=None, sampler={}, report={})
    (out / "report.json").write_text(json.dumps({"finished": False, "config": {}, "steps": []}))


@contextmanager
def locked(directory: Path, check: bool = True) -> Iterator[int]:
    """Another process holds ``directory``'s lock (a run in progress); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from wfcore.run.directory import RunLock\n"
         "with RunLock(Path(sys.argv[1]), check=sys.argv[2] == '1'):\n"
         "    print('locked', flush=True); time.sleep(60)", str(directory), str(int(check))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_run_in_progress_is_not_called_interrupted(tmp_path, capsys):
    out = tmp_path / "run"
    interrupted_run(out)
    before = snapshot(out)
    with locked(out) as pid:
        assert rundir.holder(out) == pid
        line = fails(capsys, "prune", CONFIG, *FAST, f"output={out}")
        assert f"is in use by another wfcore run (pid {pid}), in progress" in line
        assert "interrupted" not in line
        assert "in progress" in fails(capsys, "prune", "--resume", str(out))
    assert rundir.holder(out) is None  # the holder is gone: the lock is stale
    line = fails(capsys, "prune", CONFIG, *FAST, f"output={out}")
    assert "holds an interrupted run; continue it with --resume" in line
    assert snapshot(out) == before


def test_export_of_a_run_in_progress_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    interrupted_run(out)
    before = snapshot(out)
    with locked(out) as pid:
        line = fails(capsys, "export", str(out))
        assert f"in use by another wfcore run (pid {pid}), in progress" in line
    assert snapshot(out) == before


def test_a_second_sweep_into_a_root_is_refused(tmp_path, capsys):
    root = tmp_path / "sweep"
    root.mkdir()
    with locked(root, check=False) as pid:
        line = fails(capsys, "sweep", CONFIG, *FAST, f"output={root}",
                     "allocator.name=global,uniform")
        assert f"(pid {pid}), in progress" in line
    assert [p.name for p in root.iterdir()] == [rundir.LOCK]


def test_temporary_names_are_per_process(tmp_path):
    target = tmp_path / "model.onnx"
    names = {files.temporary_name(target, ".unchecked.onnx") for _ in range(50)}
    assert len(names) == 50
    assert all(n.name.startswith(f".model.{os.getpid()}-") for n in names)
    with files.temporary(target, ".x") as tmp:
        tmp.write_text("partial")
    assert list(tmp_path.iterdir()) == []


WORKER = textwrap.dedent('''
    import os, signal, sys, torch
    from wfcore import distributed
    from wfcore.errors import first_line
    group = distributed.init("gloo", 60)
    if group.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        with distributed.lost_rank("continue it with wfcore prune --resume RUN"):
            for _ in range(100):
                distributed.sum_(torch.ones(4))
    except Exception as exc:
        print(type(exc).__name__, first_line(exc), flush=True)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_rank_is_one_line_naming_it_and_the_resume_command():
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        out, err = ranks[0].communicate(timeout=120)
        assert ranks[1].wait(timeout=60) == -signal.SIGKILL
    finally:
        for r in ranks:
            r.kill()
            r.wait()
    assert out.startswith("LostRankError rank 1 of 2 was lost"), (out, err)
    assert out.strip().endswith("continue it with wfcore prune --resume RUN")
    assert len(out.strip().splitlines()) == 1
