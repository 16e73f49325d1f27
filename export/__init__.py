"""Sparse ONNX export, checks and CPU benchmarks (import name wfcore.export).

``wfcore.export`` is also the API function ``wfcore.export(model, path, example_input)``
(``wfcore.api.export``): importing this package sets the attribute ``export`` of the
``wfcore`` package to the package itself, so the package is made callable, and calling it
calls the function. ``from wfcore import export`` is then the same callable either way.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from wfcore.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
