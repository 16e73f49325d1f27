"""The run directory: one run at a time in it, nothing replaced that a run did not write.

- A lock (``fcntl.flock`` on ``.wfcore.lock`` in the directory), held for the whole run:
  a second run into the same directory is refused at once, never interleaved.
- An ownership marker (``.wfcore-run``), written when a run claims the directory: a
  directory without one that holds a file a run would write (``config.yaml``, a report,
  a model) belongs to someone else and is refused, with or without ``--force``.
- ``--force`` removes exactly the files a run writes (``OWNED``), and only after the
  whole config has been checked, so that a run that fails early leaves the old one whole.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from wfcore import __version__, files
from wfcore.errors import WfcoreError

log = logging.getLogger(__name__)

MARKER = ".wfcore-run"
LOCK = ".wfcore.lock"
# What a run (and `wfcore export` into it) writes: what --force clears.
OWNED = ("config.yaml", "report.json", "report.md", "accuracy_vs_sparsity.png", "epochs.png",
         "dense.pt", "model_step*.pt", "checkpoint.pt", "model.onnx", "dense.onnx",
         "model.int8.onnx", "dense.int8.onnx",
         "model_step*.onnx", "*.failed.onnx", "error.txt")
# What `wfcore analyze` writes (wfcore/analyze_dir.py): what its --force clears.
ANALYSIS = ("analysis.json", "analysis.md", "heatmaps.png", "errors_vs_m.png",
            "obs_single.png", "obs_sets.png")


def owned_files(run_dir: Path, owned: tuple[str, ...] = OWNED) -> list[Path]:
    """The files in ``run_dir`` that a run (or what writes ``owned``) writes, sorted."""
    found = {p for pattern in owned for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def _legacy_run(run_dir: Path) -> bool:
    """A run directory written before the marker existed: its report.json is a run's."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and isinstance(report.get("config"), dict) \
        and "steps" in report and "finished" in report


def _legacy_analysis(run_dir: Path) -> bool:
    """An analysis written before the marker existed: its analysis.json is an analysis's."""
    try:
        result = json.loads((run_dir / "analysis.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and isinstance(result.get("config"), dict) \
        and isinstance(result.get("results"), list)


def is_owned(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file() or _legacy_run(run_dir) or _legacy_analysis(run_dir)


def check_usable(run_dir: Path) -> None:
    """Refuse a path that is a file, or a directory holding files that no run wrote: a
    file of a run or of an analysis, since the marker then claims both for wfcore."""
    try:
        if not run_dir.exists():
            return
    except OSError as exc:  # a name too long, a loop of links
        raise WfcoreError(f"output={run_dir}: cannot create the run directory: "
                          f"{exc.strerror or exc}") from None
    if not run_dir.is_dir():
        raise WfcoreError(f"output={run_dir} is a file, not a directory; choose another output=")
    if is_owned(run_dir):
        return
    found = owned_files(run_dir, OWNED + ANALYSIS)
    if found:
        raise WfcoreError(f"output={run_dir} holds {found[0].name}, which no wfcore run wrote; "
                          "wfcore replaces none of its files: choose another output=")


def claim(run_dir: Path) -> None:
    """Mark ``run_dir`` as a run's: later runs may then replace the files it holds."""
    if not (run_dir / MARKER).is_file():
        files.write_json(run_dir / MARKER, {"wfcore": __version__})


def clear(run_dir: Path, owned: tuple[str, ...] = OWNED) -> None:
    """Remove every file a run wrote (``--force``): no step or report of the old run stays."""
    removed = owned_files(run_dir, owned)
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.info("--force: removed %d file(s) of the earlier run in %s", len(removed), run_dir)


def holder(run_dir: Path) -> int | None:
    """The pid of another process that holds ``run_dir``'s lock (a run in progress, or an
    export), 0 when its pid is unknown; None when no other process holds it. A marker or
    checkpoint without a held lock is a run that was interrupted."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else 0
        if pid == os.getpid():  # this process's own lock
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use(run_dir: Path, pid: int | None) -> WfcoreError:
    """The refusal of a directory whose lock process ``pid`` holds."""
    return WfcoreError(f"output={run_dir} is in use by another wfcore run"
                       f"{f' (pid {pid})' if pid else ''}, in progress; wait for it to end "
                       "or choose another output=")


def refuse_in_use(run_dir: Path) -> None:
    """Refuse a run directory that another process holds (a run in progress)."""
    pid = holder(run_dir)
    if pid is not None:
        raise in_use(run_dir, pid)


class RunLock:
    """An exclusive lock on ``run_dir`` while the context is open. A directory it created
    is removed again when the run fails before writing anything into it. ``check``: refuse
    a directory that is not a run's (``check_usable``); a sweep's root, which holds no run
    of its own, is locked without it."""

    def __init__(self, run_dir: Path, check: bool = True):
        self.run_dir = run_dir
        self.check = check
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        run_dir = self.run_dir
        if self.check:
            check_usable(run_dir)
        self.created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WfcoreError(f"output={run_dir}: cannot create the run directory: "
                              f"{exc.strerror or exc}") from None
        try:
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WfcoreError(f"output={run_dir}: cannot write in the run directory: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise in_use(run_dir, int(text) if text.isdigit() else 0) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self.fd is None:
            return
        lock = self.run_dir / LOCK
        try:
            empty = exc_type is not None and self.created \
                and [p.name for p in self.run_dir.iterdir()] == [LOCK]
        except OSError:  # the directory went away meanwhile
            empty = False
        if empty:
            lock.unlink()
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if empty:
            self.run_dir.rmdir()
