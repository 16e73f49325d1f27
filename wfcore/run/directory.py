"""The run directory: one run at a time in it, nothing replaced that a run did not write.

- A lock (``fcntl.flock`` on ``.wfcore.lock`` in the directory), held for the whole run:
  a second run into the same directory is refused at once, never interleaved.
- An ownership marker (``.wfcore-run``), written when a run claims the directory: a
  directory without one that holds a file a run would write (``config.yaml``, a report,
  a model) belongs to someone else and is refused, with or without ``--force``.
- ``--force`` removes exactly the files a run writes (``OWNED``), and only after the
  whole config has been checked, so that a run that fails early leaves the old one whole.

``RunDirectory`` is the one owner of these rules and of the files' names (``config.yaml``,
``report.json``, ``dense.pt``, ``model_step<N>.pt``, ``checkpoint.pt``, ...): where a run
of a config goes, which steps it saved, its report read back, and its state (in progress,
interrupted, finished), for prune, sweep, export, bench and analyze alike.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

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
# What `wfcore analyze` writes (wfcore/tools/analyze_dir.py): what its --force clears.
ANALYSIS = ("analysis.json", "analysis.md", "heatmaps.png", "errors_vs_m.png",
            "obs_single.png", "obs_sets.png")


CONFIG = "config.yaml"
REPORT = "report.json"
DENSE = "dense.pt"
CHECKPOINT = "checkpoint.pt"
ERROR = "error.txt"  # a sweep's record of a run that failed
STEP = "model_step{}.pt"  # a step's state_dict (also a glob and a pattern below)
STEP_ONNX = "model_step{}.onnx"
_STEP_NAME = re.compile(r"model_step(\d+)\.pt")


def owned_files(run_dir: Path, owned: tuple[str, ...] = OWNED) -> list[Path]:
    """The files in ``run_dir`` that a run (or what writes ``owned``) writes, sorted."""
    found = {p for pattern in owned for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """The run's report.json, or None when there is none or it is not a JSON object."""
    try:
        report = json.loads((run_dir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _legacy_run(run_dir: Path) -> bool:
    """A run directory written before the marker existed: its report.json is a run's."""
    report = read_report(run_dir)
    return report is not None and isinstance(report.get("config"), dict) \
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


class RunDirectory:
    """A run's directory: the names of its files, its lock and marker, its report.

    ``RunDirectory.of(cfg)`` is where a run of ``cfg`` goes (``output``, else
    ``runs/<name>``). Reading never writes; ``lock``, ``claim`` and ``clear`` are the only
    ways a run takes and empties it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, cfg: Any, prefix: str = "") -> RunDirectory:
        """The directory of a run of ``cfg``: its ``output``, else ``runs/<prefix><name>``
        (a sweep's root: prefix ``sweep-``)."""
        return cls(cfg.output or Path("runs") / f"{prefix}{cfg.name}")

    # -- names ----------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def dense(self) -> Path:
        return self.path / DENSE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def step_state(self, step: int) -> Path:
        """The state_dict file of step ``step``."""
        return self.path / STEP.format(step)

    def step_onnx(self, step: int) -> Path:
        """Where ``wfcore export`` writes step ``step`` by default."""
        return self.path / STEP_ONNX.format(step)

    def steps(self) -> list[int]:
        """The step indices with a saved state_dict, ascending."""
        found = (_STEP_NAME.fullmatch(p.name) for p in self.path.glob(STEP.format("*")))
        return sorted(int(m.group(1)) for m in found if m)

    # -- the report -----------------------------------------------------------------------
    def report(self) -> dict[str, Any] | None:
        """report.json, or None when there is none or it is not a JSON object."""
        return read_report(self.path)

    def report_steps(self) -> set[int] | None:
        """The step indices the report lists; None when it has no readable one."""
        try:
            return {int(s["index"]) for s in (self.report() or {})["steps"]}
        except (KeyError, TypeError, ValueError):
            return None

    def is_finished(self) -> bool:
        """Whether the report is a finished run's."""
        return bool((self.report() or {}).get("finished", False))

    # -- ownership and state --------------------------------------------------------------
    def is_owned(self) -> bool:
        return is_owned(self.path)

    def owned_files(self, owned: tuple[str, ...] = OWNED) -> list[Path]:
        return owned_files(self.path, owned)

    def check_usable(self) -> None:
        check_usable(self.path)

    def claim(self) -> None:
        claim(self.path)

    def clear(self, owned: tuple[str, ...] = OWNED) -> None:
        clear(self.path, owned)

    def lock(self, check: bool = True) -> RunLock:
        return RunLock(self.path, check)

    def holder(self) -> int | None:
        return holder(self.path)

    def state(self) -> str:
        """``in progress`` (another live process holds the lock), ``finished``,
        ``interrupted`` (a checkpoint, no lock held), else ``empty`` (missing, or nothing
        of a run to continue)."""
        if not self.path.is_dir():
            return "empty"
        if self.holder() is not None:
            return "in progress"
        if self.is_finished():
            return "finished"
        if self.checkpoint.is_file():
            return "interrupted"
        return "empty"
