"""Reading state_dict files with errors that name the file and what is wrong with it.

Every state_dict the pipeline reads (``model.checkpoint``, the dense-model cache, a
run's ``dense.pt`` and ``model_step<N>.pt``) goes through ``load_state``: an empty,
truncated or foreign file is "not a valid state_dict", a state_dict of another
architecture names its first missing, unexpected or misshapen keys, and a NaN or inf
weight names its parameter. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wfcore import files
from wfcore.errors import WfcoreError, first_line

log = logging.getLogger(__name__)

SHOWN = 3  # keys named per kind of mismatch


def read_torch(path: Path, what: str, kind: str = "state_dict") -> Any:
    """``files.load_torch(path)``; a missing, empty or unreadable file is a one-line error."""
    if not path.is_file():
        raise WfcoreError(f"{what}: file not found: {path}")
    if path.stat().st_size == 0:
        raise WfcoreError(f"{what}: {path} is not a valid {kind}: the file is empty")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise WfcoreError(f"{what}: cannot read {path}: {exc.strerror or first_line(exc)}") \
            from None
    try:
        return files.load_torch(path)
    except Exception as exc:  # truncated ("[Errno 22]"), garbage, or what weights_only refuses
        reason = "it holds objects other than tensors and plain containers" \
            if "weights_only" in str(exc) else "the file is truncated or not a torch file"
        raise WfcoreError(f"{what}: {path} is not a valid {kind}: {reason}") from None


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_state_dict(state: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    """``state`` as a state_dict: a mapping of names to tensors."""
    if not isinstance(state, Mapping) or not state:
        raise WfcoreError(f"{what}: {path} is not a valid state_dict: it holds a "
                          f"{type(state).__name__}{' (empty)' if not state else ''}, not "
                          "parameter names and tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WfcoreError(f"{what}: {path} is not a valid state_dict: not a tensor: "
                          f"{_shown(bad)}")
    return dict(state)


def check_finite(state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    """Every floating-point tensor of ``state`` finite; else name the first that is not."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise WfcoreError(f"{what}: {path}: parameter '{name}' has {count} NaN or inf "
                              "value(s); this model cannot be pruned or resumed from it")


def check_matches(model: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                  path: Path) -> None:
    """``state`` has exactly the model's keys and shapes; else name the first that differ."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {_shown(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                if keys]
    if problems:
        raise WfcoreError(f"{what}: {path} does not fit {type(model).__name__}; "
                          + "; ".join(problems))


def load_state(model: nn.Module, path: str | Path, what: str) -> None:
    """Load the state_dict file ``path`` into ``model``; one-line errors name ``what``."""
    path = Path(path)
    state = check_state_dict(read_torch(path, what), what, path)
    from wfcore.run.structured_run import fit_architecture
    fit_architecture(model, state, what)  # a shrunk model's state: its architecture first
    check_matches(model, state, what, path)
    check_finite(state, what, path)
    model.load_state_dict(state)


def read_module(path: Path, what: str) -> Any:
    """A trusted pickle (``torch.load(weights_only=False)``), its failure in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a class that cannot be found, a truncated file
        raise WfcoreError(f"{what}: cannot unpickle {path}: {type(exc).__name__}: "
                          f"{first_line(exc)} (the classes it holds must be importable)") \
            from None


def save_module(obj: Any, path: Path) -> bool:
    """Pickle ``obj`` to ``path`` atomically; False (and a warning) when it cannot be."""
    try:
        files.save_torch(path, obj)
    except (TypeError, AttributeError, RuntimeError, ValueError) as exc:  # pickling errors
        log.warning("%s not written: %s cannot be pickled (%s)", path.name,
                    type(obj).__name__, first_line(exc))
        return False
    except Exception as exc:  # pickle.PicklingError and the like
        log.warning("%s not written: %s", path.name, first_line(exc))
        return False
    return True
