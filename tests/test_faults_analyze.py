"""`wfcore analyze` faults (issue 25, case 4): its output directory has a run directory's
protections, and a bad option or output is found before any work.

``compute`` (the dense model, the exact Hessian, the estimators) is replaced by a stub
that fails the test if reached wherever the refusal must come first; the one case that
needs an analysis to be replaced uses a stub result, so every test takes milliseconds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import cli_checks
import numpy as np
import pytest

from wfcore import cli
from wfcore.run import directory as rundir
from wfcore.tools import analyze as analyze_mod

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")


@pytest.fixture
def no_work(monkeypatch):
    """Reaching the analysis itself fails the test: the refusal must come before it."""
    def compute(cfg, plugins):
        raise AssertionError("the analysis ran before the refusal")

    monkeypatch.setattr(analyze_mod, "compute", compute)


def fails(capsys, *argv: str) -> str:
    """``wfcore analyze CONFIG *argv`` refused in one line."""
    return cli_checks.fails(capsys, "analyze", CONFIG, *argv)



@pytest.mark.parametrize(("override", "key"), [
    ("analyze.heatmap_size=0", "analyze.heatmap_size"),
    ("analyze.directions=0", "analyze.directions"),
    ("analyze.batch_size=0", "analyze.batch_size"),
    ("analyze.samples=0", "analyze.samples"),
    ("analyze.num_weights=0", "analyze.num_weights"),
    ("analyze.damp=-1", "analyze.damp"),
    ("analyze.sparsities=[1.5]", "analyze.sparsities"),
    ("analyze.sparsities=[0.5,1.0]", "analyze.sparsities"),
    ("analyze.sparsities=[-0.1]", "analyze.sparsities"),
    ("analyze.sparsities=[]", "analyze.sparsities"),
    ("analyze.max_minutes=0", "analyze.max_minutes"),
    ("analyze.num_grads=[0]", "analyze.num_grads"),
])
def test_bad_options_are_named_before_any_work(tmp_path, capsys, no_work, override, key):
    out = tmp_path / "analysis"
    line = fails(capsys, override, f"output={out}")
    assert f"config key '{key}'" in line
    assert not out.exists()  # nothing created for a refused analysis


@pytest.mark.parametrize("force", [False, True])
def test_a_users_analysis_md_is_never_replaced(tmp_path, capsys, no_work, force):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "analysis.md").write_text("my notes\n")
    line = fails(capsys, f"output={out}", *(["--force"] if force else []))
    assert "analysis.md, which no wfcore run wrote" in line
    assert (out / "analysis.md").read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["analysis.md"]


def earlier_analysis(out: Path) -> dict[str, bytes]:
    out.mkdir()
    rundir.claim(out)
    (out / "analysis.json").write_text(json.dumps({"config": {}, "results": []}))
    (out / "analysis.md").write_text("# the earlier analysis\n")
    (out / "heatmaps.png").write_bytes(b"old plot")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_an_earlier_analysis_is_kept_without_force(tmp_path, capsys, no_work):
    out = tmp_path / "analysis"
    before = earlier_analysis(out)
    assert "holds an analysis" in fails(capsys, f"output={out}")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != rundir.LOCK} == before


def stub_result(cfg, plugins):
    """What ``compute`` returns, for the smallest analysis the report can draw."""
    errors = {"diag_rel_error": 0.1, "ihvp_random_rel_error": 0.1, "ihvp_random_cos": 0.9,
              "ihvp_gradient_rel_error": 0.1, "ihvp_gradient_cos": 0.9}
    row = {"curvature": "woodfisher", "m": 4,
           "inverse": dict.fromkeys(("hessian", "empirical_fisher", "true_fisher"), errors),
           "single": {"spearman": 0.5, "ranking_error": {"0.5": 0.1},
                      "predicted": [1.0, 2.0], "actual": [1.0, 2.5]},
           "sets": [{"sparsity": 0.5, "predicted": 1.0, "taylor": 1.0, "actual": 1.0}]}
    spectrum = {"min": 0.0, "max": 1.0, "negative": 0, "negative_mass": 0.0}
    cfg_dict = {"analyze": {"damp": 1e-5, "psd": True, "estimators": ["woodfisher"],
                            "num_grads": [4], "sparsities": [0.5]},
                "scorer": {"name": "obs"}, "allocator": {"name": "global"}}
    result = {"name": "stub", "config": cfg_dict, "plan": {"weights": 2},
              "params": {"w": 2}, "samples": 2, "loss": 1.0, "spectra": {"hessian": spectrum},
              "heatmap": {"param": "w", "start": 0, "size": 2}, "results": [row],
              "seconds": 0.0}
    return result, {"woodfisher": np.eye(2)}


def test_force_replaces_an_earlier_analysis_only_once_the_new_one_is_made(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "analysis"
    earlier_analysis(out)
    monkeypatch.setattr(analyze_mod, "compute", stub_result)
    assert cli.main(["-q", "analyze", CONFIG, f"output={out}", "--force"]) == 0
    assert json.loads((out / "analysis.json").read_text())["name"] == "stub"
    assert (out / "heatmaps.png").read_bytes() != b"old plot"
    assert (out / rundir.MARKER).is_file()


def test_an_unwritable_output_is_found_before_the_work(tmp_path, capsys, no_work, monkeypatch):
    out = tmp_path / "analysis"
    out.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: then the refusal is simulated
        out.chmod(0o555)
    else:
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if Path(path).parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    try:
        assert "cannot write in the run directory" in fails(capsys, f"output={out}")
    finally:
        out.chmod(0o755)


def test_an_output_file_that_is_a_directory_is_found_before_the_work(tmp_path, capsys,
                                                                      no_work):
    out = tmp_path / "analysis"
    (out / "analysis.md").mkdir(parents=True)
    rundir.claim(out)
    assert "analysis.md is a directory" in fails(capsys, f"output={out}")


def test_an_analysis_into_a_locked_directory_is_refused(tmp_path, capsys, no_work):
    out = tmp_path / "analysis"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from wfcore.run.directory import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"in use by another wfcore run (pid {holder.pid})" in fails(
            capsys, f"output={out}")
    finally:
        holder.kill()
        holder.wait()
