"""Checkpoints and --resume: an interrupted run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wfcore import cli, config, hookimpl, manager
from wfcore.run import checkpoint, pipeline, training

ROOT = Path(__file__).parents[1]
# The gradual config with MLPNet instead of the CNN and 1,000 training images: the same
# schedule keys, fast epochs.
GRADUAL = ROOT / "configs" / "mnist_cnn_gradual.yaml"
MLPNET = ["model.name=mlpnet", "train.epochs=10", "data.options.test_size=4000"]


def estimators() -> list[str]:
    """magnitude, and one estimator that samples gradients (its RNG must resume too)."""
    names = manager.build().registry("estimators").names()
    return ["magnitude"] + [n for n in ("diag_fisher", "woodfisher") if n in names][:1]


def overrides(out: Path, estimator: str = "magnitude") -> list[str]:
    # random: no fallback to magnitude pruning's mask, which the safeguard would choose
    # over every random mask (the random draws would then leave no trace in the weights)
    fallback = "none" if estimator == "random" else "magnitude"
    return [f"estimator.name={estimator}", "scorer.update=none", "fisher.num_grads=64",
            f"safeguard.fallback={fallback}",
            "fisher.labels=sampled", "scheduler.initial_sparsity=0.5",
            "scheduler.final_sparsity=0.9", "scheduler.start_epoch=1", "scheduler.end_epoch=3",
            "scheduler.freq=1", "scheduler.epochs=5", "scheduler.lr=0.01",
            "scheduler.lr_decay_start=2", f"output={out}"]


def run(out: Path, *extra: str, estimator: str = "magnitude", resume: bool = False,
        plugins: manager.Plugins | None = None) -> dict:
    cfg = config.load(GRADUAL, MLPNET + overrides(out, estimator) + list(extra))
    return pipeline.run(cfg, resume=resume, plugins=plugins)


def interrupt_epoch(monkeypatch, call: int, batches: int = 5, kill: bool = False) -> None:
    """Ctrl-C ``batches`` batches into the ``call``-th fine-tuning epoch (weights half-updated;
    dense training is not counted). ``kill``: by SIGTERM to this process instead."""
    original = training.train_epoch
    calls = {"n": 0}

    def breaking_loader(loader):
        for i, batch in enumerate(loader):
            if i == batches:
                if not kill:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    def train_epoch(model, loader, *args, **kwargs):
        calls["n"] += kwargs.get("desc", "").startswith("fine-tune")
        if calls["n"] == call:
            return original(model, breaking_loader(loader), *args, **kwargs)
        return original(model, loader, *args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", train_epoch)


def assert_same_run(a: Path, report_a: dict, b: Path, report_b: dict) -> None:
    last = len(report_a["steps"]) - 1
    state_a = torch.load(a / f"model_step{last}.pt", weights_only=True)
    state_b = torch.load(b / f"model_step{last}.pt", weights_only=True)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    keys = ("epoch", "step", "lr", "train_loss", "accuracy", "loss", "sparsity")
    assert [[e[k] for k in keys] for e in report_a["epochs"]] == \
        [[e[k] for k in keys] for e in report_b["epochs"]]
    assert [s["sparsity"] for s in report_a["steps"]] == [s["sparsity"] for s in report_b["steps"]]
    assert report_b["finished"] and not (b / checkpoint.FILENAME).exists()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of an estimator, made once: name -> (run dir, report)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    done: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in done:
            done[name] = (root / name, run(root / name, estimator=name))
        return done[name]

    return get


# Epoch calls 1..5: before the first step (pre-epoch), mid-schedule, the last epoch.
# random: its generator is checkpointed, so a resumed run draws the same scores.
CASES = [("magnitude", 1), ("magnitude", 3), (estimators()[-1], 5), ("random", 3)]


@pytest.mark.parametrize("estimator, call", CASES)
def test_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted,
                                                           estimator, call):
    expected = uninterrupted(estimator)  # first: the dense model is trained and cached
    out = tmp_path / "run"
    interrupt_epoch(monkeypatch, call)
    with pytest.raises(KeyboardInterrupt, match=f"resume with: wfcore prune --resume {out}"):
        run(out, estimator=estimator)
    monkeypatch.undo()
    saved = torch.load(out / checkpoint.FILENAME, weights_only=True)
    assert saved["position"]["epoch"] == call - 1  # only the epoch in progress was lost
    report = run(out, estimator=estimator, resume=True)
    assert_same_run(*expected, out, report)


class FailAfterStep:
    """A plugin that fails once, after step ``index`` was recorded."""

    def __init__(self, index: int):
        self.index = index

    @hookimpl
    def wfcore_step_end(self, step, record, run_dir):
        if step.index == self.index:
            raise RuntimeError("boom")


def test_failure_in_a_step_end_hook_resumes_to_the_same_weights(tmp_path, uninterrupted):
    expected = uninterrupted("magnitude")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run(out, plugins=manager.build(extra_plugins=[("fail", FailAfterStep(1))]))
    partial = json.loads((out / "report.json").read_text())
    assert len(partial["steps"]) == 2 and not partial["finished"]
    report = run(out, resume=True)
    assert_same_run(*expected, out, report)


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # only what this call prints
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(capsys, ["prune", "--resume", str(empty)])
    assert "no checkpoint" in err and str(empty) in err
    err = one_line_error(capsys, ["prune", "--resume", str(tmp_path / "missing")])
    assert "no checkpoint" in err and "does not exist" in err


def interrupted_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """An interrupted run directory, and a YAML file with its config."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "config.yaml"
    OmegaConf.save(config.load(GRADUAL, MLPNET + overrides(out)), cfg_file)
    interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config.load(cfg_file))
    monkeypatch.undo()
    return out, cfg_file


