"""One public surface: ``wfcore.__all__``. The docs and the README's examples import only
names it lists (and its public submodules, ``wfcore.testing`` ...), and ``import wfcore`` stays
light (the names load on first use)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import private_uses

import wfcore

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_docs_import_only_public_names(path):
    blocks = python_blocks(path)
    bad = {use for code in blocks for use in private_uses(code)}
    assert not bad, f"{path.name} uses names outside wfcore.__all__: {sorted(bad)}"


def test_the_check_catches_a_private_import():
    assert private_uses("from wfcore.run.pipeline import run\nimport wfcore\nwfcore.manager\n"
                        "from wfcore.testing import check_curvature\nwfcore.prune") == \
        ["from wfcore.run.pipeline import run", "wfcore.manager"]


def test_every_public_name_resolves_and_import_wfcore_does_not_load_torch():
    for name in wfcore.__all__:
        assert getattr(wfcore, name) is not None, name
    assert set(wfcore.__all__) == {"__version__", "hookimpl", *wfcore._LAZY, *wfcore._MODULES}
    done = subprocess.run([sys.executable, "-c", "import sys, wfcore; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert done.stdout.strip() == "False"


def test_wfcore_export_is_the_function_also_once_the_export_package_is_imported(tmp_path):
    import torch
    import wfcore.export.onnx  # noqa: F401  (sets wfcore.export to the package)

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    record = wfcore.export(model, tmp_path / "m.onnx", input_shape=(4,), quiet=True)
    assert record["zeros"]["numel"] == 12 and record["parity"]["max_abs_diff"] < 1e-4


def test_bench_returns_one_row_per_file_and_engine(tmp_path):
    import torch

    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    wfcore.export(model, tmp_path / "m.onnx", input_shape=(16,), quiet=True)
    rows = wfcore.bench(tmp_path / "m.onnx", engines=["onnxruntime"], warmup=1, runs=3,
                        quiet=True)
    assert [(Path(r["model"]).name, r["engine"]) for r in rows] == [("m.onnx", "onnxruntime")]
    assert rows[0]["median_ms"] > 0 and rows[0]["runs"] >= 3
