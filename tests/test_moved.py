"""Old import paths of modules that moved into subpackages keep working for one release:
each is the new module, and importing it warns naming the new path. Nothing in the
project imports an old path."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
from import_graph import ROOT, SOURCES, uses

from wfcore.errors import WfcoreDeprecationWarning

MOVED = {
    'wfcore.gradients': 'wfcore.fisher.gradients',
    'wfcore.store': 'wfcore.fisher.store',
    'wfcore.store_writer': 'wfcore.fisher.store_writer',
    'wfcore.shared_store': 'wfcore.fisher.shared_store',
    'wfcore.plan': 'wfcore.fisher.plan',
    'wfcore.grad_calibration': 'wfcore.fisher.grad_calibration',
    'wfcore.precision': 'wfcore.fisher.precision',
    'wfcore.pipeline': 'wfcore.run.pipeline',
    'wfcore.pruning': 'wfcore.run.pruning',
    'wfcore.prepare': 'wfcore.run.prepare',
    'wfcore.runner': 'wfcore.run.runner',
    'wfcore.checkpoint': 'wfcore.run.checkpoint',
    'wfcore.admission': 'wfcore.run.admission',
    'wfcore.training': 'wfcore.run.training',
    'wfcore.report': 'wfcore.run.report',
    'wfcore.states': 'wfcore.run.states',
    'wfcore.safeguard': 'wfcore.run.safeguard',
    'wfcore.safeguard_plan': 'wfcore.run.safeguard_plan',
    'wfcore.dense_fit': 'wfcore.run.dense_fit',
    'wfcore.batchnorm': 'wfcore.run.batchnorm',
    'wfcore.calibration': 'wfcore.run.calibration',
    'wfcore.degenerate': 'wfcore.run.degenerate',
    'wfcore.targets': 'wfcore.run.targets',
    'wfcore.structured_run': 'wfcore.run.structured_run',
    'wfcore.runs': 'wfcore.run.saved',
    'wfcore.rundir': 'wfcore.run.directory',
    'wfcore.sweep': 'wfcore.tools.sweep',
    'wfcore.analyze': 'wfcore.tools.analyze',
    'wfcore.analyze_dir': 'wfcore.tools.analyze_dir',
    'wfcore.analyze_report': 'wfcore.tools.analyze_report',
    'wfcore.exact': 'wfcore.tools.exact',
    'wfcore.plugins.woodbury': 'wfcore.plugins.woodfisher.algebra',
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(WfcoreDeprecationWarning, match=re.escape(MOVED[old])):
        module = importlib.import_module(old)
    assert module is new


def test_nothing_in_the_project_imports_an_old_path():
    files = [p for folder in (*SOURCES.values(), ROOT / "benchmarks", ROOT / "tests")
             for p in folder.rglob("*.py") if "moved(__name__," not in p.read_text()
             and p.name != "test_moved.py"]
    found = ["{p.relative_to(ROOT)}: {u}" for p in files for u in uses(p.read_text())
             if u.module in MOVED or any(u.module == o.rsplit(".", 1)[0]
                                          and u.name == o.rsplit(".", 1)[1] for o in MOVED)]
    assert not found, found
