"""The layering of wfcore, read from the imports of its source files (tests/import_graph.py:
module-level, function-level and TYPE_CHECKING imports alike).

- no import cycle among the modules of the package (wfcore/, plugins/, export/);
- the plugins (plugins/) and the exporters and ``wfcore bench`` (export/) import only the
  public API (``wfcore.__all__`` and its public submodules) besides their own package;
- the tools that only the CLI uses (sweep, analyze, ...) import the run machinery, never
  the reverse;
- the core imports no plugin: it finds them through their entry points;
- benchmarks/ import only public names, but for the machinery some of them measure
  directly (a list that may only shrink).

Run it alone: ``python -m pytest tests/test_architecture.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import (
    ROOT,
    depends_on,
    file_uses,
    find_cycle,
    import_graph,
    is_public,
    module_files,
    private_uses,
)

MODULES = module_files()
GRAPH = import_graph(MODULES)

# The commands of the CLI that drive runs and read their directories; nothing else may
# import them.
TOOLS = frozenset({"wfcore.cli", "wfcore.__main__", "wfcore.tools.sweep", "wfcore.tools.analyze",
                   "wfcore.tools.analyze_dir", "wfcore.tools.analyze_report"})
# export/__init__.py makes the package callable as the function ``wfcore.export`` that it
# shadows as an attribute of ``wfcore``; it calls that function where it is defined.
PRIVATE_ALLOWED = {("wfcore.export", "from wfcore.api import export")}
# The core finds the built-in plugins through their entry points, as any other, and imports
# none, but for these: the Python API and the CLI run ``wfcore bench``; group OBS shares
# WoodFisher's block algebra.
CORE_USES = {("wfcore.api", "wfcore.export.bench"), ("wfcore.cli", "wfcore.export.bench"),
             ("wfcore.group_obs", "wfcore.plugins.woodfisher.algebra")}
# What benchmarks/ take from the machinery to measure it directly (a pipeline's stages, the
# gradient store, group OBS): may only shrink. Anything else a benchmark needs goes through
# the public API.
BENCHMARK_PRIVATE = {
    "comparison.py": {"from wfcore import config", "from wfcore import manager",
                      "from wfcore.run import pipeline"},
    # the configuration page is generated from the schema and every component's Options
    "config_doc.py": {"from wfcore import config", "from wfcore import manager"},
    # runs the quick-start sweep through the sweep tool and checks its table
    "sweep_check.py": {"from wfcore.tools import sweep"},
    "cpu_speedup.py": {"from wfcore.export import bench",
                       "from wfcore.export.onnx import OnnxOptions",
                       "from wfcore.export.onnx import conv_linear_weights",
                       "from wfcore.export.onnx import export_checked",
                       "from wfcore.export.quantize import quantize_int8",
                       "from wfcore.plugins.allocators import GlobalAllocator",
                       "from wfcore.plugins.allocators import UniformAllocator"},
    "bench_noise.py": {"from wfcore.export.onnx import OnnxOptions",
                       "from wfcore.export.onnx import export_checked"},
    "distributed.py": {"from wfcore import config", "from wfcore import manager",
                       "from wfcore.run import pipeline",
                       "from wfcore.fisher.gradients import GradientSampler",
                       "from wfcore.fisher.store import GradientStore"},
    "estimator_speed.py": {"from wfcore.plugins.woodfisher import DTYPES",
                           "from wfcore.plugins.woodfisher import BlockGroup"},
    "layerwise.py": {"from wfcore import config", "from wfcore.run import pipeline"},
    "robustness.py": {"from wfcore import config", "from wfcore.run import pipeline"},
    "safeguard_cost.py": {"from wfcore import config", "from wfcore.run import pipeline"},
    "scale.py": {"from wfcore import config", "from wfcore.run import pipeline"},
    "semi_structured.py": {"from wfcore.nm import nm_keep", "from wfcore.nm import pattern_holds"},
    "structured_accuracy.py": {"from wfcore import config", "from wfcore import manager",
                               "from wfcore.run import pipeline",
                               "from wfcore.group_obs import Diagonal",
                               "from wfcore.group_obs import DualFisher",
                               "from wfcore.group_obs import GroupScorer",
                               "from wfcore.group_obs import Taylor",
                               "from wfcore.plugins.diag_fisher import live_mean",
                               "from wfcore.structured import prune_channels",
                               "from wfcore.structured import recalibrate_batchnorm",
                               "from wfcore.run.training import evaluate"},
    "structured_speedup.py": {"from wfcore.channels import CostModel",
                              "from wfcore.export.onnx import torch_to_onnx",
                              "from wfcore.group_obs import Diagonal",
                              "from wfcore.structured import prune_channels"},
}


def core_imports_of_components(graph: dict[str, set[str]]) -> list[str]:
    """'core -> component' for every module of wfcore/ that imports one of plugins/ or
    export/, but for the allowed ones."""
    components = ("wfcore.plugins", "wfcore.export")
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith(components)
                  for d in deps if d.startswith(components) and (m, d) not in CORE_USES)


def reverse_imports(graph: dict[str, set[str]], tools: frozenset[str]) -> list[str]:
    """'core -> tool' for every module outside ``tools`` that imports one of them."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if m not in tools
                  for d in deps if d in tools)


