"""Models, data sets and plugins from files, without a plugin package.

- ``model.name`` / ``data.name`` may name a factory by an import spec:
  ``path/to/file.py:function`` (the file resolved against the config's folder, then the
  current directory) or ``package.module:function`` (imported with the config's folder and
  the current directory searched first). The function is called with the arguments its
  signature takes: a model factory may take ``num_classes``, ``input_shape`` and ``seed``,
  a data factory ``root`` and ``seed``; each other parameter is a ``model.options`` /
  ``data.options`` key, with the signature's default as its default. A model factory
  returns an ``nn.Module``; a data factory a ``DataBundle`` or ``(train, test)`` data sets.
- ``plugins:`` entries (module names or ``.py`` files) resolve the same way.
- ``model.checkpoint`` holds a state_dict, or a whole pickled module when
  ``model.trust_checkpoint`` says so (``load_checkpoint``).

A spec becomes a ``manager.Registered`` entry, so everything downstream (option
validation, provenance, the dense-model cache key) treats it like a registered component;
its "plugin" label names the file and a hash of its contents, so an edited file trains a
new dense model instead of reusing the cached one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from torch import nn

from wfcore.errors import ConfigError, PluginError, WfcoreError, first_line
from wfcore.interfaces import declare_options
from wfcore.run import states

log = logging.getLogger(__name__)

# The arguments a factory may take that are not options, per kind.
RESERVED = {"models": ("num_classes", "input_shape", "seed"), "datasets": ("root", "seed")}
_SPEC = re.compile(r"^(?P<target>[^:]+\.py|[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)$")


def is_spec(name: str) -> bool:
    """Whether ``name`` reads as ``path/to/file.py:function`` or ``package.module:function``."""
    return bool(_SPEC.match(name))


def search_dirs(base_dir: str | None) -> list[Path]:
    """Where relative paths and modules are looked for: the config's folder, then the
    current directory (once each)."""
    dirs = [Path(base_dir).expanduser()] if base_dir else []
    cwd = Path.cwd()
    return [*dirs, cwd] if all(d.resolve() != cwd.resolve() for d in dirs) else dirs


def resolve_path(path: str, base_dir: str | None, key: str) -> Path:
    """``path`` if absolute, else the first of the ``search_dirs`` that holds it; a
    one-line error naming where it looked."""
    given = Path(path).expanduser()
    if given.is_absolute():
        if not given.is_file():
            raise ConfigError(f"{key}: file not found: {given}")
        return given
    looked = [d / given for d in search_dirs(base_dir)]
    for candidate in looked:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{key}: file not found: {path} (looked in "
                      f"{', '.join(str(c.parent) for c in looked)})")


@contextmanager
def searched(base_dir: str | None) -> Iterator[list[Path]]:
    """``sys.path`` with the ``search_dirs`` in front while importing."""
    dirs = search_dirs(base_dir)
    added = [str(d) for d in dirs if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        yield dirs
    finally:
        for d in added:
            sys.path.remove(d)


def file_module(path: Path, key: str) -> ModuleType:
    """The module of the Python file ``path``, imported once per path and contents (under
    a name made from both, so that two files called models.py do not collide)."""
    digest = hashlib.sha256(str(path).encode() + path.read_bytes()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"wfcore_file_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # (a .py file always has both)
        raise PluginError(f"{key}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its dataclasses and pickles need it
    try:
        with searched(str(path.parent)):
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(f"{key}: {path} failed on import: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    return module


class ModuleMissing(PluginError):
    """The module of a ``package.module:function`` spec does not exist (a registered name
    mistyped, more likely than a factory)."""


def import_module(module_name: str, base_dir: str | None, key: str,
                  what: str = "module") -> ModuleType:
    """``module_name`` imported with the config's folder and the current directory searched
    first; the error says where it looked."""
    with searched(base_dir) as dirs:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name and module_name.split(".")[0] == exc.name.split(".")[0]
            where = ", ".join(map(str, dirs))
            raise (ModuleMissing if missing else PluginError)(
                f"{key}: cannot import {what} '{module_name}': {first_line(exc)} (looked in "
                f"{where}, then the installed packages)") from None
        except ImportError as exc:
            where = ", ".join(map(str, dirs))
            raise PluginError(f"{key}: cannot import {what} '{module_name}': "
                              f"{first_line(exc)} (looked in {where}, then the installed "
                              "packages)") from None
        except Exception as exc:
            raise PluginError(f"{key}: {what} '{module_name}' failed on import: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None


def plugin_module(entry: str, base_dir: str | None) -> tuple[str, ModuleType]:
    """A ``plugins:`` entry: a module name or a ``.py`` file; (its name, the module)."""
    key = "config key 'plugins'"
    if entry.endswith(".py"):
        module = file_module(resolve_path(entry, base_dir, key), key)
        return entry, module
    return entry, import_module(entry, base_dir, key, "plugin module")


def load_function(spec: str, base_dir: str | None, key: str) -> tuple[Callable[..., Any], str]:
    """The function a spec names, and a label for it: the file (or module) and a hash of
    its source, which the dense-model cache key includes."""
    match = _SPEC.match(spec)
    if match is None:
        raise ConfigError(f"{key}: '{spec}' is not of the form path/to/file.py:function or "
                          "package.module:function")
    target, function = match.group("target"), match.group("function")
    if target.endswith(".py"):
        path = resolve_path(target, base_dir, key)
        module = file_module(path, key)
        source = path.read_bytes()
        where = str(path)
    else:
        module = import_module(target, base_dir, key)
        where = target
        try:
            source = inspect.getsource(module).encode()
        except (OSError, TypeError):
            source = b""
    fn = getattr(module, function, None)
    if not callable(fn):
        shown = sorted(n for n, v in vars(module).items()
                       if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(f"{key}: {where} has no function '{function}'; its functions: "
                          f"{', '.join(shown) or 'none'}")
    return fn, f"{where} ({hashlib.sha256(source).hexdigest()[:12]})"


def _option_type(annotation: Any, default: Any) -> Any:
    """The type OmegaConf validates an option with: a plain annotation, else that of its
    default, else Any."""
    plain = (int, float, str, bool)
    if annotation in plain or typing.get_origin(annotation) in (list, dict):
        return annotation
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in plain:
            return Optional[args[0]]
    if type(default) in plain:
        return type(default)
    return Any


def options_class(fn: Callable[..., Any], reserved: tuple[str, ...], spec: str) -> type | None:
    """A dataclass of ``fn``'s option parameters (all but ``reserved``): required where the
    signature has no default. Parameters whose default a config cannot hold (an object)
    are left to that default. None when it takes no options."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: validate by defaults only
        hints = {}
    fields: list[tuple[Any, ...]] = []  # (name, type[, field]), as make_dataclass takes
    for p in inspect.signature(fn).parameters.values():
        if p.name in reserved or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default
        if default is p.empty:
            fields.append((p.name, _option_type(hints.get(p.name), None)))
        elif default is None or isinstance(default, (int, float, str, bool)):
            fields.append((p.name, _option_type(hints.get(p.name), default),
                           dataclasses.field(default=default)))
        elif isinstance(default, (list, tuple, dict)):
            value = list(default) if isinstance(default, tuple) else default
            fields.append((p.name, Any, dataclasses.field(default_factory=_returns(value))))
    if not fields:
        return None
    # required fields first, as dataclasses need
    fields.sort(key=lambda f: len(f) == 3)
    name = re.sub(r"\W", "_", spec) + "_options"
    return dataclasses.make_dataclass(name, fields)


