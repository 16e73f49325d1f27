"""Runs across processes with torchrun (gloo, CPU): the same masks and weights as one
process, files written by rank 0 alone, and an interrupted run resumed exactly.

Each test launches real processes (``python -m torch.distributed.run``), one intra-op
thread each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wfcore import cli, config, distributed
from wfcore.run import checkpoint, pipeline

ROOT = Path(__file__).parents[1]
CNN = ROOT / "configs" / "mnist_cnn.yaml"
GRADUAL = ROOT / "configs" / "mnist_cnn_gradual.yaml"
FIXTURES = Path(__file__).parent / "fixtures"
# mnist_cnn with a short dense training (cached for the session) and few gradients
ONESHOT = ["train.epochs=2", "fisher.num_grads=48", "scheduler.sparsities=[0.9,0.95]",
           "device=cpu"]
# MLPNet on 1,000 training images, pruned gradually with WoodFisher: fast epochs
GRADUAL_RUN = ["model.name=mlpnet", "train.epochs=3", "data.options.test_size=4000",
               "device=cpu", "estimator.name=woodfisher", "estimator.block_size=200",
               "fisher.num_grads=32", "scheduler.initial_sparsity=0.5",
               "scheduler.final_sparsity=0.9", "scheduler.start_epoch=0",
               "scheduler.end_epoch=2", "scheduler.freq=1", "scheduler.epochs=4",
               "scheduler.lr=0.01", "scheduler.lr_decay_start=1",
               "plugins=[interrupt_plugin]"]


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node nproc -m wfcore -q ARGS``."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "wfcore", "-q", *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def states(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"model_step{step}.pt", weights_only=True)


def test_one_process_is_a_group_of_one():
    assert not distributed.launched()
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    rows = torch.randn(5, 3)
    assert distributed.gather_rows(rows, 5) is rows
    assert distributed.sum_float(2.5) == 2.5
    keep = {"w": torch.ones(3, dtype=torch.bool)}
    assert distributed.broadcast_masks(keep) is keep
    assert distributed.on_main(lambda: 7) == 7


@pytest.mark.parametrize("count,world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shares_cover_the_rows_once_in_order(count, world):
    shares = [distributed.share(count, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1


def test_plan_shows_each_ranks_share(tmp_path, capsys):
    args = ["plan", "--nproc-per-node", "2", str(CNN), *ONESHOT, f"output={tmp_path}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 processes: 24 of the 48 gradient rows" in out
    assert cli.main(["plan", "--nproc-per-node", "0", str(CNN)]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_two_processes_prune_like_one(tmp_path):
    """mnist_cnn one-shot, WoodFisher, joint update, 90% and 95%: 2 gloo processes give the
    single process's masks exactly and its weights to 1e-6 (block chunks dealt to both)."""
    single, two = tmp_path / "single", tmp_path / "two"
    pipeline.run(config.load(CNN, [*ONESHOT, f"output={single}"]))
    done = torchrun(2, "prune", str(CNN), *ONESHOT, f"output={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    for step in (0, 1):
        a, b = states(single, step), states(two, step)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name] == 0, b[name] == 0), (step, name)
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    report = json.loads((two / "report.json").read_text())
    assert report["distributed"] == {"processes": 2, "backend": "gloo", "replicas_equal": True,
                                     "parts": [{"processes": 2, "backend": "gloo"}]}
    assert [s["sparsity"] for s in report["steps"]] == pytest.approx([0.9, 0.95], abs=1e-3)
    assert not list(two.glob("*.rank*"))  # nothing of rank 1's


