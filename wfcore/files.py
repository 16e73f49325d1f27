"""Atomic file writes: a temporary file in the same directory, then a rename.

A reader (or a crash) never sees a half-written report or checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from wfcore.errors import WfcoreError, first_line


class WriteError(WfcoreError):
    """A file could not be written (disk full, no permission); what it held is kept."""


def temporary_name(path: str | Path, suffix: str) -> Path:
    """A hidden name beside ``path`` that no other process uses: its pid and a random part
    (``.NAME.<pid>-<random><suffix>``)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextmanager
def temporary(path: str | Path, suffix: str) -> Iterator[Path]:
    """``temporary_name(path, suffix)``, removed on leaving unless renamed meanwhile."""
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _atomic(path: str | Path, write) -> Path:
    """Write through ``write(file)``; an OSError (disk full, no permission) is a one-line
    error naming the file, and whatever ``path`` held before stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or first_line(exc)}") \
                from None
        raise
    return path


def check_writable(path: str | Path, what: str) -> None:
    """Refuse early a file that ``write_*`` could not write: a directory, or a place under
    a file or in a directory that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise WfcoreError(f"{what}: {path} is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WfcoreError(f"{what}: cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WfcoreError(f"{what}: cannot write {path}: {parent} is not writable")


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | Path, obj: Any) -> Path:
    buffer = io.BytesIO()  # serialised first: a full disk is then an OSError of write()
    torch.save(obj, buffer)
    return _atomic(path, lambda f: f.write(buffer.getbuffer()))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)
