"""The plugin manager: built-in, entry-point and config plugins through one path.

Every plugin, the built-in ones included, is a module with ``@wfcore.hookimpl``
functions. Built-ins are declared in this package's own ``wfcore`` entry-point group and
load exactly like third-party packages; a config may name extra modules in ``plugins:``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload

import pluggy
from omegaconf import DictConfig, OmegaConf

from wfcore import config, factories, hookspecs, specs
from wfcore.errors import ConfigError, PluginError, WfcoreError, first_line

if TYPE_CHECKING:
    from torch import nn

    from wfcore.interfaces import (
        Allocator,
        DataBundle,
        Exporter,
        HessianEstimator,
        Scheduler,
        Scorer,
    )

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wfcore"
DISABLE_ENV = "WFCORE_DISABLE"  # comma-separated plugin or distribution names not to load
KINDS = ("estimators", "scorers", "allocators", "schedulers", "exporters", "models", "datasets",
         "hooks")
SINGULAR = {kind: kind[:-1] for kind in KINDS}


@dataclass
class Registered:
    """One registered component: its factory and the plugin that registered it."""

    name: str
    factory: Any
    plugin: str

    @property
    def options_class(self) -> type | None:
        """The factory's ``Options``; for ``wfcore_hooks`` the registered dataclass itself."""
        if isinstance(self.factory, type) and dataclasses.is_dataclass(self.factory):
            return self.factory
        return getattr(self.factory, "Options", None)


