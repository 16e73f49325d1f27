"""The plugin manager: built-in, entry-point and config plugins through one path.

Every plugin, the built-in ones included, is a module with ``@wfcore.hookimpl``
functions. Built-ins are declared in this package's own ``wfcore`` entry-point group and
load exactly like third-party packages; a config may name extra modules in ``plugins:``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from wfcore import hookspecs
from wfcore.errors import ConfigError, PluginError, first_line

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wfcore"
KINDS = ("estimators", "scorers", "allocators", "schedulers", "exporters", "models", "datasets")
SINGULAR = {kind: kind[:-1] for kind in KINDS}


@dataclass
class Registered:
    """One registered component: its factory and the plugin that registered it."""

    name: str
    factory: Any
    plugin: str

    @property
    def options_class(self) -> type | None:
        return getattr(self.factory, "Options", None)


@dataclass
class Registry:
    """The components of one kind, by name. Registering a name twice is an error."""

    kind: str
    entries: dict[str, Registered] = field(default_factory=dict)

    def add(self, name: str, factory: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registers a {SINGULAR[self.kind]} with no name")
        if name in self.entries:
            other = self.entries[name].plugin
            raise PluginError(
                f"{SINGULAR[self.kind]} '{name}' is registered by two plugins: "
                f"'{other}' and '{plugin}'"
            )
        if not callable(factory):
            raise PluginError(
                f"plugin '{plugin}' registers {SINGULAR[self.kind]} '{name}' with a factory "
                f"that is not callable: {factory!r}"
            )
        self.entries[name] = Registered(name, factory, plugin)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def lookup(self, name: str, key: str) -> tuple[Registered, dict[str, Any]]:
        """The component for ``name`` and the extra factory arguments (prefix targets).

        ``key`` is the config key that named it, for the error message.
        """
        if name in self.entries:
            return self.entries[name], {}
        prefix, sep, target = name.partition(":")
        if sep and target and f"{prefix}:" in self.entries:
            return self.entries[f"{prefix}:"], {"target": target}
        shown = ", ".join(n + "<name>" if n.endswith(":") else n for n in self.names())
        raise ConfigError(
            f"{key}: unknown {SINGULAR[self.kind]} '{name}'; registered: {shown or 'none'}"
        )


@dataclass
class PluginInfo:
    """Where a plugin came from and what it registers, for ``wfcore plugins``."""

    name: str
    source: str  # built-in | entry point (<dist>) | config
    registers: dict[str, list[str]] = field(default_factory=dict)


class Plugins:
    """The loaded plugin manager with one registry per kind."""

    def __init__(self, pm: pluggy.PluginManager, sources: dict[str, str]):
        self.pm = pm
        self.hook = pm.hook
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        self.info: dict[str, PluginInfo] = {}
        for plugin_name, source in sources.items():
            self.info[plugin_name] = PluginInfo(plugin_name, source)
        self._collect()

    def _collect(self) -> None:
        for kind in KINDS:
            caller = getattr(self.pm.hook, f"wfcore_{kind}")
            # Registration order, so that a duplicate names the first owner first.
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                try:
                    result = impl.function()
                except Exception as exc:  # a plugin's own failure: name the plugin
                    raise PluginError(
                        f"plugin '{plugin_name}' failed in wfcore_{kind}: {exc}") from exc
                if not isinstance(result, dict):
                    raise PluginError(
                        f"plugin '{plugin_name}': wfcore_{kind} must return a dict "
                        f"{{name: factory}}, got {type(result).__name__}"
                    )
                for name, factory in result.items():
                    self.registries[kind].add(name, factory, plugin_name)
                    info = self.info.setdefault(plugin_name, PluginInfo(plugin_name, "unknown"))
                    info.registers.setdefault(kind, []).append(name)

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]


def _register(pm: pluggy.PluginManager, module: ModuleType | object, name: str) -> None:
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}' is invalid: {_one_line(exc)}") from None
    except ValueError as exc:  # already registered under another name, or name taken
        raise PluginError(f"plugin '{name}' could not be registered: {exc}") from None


def _one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _import(module_name: str, what: str) -> ModuleType:
    """Import a plugin module; any exception it raises (a SyntaxError too) is one line."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{what}: cannot import plugin module '{module_name}': "
                          f"{first_line(exc)}") from None
    except Exception as exc:  # the module's own code failed
        raise PluginError(f"{what}: plugin module '{module_name}' failed on import: "
                          f"{type(exc).__name__}: {first_line(exc)}") from None


def build(
    extra_modules: Iterable[str] = (),
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> Plugins:
    """Load every plugin: entry points of group ``wfcore``, then ``extra_modules`` (config
    ``plugins:``), then ``extra_plugins`` ((name, object) pairs, for tests and embedding).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_order):
        dist = ep.dist.name if ep.dist is not None else "?"
        name = ep.name if dist == "wfcore" else f"{dist}:{ep.name}"
        if pm.has_plugin(name):
            continue  # the same distribution seen twice on sys.path
        module = _import(ep.value, f"entry point '{ep.name}' of '{dist}'")
        if pm.is_registered(module):
            continue
        _register(pm, module, name)
        sources[name] = "built-in" if dist == "wfcore" else f"entry point ({dist})"
    for module_name in extra_modules:
        module = _import(module_name, "config key 'plugins'")
        if pm.is_registered(module):
            continue
        _register(pm, module, module_name)
        sources[module_name] = "config"
    for name, plugin in extra_plugins:
        _register(pm, plugin, name)
        sources[name] = "inline"
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"unknown hook: {_one_line(exc)}") from None
    return Plugins(pm, sources)


def _ep_order(ep: importlib.metadata.EntryPoint) -> tuple[int, str]:
    """Built-ins first, so that a third-party clash names the built-in as the first owner."""
    dist = ep.dist.name if ep.dist is not None else ""
    return (0 if dist == "wfcore" else 1, f"{dist}:{ep.name}")
