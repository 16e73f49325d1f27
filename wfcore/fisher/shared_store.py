"""How the ranks of one machine share a gradient store's file without a name to leak.

A named file that every rank opens by its name exists, by construction, from the moment
rank 0 creates it until the last rank has opened it: a SIGKILL in that window (which no
``finally`` survives) leaves it in ``fisher.store_dir`` or /dev/shm for good, up to the
store's whole size. So on Linux no rank ever opens the store by a name:

1. rank 0 creates the file and removes its name at once (``GradientStore._open_file``):
   from then on it lives only as long as some process holds it open;
2. rank 0 sends every rank its ``(pid, fd)``; each opens ``/proc/<pid>/fd/<fd>``, which
   reaches the nameless file itself (``open_handle``);
3. a barrier: rank 0 keeps its descriptor until every rank holds its own.

A SIGKILL at any point leaves no name behind: what is open is freed with the last process
that holds it. Where /proc is not available, the store falls back to a named file opened
by every rank and unlinked after the barrier; its name carries the host and the pid of
its owner, and every store set-up first removes the files of owners that are gone
(``sweep``, a lock-free check: ``kill(pid, 0)``), so a killed run's file goes at the
next start at the latest.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from wfcore.errors import WfcoreError

log = logging.getLogger(__name__)

PREFIX = ".wfcore-gradients-"
PROC = Path("/proc")
_OWNED = re.compile(re.escape(PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[^-]*\.bin$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def prefix() -> str:
    """The start of this process's store file names: its host and pid name the owner."""
    return f"{PREFIX}{_host()}-{os.getpid()}-"


def by_descriptor() -> bool:
    """Whether another process can open this one's files through /proc/<pid>/fd."""
    return (PROC / "self" / "fd").is_dir()


def handle(fd: int) -> tuple[int, int]:
    """What another rank needs to open the file behind ``fd``: (pid, fd)."""
    return os.getpid(), fd


def open_handle(owner: tuple[int, int]) -> int:
    """A descriptor of its own onto the (nameless) file behind another process's ``fd``."""
    pid, fd = owner
    try:
        return os.open(PROC / str(pid) / "fd" / str(fd), os.O_RDWR)
    except OSError as exc:
        raise WfcoreError(f"gradient store: cannot open rank 0's store through /proc/{pid}/fd "
                          f"({exc.strerror or exc}); run the ranks as one user in one "
                          "process namespace, or set fisher.store=disk") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep(directory: str | Path) -> list[Path]:
    """Remove the store files in ``directory`` whose owner (this host, that pid) is gone;
    returns them. Files of other hosts (a shared file system) are left alone."""
    host, removed = _host(), list[Path]()
    try:
        candidates = list(Path(directory).expanduser().glob(PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        match = _OWNED.match(path.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    if removed:
        log.warning("gradient store: removed %d file(s) of killed runs in %s", len(removed),
                    directory)
    return removed