def _returns(value: Any) -> Callable[[], Any]:
    """A default factory that gives ``value``."""
    return lambda: value


def call(fn: Callable[..., Any], available: dict[str, Any], options: Any) -> Any:
    """``fn`` called with the ``available`` arguments its signature takes and the options."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in available.items() if k in params}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        kwargs.update(dataclasses.asdict(options))
    return fn(**kwargs)


def model_factory(fn: Callable[..., Any], spec: str) -> Callable[..., nn.Module]:
    """A registered-model factory around the user's function."""

    def factory(options: Any, num_classes: int, input_shape: tuple[int, ...],
                seed: int = 0) -> nn.Module:
        model = call(fn, {"num_classes": num_classes, "input_shape": tuple(input_shape),
                          "seed": seed}, options)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name={spec} returned a {type(model).__name__}, not an "
                              "nn.Module")
        return model

    declare_options(factory, options_class(fn, RESERVED["models"], spec))
    return factory


def data_factory(fn: Callable[..., Any], spec: str) -> Callable[..., Any]:
    """A registered-data-set factory around the user's function (``root``: data.root)."""
    from wfcore.inmemory import as_bundle

    def factory(options: Any, data: Any, seed: int = 0) -> Any:
        root = str(Path(data.root).expanduser()) if data.root else None
        made = call(fn, {"root": root, "seed": seed}, options)
        return as_bundle(made, key=f"data.name={spec}")

    declare_options(factory, options_class(fn, RESERVED["datasets"], spec))
    return factory


def entry(kind: str, spec: str, key: str, base_dir: str | None) -> tuple[Any, str]:
    """(factory, plugin label) of a spec for models or datasets: what the registry
    (``wfcore.manager``) registers it as."""
    if kind not in RESERVED:
        raise ConfigError(f"{key}: '{spec}' is no registered {kind[:-1]}; file specs "
                          "(file.py:function) name models and data sets only (see `wfcore "
                          "plugins` for what is registered)")
    fn, label = load_function(spec, base_dir, key)
    factory = model_factory(fn, spec) if kind == "models" else data_factory(fn, spec)
    return factory, label


# -- model.checkpoint ------------------------------------------------------------------
def checkpoint_path(checkpoint: str, base_dir: str | None) -> Path:
    """``model.checkpoint`` resolved like the file specs (config folder, then here)."""
    return resolve_path(checkpoint, base_dir, "model.checkpoint")


def load_checkpoint(model: nn.Module, path: Path, trust: bool) -> None:
    """Load ``model.checkpoint`` into ``model``: a state_dict (read with weights_only=True),
    or, with ``trust``, a whole pickled module (weights_only=False: unpickling runs code the
    file names) whose state_dict is loaded. One-line errors otherwise."""
    what = "model.checkpoint"
    try:
        state = states.read_torch(path, what)
    except WfcoreError as exc:
        if "objects other than tensors" not in str(exc):
            raise
        if not trust:
            raise WfcoreError(f"{exc}; a whole module saved with torch.save(model) loads "
                              "with model.trust_checkpoint=true (unpickling runs code from "
                              "the file: only for files you trust)") from None
        state = states.read_module(path, what)
        if isinstance(state, nn.Module):
            state = state.state_dict()
    state = states.check_state_dict(state, what, path)
    states.check_matches(model, state, what, path)
    states.check_finite(state, what, path)
    model.load_state_dict(state)
