"""What a source file takes from wfcore, read with ast, and whether it is public.

Every import counts, wherever it stands: at module level, inside a function, under
``if TYPE_CHECKING:``. The public surface is what ``wfcore.__all__`` names and the public
submodules ``wfcore._MODULES`` names (every name in them public). tests/test_architecture.py
checks the layering with it, tests/test_public_surface.py the docs.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import wfcore

ROOT = Path(__file__).parents[1]
# import name of a package -> its source folder (pyproject: [tool.setuptools] package-dir)
SOURCES = {"wfcore": ROOT / "wfcore", "wfcore.plugins": ROOT / "plugins",
           "wfcore.export": ROOT / "export"}
PUBLIC_MODULES = frozenset(f"wfcore.{m}" for m in wfcore._MODULES)


def module_files() -> dict[str, Path]:
    """{module name: file} of every module of the wfcore package, subpackages included."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "moved(__name__," in path.read_text():  # an old path kept for a release
                continue  # (wfcore.errors.moved): an alias of a module listed under its new name
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def package_of(module: str, path: Path) -> str:
    """The package that relative imports in ``path`` (module ``module``) start from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


@dataclass(frozen=True)
class Use:
    """One thing taken from wfcore: ``from module import name``, ``import module`` (name
    None), or the attribute ``wfcore.name`` of an imported ``wfcore`` (module "wfcore")."""

    module: str
    name: str | None
    line: int
    attribute: bool = False

    def __str__(self) -> str:
        if self.attribute:
            return f"wfcore.{self.name}"
        if self.name is None:
            return f"import {self.module}"
        return f"from {self.module} import {self.name}"


def _is_wfcore(module: str) -> bool:
    return module == "wfcore" or module.startswith("wfcore.")


def uses(code: str, package: str = "") -> Iterator[Use]:
    """What ``code`` takes from wfcore; ``package`` resolves its relative imports."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if _is_wfcore(module):
                yield from (Use(module, a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (Use(a.name, None, node.lineno) for a in node.names
                        if _is_wfcore(a.name))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "wfcore":
            yield Use("wfcore", node.attr, node.lineno, attribute=True)


def file_uses(module: str, path: Path) -> list[Use]:
    return list(uses(path.read_text(), package_of(module, path)))


def depends_on(use: Use, modules: Collection[str]) -> str:
    """The module a use makes its file depend on: ``module.name`` when that is a module,
    the module that defines a public name of ``wfcore`` (they load on first use), else
    ``module`` itself (not its parent packages, whose ``__init__`` imports nothing of
    wfcore at import time)."""
    if use.name and f"{use.module}.{use.name}" in modules:
        return f"{use.module}.{use.name}"
    if use.module == "wfcore" and use.name in wfcore._LAZY:
        return wfcore._LAZY[use.name]
    return use.module


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    """{module: the modules of ``files`` it imports}. ``wfcore`` itself (its
    ``__init__``) stands for the lazy public names, each of which counts as an import of
    the module that defines it."""
    graph = {}
    for module, path in files.items():
        if module == "wfcore":
            continue
        found = {depends_on(u, files) for u in file_uses(module, path)}
        graph[module] = (found & set(files)) - {module, "wfcore"}
    return graph


def find_cycle(graph: Mapping[str, Collection[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def is_public(use: Use, own: str | None = None) -> bool:
    """Whether ``use`` takes only public names; ``own``: the package of the file, whose
    own modules it may import too."""
    if own and (use.module == own or use.module.startswith(f"{own}.")):
        return True
    if use.module == "wfcore":
        return use.name is None or use.name in wfcore.__all__
    return any(use.module == m or use.module.startswith(f"{m}.") for m in PUBLIC_MODULES)


def private_uses(code: str, package: str = "", own: str | None = None) -> list[str]:
    """What ``code`` takes from wfcore that is not public, in order of appearance."""
    found = sorted((u for u in uses(code, package) if not is_public(u, own)),
                   key=lambda u: u.line)
    return list(dict.fromkeys(str(u) for u in found))
