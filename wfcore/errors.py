"""User-facing errors: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class WfcoreError(Exception):
    """An error caused by the user's input (config, files, plugins), not by a bug."""


class ConfigError(WfcoreError):
    """A config key is unknown, or its value is invalid."""


class PluginError(WfcoreError):
    """A plugin failed to load, or two plugins clash."""


class WfcoreDeprecationWarning(FutureWarning):
    """A wfcore API that goes in the next release; the message names its replacement.

    A FutureWarning, so Python shows it by default (once per place that uses the API).
    """


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type's name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def moved(old: str, new: str) -> None:
    """Make the module ``old`` the module ``new`` (an import path kept for one release),
    with a WfcoreDeprecationWarning naming the new path at the importer's line."""
    import importlib
    import sys
    import warnings

    warnings.warn(f"{old} moved to {new}: import it from there (the old path goes in the "
                  "next release)", WfcoreDeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