@pytest.mark.usefixtures("one_thread")
def test_interrupted_two_process_gradual_run_resumes_exactly(tmp_path):
    """Ctrl-C to torchrun after step 1 leaves a checkpoint; resumed under torchrun, the run
    ends with rank 0's and rank 1's weights identical and equal to an uninterrupted run's."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = torchrun(2, "prune", str(GRADUAL), *GRADUAL_RUN, f"output={whole}")
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = torchrun(2, "prune", str(GRADUAL), *GRADUAL_RUN, f"output={broken}",
                       env={"WFCORE_TEST_INTERRUPT_STEP": "1"})
    assert stopped.returncode != 0
    assert checkpoint.path(broken).is_file()
    report = json.loads((broken / "report.json").read_text())
    assert not report["finished"] and len(report["steps"]) == 2
    assert stopped.stderr.count("wfcore: interrupted") == 1, stopped.stderr[-3000:]

    resumed = torchrun(2, "prune", "--resume", str(broken))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((broken / "report.json").read_text())
    assert b["finished"] and b["distributed"]["replicas_equal"]
    assert b["distributed"]["parts"] == [{"processes": 2, "backend": "gloo"}] * 2
    last = len(a["steps"]) - 1
    assert len(b["steps"]) == last + 1
    for name, value in states(whole, last).items():
        assert torch.equal(states(broken, last)[name], value), name
    keys = ("epoch", "lr", "train_loss", "accuracy", "sparsity")
    assert [[e[k] for k in keys] for e in a["epochs"]] == [[e[k] for k in keys]
                                                         for e in b["epochs"]]


@pytest.mark.parametrize("override,key", [("model.checkpoint=/nonexistent.pt", "model.checkpoint"),
                                          ("fisher.num_grads=0", "fisher.num_grads")])
def test_a_user_error_is_one_line_printed_once(tmp_path, override, key):
    done = torchrun(2, "prune", str(CNN), *ONESHOT, override, f"output={tmp_path / 'run'}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("wfcore: error")]
    assert len(errors) == 1 and key in errors[0], done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_three_processes_sample_sampled_labels_and_batched_rows_like_one(tmp_path):
    """Uneven shares (3 ranks), labels drawn from the model, rows of 2 samples (one backward
    pass per row), one on-disk store written by the 3 ranks: the same masks and weights as
    one process."""
    extra = ["fisher.labels=sampled", "fisher.grad_batch=2", "fisher.num_grads=40",
             "fisher.store=disk"]
    single, three = tmp_path / "single", tmp_path / "three"
    pipeline.run(config.load(CNN, [*ONESHOT, *extra, f"output={single}"]))
    done = torchrun(3, "prune", str(CNN), *ONESHOT, *extra, f"output={three}")
    assert done.returncode == 0, done.stderr[-3000:]
    for step in (0, 1):
        a, b = states(single, step), states(three, step)
        for name in a:
            assert torch.equal(a[name] == 0, b[name] == 0), (step, name)
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_two_process_run_resumes_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    stopped = torchrun(2, "prune", str(GRADUAL), *GRADUAL_RUN, f"output={run_dir}",
                       env={"WFCORE_TEST_INTERRUPT_STEP": "0"})
    assert stopped.returncode != 0 and checkpoint.path(run_dir).is_file()
    sys.path.insert(0, str(FIXTURES))  # the run's plugin, imported in this process
    try:
        report = pipeline.run(pipeline.resume_config(run_dir), resume=True)
    finally:
        sys.path.remove(str(FIXTURES))
    assert report["finished"] and report["steps"][-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert report["distributed"]["parts"] == [{"processes": 2, "backend": "gloo"},
                                              {"processes": 1, "backend": None}]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_rank_lost_while_fine_tuning_is_one_line_and_the_run_resumes(tmp_path):
    """Rank 1 is SIGKILLed after step 0 (as the OOM killer would): rank 0's next collective
    fails, and it says so in one line naming rank 1 and the resume command. Launched as
    torchrun launches (RANK, WORLD_SIZE, MASTER_*), without its agent, which would end
    rank 0 as well."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WFCORE_TEST_KILL": "1:0",
           "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    ranks = [subprocess.Popen([sys.executable, "-m", "wfcore", "-q", "prune", str(GRADUAL),
                               *GRADUAL_RUN, f"output={run_dir}"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        err = ranks[0].communicate(timeout=600)[1]
        assert ranks[1].wait(timeout=60) == -9
    finally:
        for r in ranks:
            r.kill()
            r.wait()
    assert ranks[0].returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("wfcore: error: rank 1 of 2 was lost"), lines[0]
    assert lines[0].endswith(f"-m wfcore prune --resume {run_dir}")
    sys.path.insert(0, str(FIXTURES))
    try:
        report = pipeline.run(pipeline.resume_config(run_dir), resume=True)
    finally:
        sys.path.remove(str(FIXTURES))
    assert report["finished"]
