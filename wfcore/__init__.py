"""wfcore: second-order pruning of PyTorch models (WoodFisher, OBS) with sparse ONNX export."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("wfcore")
"""Marker for plugin hook implementations: ``@wfcore.hookimpl``."""

__all__ = ["hookimpl", "__version__"]
