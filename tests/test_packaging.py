"""The wheel holds the whole package: every module of wfcore/, plugins/ and export/ (so
pyproject's package list names every subpackage), the ``wfcore`` command, and an entry point
in the ``wfcore`` group for every built-in plugin module.

The wheel is built offline from a copy of the sources, with this environment's build
backend (setuptools, which torch requires, builds wheels itself from 70.1 on).
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from import_graph import ROOT, SOURCES, module_files


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of the project at ``source`` into ``out``: offline, no dependencies."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", "-w", str(out), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = out.glob("wfcore-*.whl")
    return wheel


def copy_sources(dest: Path) -> Path:
    """What the build reads, copied: pyproject.toml, the README and the source folders."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for folder in SOURCES.values():
        shutil.copytree(folder, dest / folder.name, ignore=ignore)
    return dest


def wheel_path(module: str, path: Path) -> str:
    """Where the file of ``module`` lies in the wheel."""
    return module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")


def entry_points(wheel: zipfile.ZipFile) -> configparser.ConfigParser:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the case of names
    parser.read_string(wheel.read(name).decode())
    return parser


def plugin_modules() -> set[str]:
    """The modules of plugins/ and export/ with hook implementations (built-in plugins)."""
    found = set()
    for module, path in module_files().items():
        if not module.startswith(("wfcore.plugins", "wfcore.export")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).endswith("hookimpl") for d in node.decorator_list):
                found.add(module)
    return found


def missing_modules(wheel: zipfile.ZipFile) -> list[str]:
    """The files of modules of the sources that the wheel lacks."""
    names = set(wheel.namelist())
    return sorted(wheel_path(m, p) for m, p in module_files().items()
                  if wheel_path(m, p) not in names)


def undeclared_plugins(wheel: zipfile.ZipFile) -> set[str]:
    """Built-in plugin modules without an entry point in the ``wfcore`` group."""
    return plugin_modules() - set(entry_points(wheel)["wfcore"].values())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    source = copy_sources(tmp_path_factory.mktemp("source"))
    return zipfile.ZipFile(build_wheel(source, tmp_path_factory.mktemp("wheel")))


def test_the_wheel_holds_every_module_of_every_package(wheel):
    assert not missing_modules(wheel), \
        f"not in the wheel (pyproject.toml [tool.setuptools]): {missing_modules(wheel)}"


def test_the_wheel_declares_the_command_and_every_built_in_plugin(wheel):
    points = entry_points(wheel)
    assert dict(points["console_scripts"]) == {"wfcore": "wfcore.cli:main"}
    assert not undeclared_plugins(wheel), \
        f"built-in plugins without an entry point: {sorted(undeclared_plugins(wheel))}"
    names = set(wheel.namelist())
    missing = sorted(m for m in points["wfcore"].values()  # a module, or a package
                     if f"{m.replace('.', '/')}.py" not in names
                     and f"{m.replace('.', '/')}/__init__.py" not in names)
    assert not missing, f"entry points of modules not in the wheel: {missing}"


def test_the_checks_catch_a_package_and_an_entry_point_left_out(tmp_path):
    """A pyproject that forgets a subpackage and a plugin's entry point builds a wheel the
    checks above refuse."""
    (tmp_path / "source").mkdir()
    source = copy_sources(tmp_path / "source")
    text = (source / "pyproject.toml").read_text()
    text = text.replace(', "wfcore.export"]', "]").replace('kfac = "wfcore.plugins.kfac"\n', "")
    (source / "pyproject.toml").write_text(text)
    wheel = zipfile.ZipFile(build_wheel(source, tmp_path / "out"))
    assert "wfcore/export/onnx.py" in missing_modules(wheel)
    assert "wfcore/plugins/kfac.py" not in missing_modules(wheel)
    assert undeclared_plugins(wheel) == {"wfcore.plugins.kfac"}
