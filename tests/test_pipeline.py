"""End to end on mnist5k with MLPNet and magnitude pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from plugin_packages import wfcore_subprocess

from wfcore import cli
from wfcore.run import prepare

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"


def prune(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "run"
    code = cli.main(["-q", "prune", str(CONFIG), "estimator.name=magnitude", "scorer.update=none",
                     "scheduler.name=oneshot", "scheduler.sparsities=[0.5,0.9]", f"output={out}",
                     *overrides])
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("allocator", ["global", "uniform"])
def test_magnitude_oneshot_reaches_targets(tmp_path, allocator):
    report = prune(tmp_path, f"allocator.name={allocator}")
    assert report["dense"]["accuracy"] >= 0.90
    assert report["finished"] is True
    assert [s["target_sparsity"] for s in report["steps"]] == [0.5, 0.9]
    for step in report["steps"]:
        assert abs(step["sparsity"] - step["target_sparsity"]) <= 0.001
        assert set(step["timings"]) == {"gradients", "estimate", "prune", "finetune", "evaluate"}
        assert 0.0 <= step["accuracy"] <= 1.0
    run = tmp_path / "run"
    for name in ("report.md", "config.yaml", "dense.pt", "model_step0.pt", "model_step1.pt",
                 "accuracy_vs_sparsity.png"):
        assert (run / name).is_file(), name
    # The saved model has exactly the reported zeros in its prunable weights.
    state = torch.load(run / "model_step1.pt", weights_only=True)
    layers = report["steps"][1]["layers"]
    zeros = sum(int((state[n] == 0).sum()) for n in layers)
    assert zeros == round(sum(v["sparsity"] * v["numel"] for v in layers.values()))


def test_dense_model_is_cached(tmp_path, monkeypatch):
    trained: list[str] = []
    train = prepare.train

    def spy(*args, **kwargs):
        trained.append(kwargs.get("desc", ""))
        return train(*args, **kwargs)

    monkeypatch.setattr(prepare, "train", spy)
    first = prune(tmp_path / "a")  # trains the dense model, unless a test before did
    cached = Path(first["dense"]["source"])
    assert cached.is_file() and cached.is_relative_to(os.environ["WFCORE_CACHE"])
    trained.clear()
    second = prune(tmp_path / "b")
    assert trained == []  # the second run loads it: no training
    assert second["dense"]["source"] == str(cached)
    assert second["dense"]["accuracy"] == first["dense"]["accuracy"]


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    prune(tmp_path)
    code = cli.main(["prune", str(CONFIG), "estimator.name=magnitude",
                     "scheduler.sparsities=[0.5]", f"output={tmp_path / 'run'}"])
    assert code == 2
    assert "--force" in capsys.readouterr().err


@pytest.fixture
def third_party_site(plugin_site) -> Path:
    return plugin_site("wfcore-dense-first")


def test_third_party_plugin_is_listed_and_used(third_party_site, tmp_path):
    listing = wfcore_subprocess(third_party_site, "plugins")
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "wfcore-dense-first:dense_first" in out
    assert "entry point (wfcore-dense-first) 0.1.0" in out  # the distribution's version
    assert "implements: wfcore_allocators" in out
    assert "allocators: dense_first" in out
    for name in ("magnitude", "obs", "global", "uniform", "oneshot", "mlpnet", "mnist_cnn",
                 "mnist5k"):
        assert name in out

    run = tmp_path / "run"
    result = wfcore_subprocess(
        third_party_site, "-q", "prune", str(CONFIG), "estimator.name=magnitude",
        "scorer.update=none", "scheduler.name=oneshot", "scheduler.sparsities=[0.8]",
        "allocator.name=dense_first", "allocator.keep=[fc1.*]", f"output={run}")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["versions"]["plugins"]["wfcore-dense-first:dense_first"] == "0.1.0"
    assert {"python", "torch", "wfcore"} <= set(report["versions"])
    layers = report["steps"][0]["layers"]
    assert layers["fc1.weight"]["sparsity"] == 0.0
    assert layers["fc2.weight"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    bad = wfcore_subprocess(third_party_site, "prune", str(CONFIG), "allocator.name=dense_first",
                            "allocator.kepe=[x]", f"output={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "allocator.kepe" in bad.stderr


def test_oneshot_targets_do_not_depend_on_the_steps_before(tmp_path):
    """Each one-shot step starts from the dense model with the same gradient samples."""
    common = ["estimator.name=diag_fisher", "fisher.num_grads=64", "scorer.update=independent"]
    alone = prune(tmp_path / "a", *common, "scheduler.sparsities=[0.9]")
    after = prune(tmp_path / "b", *common, "scheduler.sparsities=[0.5,0.9]")
    assert after["steps"][1]["accuracy"] == alone["steps"][0]["accuracy"]
    assert after["steps"][1]["loss"] == alone["steps"][0]["loss"]


@pytest.mark.parametrize("allocator", ["global", "uniform"])
def test_block_structure_prunes_whole_blocks_at_the_exact_sparsity(tmp_path, allocator):
    report = prune(tmp_path, f"allocator.name={allocator}", "structure.block=4",
                   "estimator.name=woodfisher", "estimator.block_size=layer",
                   "fisher.num_grads=32", "scorer.update=joint")
    state = torch.load(tmp_path / "run" / "model_step1.pt", weights_only=True)
    for step in report["steps"]:
        assert abs(step["sparsity"] - step["target_sparsity"]) <= 0.001
    split = 0
    for name in report["steps"][1]["layers"]:
        blocks = (state[name] == 0).unflatten(1, (-1, 4)).sum(-1)  # (out, in/4): zeros a block
        split += int(((blocks > 0) & (blocks < 4)).sum())
    # Every zero lies in a whole zero block but for the last block pruned: one per layer
    # (uniform), one in the model (global); an exactly-zero weight of a kept block aside.
    assert split <= (len(report["steps"][1]["layers"]) if allocator == "uniform" else 1)
    assert report["steps"][1]["safeguard"][-1]["whole_blocks"] > 0.99