def outside_the_api(module: str, path: Path) -> list[str]:
    """The non-public things a module of plugins/ or export/ imports."""
    own = "wfcore.export" if module.startswith("wfcore.export") else "wfcore.plugins"
    bad = [str(u) for u in file_uses(module, path) if not is_public(u, own)]
    return sorted({b for b in bad if (module, b) not in PRIVATE_ALLOWED})


def test_the_module_list_covers_every_source_folder():
    assert {"wfcore.run.pipeline", "wfcore.plugins.woodfisher", "wfcore.export.onnx",
            "wfcore.export"} <= set(MODULES)
    assert all(m.startswith("wfcore") for m in MODULES)


def test_no_import_cycle_in_the_package():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH) or [])}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if m.startswith(("wfcore.plugins", "wfcore.export"))))
def test_plugins_and_export_import_only_the_public_api(module):
    bad = outside_the_api(module, MODULES[module])
    assert not bad, (f"{MODULES[module].relative_to(ROOT)} imports what wfcore.__all__ does "
                     f"not name: {', '.join(bad)}")


def test_tools_import_the_run_machinery_never_the_reverse():
    assert TOOLS <= set(MODULES)
    assert not reverse_imports(GRAPH, TOOLS), \
        f"a core module imports a CLI tool: {reverse_imports(GRAPH, TOOLS)}"


def test_the_core_imports_no_plugin():
    assert not core_imports_of_components(GRAPH), \
        f"a core module imports a plugin: {core_imports_of_components(GRAPH)}"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_only_public_names(path):
    found = set(private_uses(path.read_text()))
    new = found - BENCHMARK_PRIVATE.get(path.name, set())
    assert not new, (f"benchmarks/{path.name} imports what wfcore.__all__ does not name: "
                     f"{sorted(new)}; import public names (see wfcore/__init__.py)")


# -- each check can fail -----------------------------------------------------------------
def test_the_cycle_check_finds_a_cycle_through_any_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = dict(GRAPH, **{"wfcore.errors": GRAPH["wfcore.errors"] | {"wfcore.run.pipeline"}})
    assert find_cycle(graph) is not None  # errors <- ... <- pipeline


def test_the_import_walk_sees_every_form_of_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nimport wfcore.run.runner\n"
                    "if TYPE_CHECKING:\n    from wfcore.run import pipeline\n"
                    "def f():\n    from wfcore.run.prepare import build_model\n"
                    "    from . import onnx\n    from .checks import zeros\n")
    found = {depends_on(u, MODULES) for u in file_uses("wfcore.export.m", path)}
    assert found == {"wfcore.run.runner", "wfcore.run.pipeline", "wfcore.run.prepare",
                     "wfcore.export.onnx", "wfcore.export.checks"}
    lazy = {depends_on(u, MODULES) for u in file_uses(
        "wfcore.plugins.m", _write(tmp_path, "from wfcore import ParamLayout, hookimpl\n"))}
    assert lazy == {"wfcore.fisher.gradients", "wfcore"}  # a public name: the module defining it


def _write(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "n.py"
    path.write_text(code)
    return path


def test_the_public_api_check_catches_a_private_import(tmp_path):
    code = ("import wfcore\nfrom wfcore import hookimpl, ParamLayout, progress\n"
            "from wfcore.masks import to_groups\nfrom wfcore.plugins.models import BasicBlock\n"
            "def f():\n    from wfcore.fisher.plan import available_memory\n"
            "    return wfcore.manager, wfcore.testing\n")
    assert outside_the_api("wfcore.plugins.m", _write(tmp_path, code)) == \
        ["from wfcore.fisher.plan import available_memory", "wfcore.manager"]
    assert private_uses("from ..run.saved import rebuild\n", "wfcore.export") == \
        ["from wfcore.run.saved import rebuild"]


def test_the_tool_check_catches_a_core_module_importing_a_tool():
    runner = "wfcore.run.runner"
    graph = dict(GRAPH, **{runner: GRAPH[runner] | {"wfcore.tools.sweep"}})
    assert reverse_imports(graph, TOOLS) == ["wfcore.run.runner -> wfcore.tools.sweep"]


def test_the_component_check_catches_a_core_module_importing_a_plugin():
    pipeline = "wfcore.run.pipeline"
    graph = dict(GRAPH, **{pipeline: GRAPH[pipeline] | {"wfcore.plugins.kfac"}})
    assert core_imports_of_components(graph) == ["wfcore.run.pipeline -> wfcore.plugins.kfac"]