@dataclass
class Registry:
    """The components of one kind, by name. Registering a name twice is an error."""

    kind: str
    entries: dict[str, Registered] = field(default_factory=dict)
    base_dir: str | None = None  # where file specs (path/to/file.py:function) resolve first

    def add(self, name: str, factory: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registers a {SINGULAR[self.kind]} with no name")
        if name in self.entries:
            other = self.entries[name].plugin
            raise PluginError(
                f"{SINGULAR[self.kind]} '{name}' is registered by two plugins: "
                f"'{other}' and '{plugin}'; disable one with --disable NAME (or "
                f"${DISABLE_ENV}=NAME)"
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
        spec = ""
        if specs.is_spec(name):  # a factory of the user's own: file.py:function
            try:
                return Registered(name, *specs.entry(self.kind, name, key, self.base_dir)), {}
            except specs.ModuleMissing:  # more likely a registered name mistyped
                spec = ", nor an importable module:function"
        shown = ", ".join(n + "<name>" if n.endswith(":") else n for n in self.names())
        raise ConfigError(
            f"{key}: unknown {SINGULAR[self.kind]} '{name}'{did_you_mean(name, self.names())}"
            f"{spec}; registered: {shown or 'none'}"
        )


def accepts_seed(factory: Any) -> bool:
    """Whether ``factory`` takes a ``seed`` keyword: a ``seed`` parameter, or ``**kwargs``."""
    return factories.declares(factory, "seed")


@dataclass(frozen=True)
class Section:
    """A config section that names a component: the name, its option values, and the
    config keys an error names (``key``: where the values are; ``name_key``: the name)."""

    name: str
    values: dict[str, Any]
    key: str
    name_key: str

    @classmethod
    def of(cls, section: Mapping[str, Any], key: str, name_key: str | None = None) -> Section:
        """``{name: ..., **options}`` (a component section: ``estimator``, ``export``)."""
        values = {k: v for k, v in to_plain(section).items() if k != "name"}
        return cls(section["name"], values, key, name_key or f"{key}.name")

    @classmethod
    def nested(cls, section: Mapping[str, Any], key: str) -> Section:
        """``{name: ..., options: {...}, ...}`` (``model``, ``data``)."""
        return cls(section["name"], to_plain(section.get("options") or {}), f"{key}.options",
                   f"{key}.name")


def to_plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config section (DictConfig or dict) as a plain dict, interpolations resolved."""
    if isinstance(values, DictConfig):
        return dict(OmegaConf.to_container(values, resolve=True))  # type: ignore[arg-type]
    return dict(values)


@dataclass(frozen=True)
class Chosen:
    """A component chosen by a config section, its options validated: built by
    ``build`` (again for each fit, where a caller needs fresh ones)."""

    kind: str
    entry: Registered
    options: Any  # the Options instance, or {} when the factory takes none
    section: Section
    extra: dict[str, Any] = field(default_factory=dict)  # target= of a prefix name

    def build(self, **arguments: Any) -> Any:
        """The factory called as its kind declares (``wfcore.factories``); an exception
        other than a WfcoreError is the plugin's failure, one line naming the key."""
        args, kwargs = factories.arguments(self.kind, self.entry.factory,
                                           {**arguments, **self.extra})
        try:
            return self.entry.factory(self.options, *args, **kwargs)
        except WfcoreError:
            raise
        except Exception as exc:
            raise PluginError(f"{self.section.name_key}: plugin '{self.entry.plugin}' failed to "
                              f"build '{self.section.name}': {type(exc).__name__}: "
                              f"{first_line(exc)}") from None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class PluginInfo:
    """Where a plugin came from and what it registers, for ``wfcore plugins``."""

    name: str
    source: str  # built-in | entry point (<dist>) | config | inline
    version: str = ""  # of the distribution that ships it ("" when unknown)
    registers: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)  # the wfcore_* hooks it implements
    unmarked: list[str] = field(default_factory=list)  # wfcore_* functions without @hookimpl


class Plugins:
    """The loaded plugin manager with one registry per kind.

    ``strict``: two plugins registering one name is an error (a run); otherwise the first
    keeps the name and the clash is listed in ``clashes`` (``wfcore plugins``).
    """

    def __init__(self, pm: pluggy.PluginManager, sources: dict[str, tuple[str, str]],
                 strict: bool = True, base_dir: str | None = None):
        self.pm = pm
        self.hook = pm.hook
        self.strict = strict
        self.clashes: list[str] = []
        self.registries: dict[str, Registry] = {kind: Registry(kind, base_dir=base_dir)
                                                for kind in KINDS}
        self.info: dict[str, PluginInfo] = {}
        for plugin_name, (source, version) in sources.items():
            plugin = pm.get_plugin(plugin_name)
            info = PluginInfo(plugin_name, source, version)
            info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
            info.unmarked = unmarked_hooks(plugin)
            for function in info.unmarked:
                log.warning("plugin '%s': function %s looks like a hook but has no "
                            "@wfcore.hookimpl; it is ignored", plugin_name, function)
            self.info[plugin_name] = info
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
                    try:
                        self.registries[kind].add(name, factory, plugin_name)
                    except PluginError as exc:
                        if self.strict:
                            raise
                        self.clashes.append(str(exc))
                        continue
                    info = self.info.setdefault(plugin_name, PluginInfo(plugin_name, "unknown"))
                    info.registers.setdefault(kind, []).append(name)

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def choose(self, kind: str, section: Section) -> Chosen:
        """The component ``section`` names (looked up by name), its options validated
        against the factory's ``Options`` (and ``validate()``); errors name the keys."""
        entry, extra = self.registry(kind).lookup(section.name, section.name_key)
        try:
            options = config.validate_options(section.key, section.values, entry.options_class)
        except ConfigError as exc:  # the key is named; say whose options they are
            raise ConfigError(f"{exc} ({SINGULAR[kind]} '{section.name}' of plugin "
                              f"'{entry.plugin}')") from None
        return Chosen(kind, entry, options, section, extra)

    @overload
    def create(self, kind: Literal["estimators"], section: Section,
               **arguments: Any) -> HessianEstimator: ...
    @overload
    def create(self, kind: Literal["scorers"], section: Section, **arguments: Any) -> Scorer: ...
    @overload
    def create(self, kind: Literal["allocators"], section: Section,
               **arguments: Any) -> Allocator: ...
    @overload
    def create(self, kind: Literal["schedulers"], section: Section,
               **arguments: Any) -> Scheduler: ...
    @overload
    def create(self, kind: Literal["exporters"], section: Section,
               **arguments: Any) -> Exporter: ...
    @overload
    def create(self, kind: Literal["models"], section: Section, **arguments: Any) -> nn.Module: ...
    @overload
    def create(self, kind: Literal["datasets"], section: Section,
               **arguments: Any) -> DataBundle: ...
    @overload
    def create(self, kind: str, section: Section, **arguments: Any) -> Any: ...

    def create(self, kind: str, section: Section, **arguments: Any) -> Any:
        """The one way a component is made: looked up by name, options validated, the
        factory called with the arguments it declares (``wfcore.factories``): ``seed``
        and the kind's own (``num_classes``, ``input_shape`` for a model; ``data`` for a
        data set). Every error is one line naming the config key and the plugin."""
        return self.choose(kind, section).build(**arguments)


def unmarked_hooks(plugin: object) -> list[str]:
    """Functions of a plugin named like a hook (``wfcore_*``) but not marked @hookimpl."""
    out = []
    for attr, value in inspect.getmembers(plugin, callable):
        if attr.startswith(f"{ENTRY_POINT_GROUP}_") and not hasattr(
                value, f"{ENTRY_POINT_GROUP}_impl"):
            if inspect.ismodule(plugin) and getattr(value, "__module__", None) != \
                    plugin.__name__:
                continue  # imported from elsewhere
            out.append(attr)
    return out


def disabled_names(disable: Iterable[str] = ()) -> set[str]:
    """Plugin (or distribution) names not to load: ``disable`` and $WFCORE_DISABLE."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return names | {n for n in disable if n}


def _module_version(module_name: str) -> str:
    """The version of the distribution that ships a module, or "" when unknown."""
    top = module_name.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


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
    *,
    disable: Iterable[str] = (),
    strict: bool = True,
    base_dir: str | None = None,
) -> Plugins:
    """Load every plugin: entry points of group ``wfcore``, then ``extra_modules`` (config
    ``plugins:``), then ``extra_plugins`` ((name, object) pairs, for tests and embedding).

    Plugins named in ``disable`` or in $WFCORE_DISABLE (by plugin name as ``wfcore plugins``
    shows it, or by distribution name) are not imported at all, like pytest's
    ``-p no:NAME``. ``strict=False`` lists clashes instead of failing (``wfcore plugins``).
    ``base_dir`` (the config's ``base_dir``): where ``extra_modules`` (module names or
    ``.py`` files) and file specs are looked for before the current directory and
    ``sys.path`` (``wfcore.specs``).
    """
    off = disabled_names(disable)
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, tuple[str, str]] = {}
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_order):
        dist = ep.dist.name if ep.dist is not None else "?"
        name = ep.name if dist == "wfcore" else f"{dist}:{ep.name}"
        if pm.has_plugin(name) or name in off or (dist != "wfcore" and dist in off):
            continue  # the same distribution seen twice on sys.path, or disabled
        module = _import(ep.value, f"entry point '{ep.name}' of '{dist}'")
        if pm.is_registered(module):
            continue
        _register(pm, module, name)
        version = ep.dist.version if ep.dist is not None else ""
        sources[name] = ("built-in" if dist == "wfcore" else f"entry point ({dist})", version)
    for module_name in extra_modules:
        if module_name in off:
            continue
        module_name, module = specs.plugin_module(module_name, base_dir)
        if pm.is_registered(module):
            continue
        _register(pm, module, module_name)
        sources[module_name] = ("config", _module_version(module_name))
    for name, plugin in extra_plugins:
        if name in off:
            continue
        _register(pm, plugin, name)
        sources[name] = ("inline", "")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"unknown hook: {_one_line(exc)}") from None
    return Plugins(pm, sources, strict=strict, base_dir=base_dir)


def _ep_order(ep: importlib.metadata.EntryPoint) -> tuple[int, str]:
    """Built-ins first, so that a third-party clash names the built-in as the first owner."""
    dist = ep.dist.name if ep.dist is not None else ""
    return (0 if dist == "wfcore" else 1, f"{dist}:{ep.name}")