def test_resume_with_another_config_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    out, cfg_file = interrupted_run(tmp_path, monkeypatch)
    err = one_line_error(capsys, ["prune", str(cfg_file), "scheduler.final_sparsity=0.8",
                                  "--resume", str(out)])
    assert "different config" in err and "scheduler.final_sparsity" in err
    err = one_line_error(capsys, ["prune", "--resume", str(out), "train.lr=0.1"])
    assert "different config" in err and "train.lr" in err
    # Neither a new run without --force: the interrupted one would be lost.
    err = one_line_error(capsys, ["prune", str(cfg_file)])
    assert "interrupted run" in err and "--resume" in err
    # The run's own config.yaml resumes it; a different output path does not matter.
    moved = tmp_path / "moved"
    out.rename(moved)
    assert cli.main(["-q", "prune", "--resume", str(moved)]) == 0
    report = json.loads((moved / "report.json").read_text())
    assert report["finished"] and [e["epoch"] for e in report["epochs"]] == [1, 2, 3, 4, 5]
    assert report["config"]["output"] == str(moved)
    err = one_line_error(capsys, ["prune", "--resume", str(moved)])
    assert "finished" in err


def test_ctrl_c_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "run"
    interrupt_epoch(monkeypatch, 2)
    code = cli.main(["-q", "prune", str(GRADUAL), *MLPNET, *overrides(out)])
    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err.splitlines()[-1].endswith(f"resume with: wfcore prune --resume {out}")
    saved = torch.load(out / checkpoint.FILENAME, weights_only=True)  # a valid checkpoint
    assert saved["position"]["epoch"] == 1


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_sigterm_ends_like_ctrl_c_and_resumes(tmp_path, monkeypatch, uninterrupted):
    expected = uninterrupted("magnitude")
    out = tmp_path / "run"
    interrupt_epoch(monkeypatch, 4, kill=True)
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        run(out)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back
    assert torch.load(out / checkpoint.FILENAME, weights_only=True)["position"]["epoch"] == 3
    assert_same_run(*expected, out, run(out, resume=True))
