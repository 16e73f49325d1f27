"""A killed torchrun run leaks no shared gradient store (issue 25, case 2).

Two ranks (gloo, CPU, launched as torchrun would: RANK, WORLD_SIZE, MASTER_*) set up one
``GradientStore(..., shared=True)``; one of them is SIGKILLed at a stage of the set-up, then
the other too (the worst case: no ``finally`` runs anywhere). No ``.wfcore-gradients-*``
file may remain in the store directory or in the shared-memory directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wfcore.fisher import shared_store

WORKER = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from wfcore import distributed, shared_store, store

    stage, victim, place, directory, nameless = sys.argv[1:6]
    store.SHARED_MEMORY = Path(directory) / "shm"  # the test's own /dev/shm
    if nameless == "0":
        shared_store.by_descriptor = lambda: False
    group = distributed.init("gloo", 60)

    def die(at):
        if at == stage and group.rank == int(victim):
            print("killed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before, after):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            die(before)
            out = real(*args, **kwargs)
            die(after)
            return out
        setattr(owner, name, wrapped)

    wrap(store.GradientStore, "_open_file", "start", "created")
    wrap(distributed, "on_main", "start", "received")
    wrap(distributed, "barrier", "opened", "released")
    s = store.GradientStore(64, 1000, place=place, directory=directory, shared=True)
    s.close()
    print("done", flush=True)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(shared_store.PREFIX + "*"))


def kill_during_setup(tmp_path: Path, stage: str, victim: int, place: str,
                      nameless: bool = True) -> None:
    """Two ranks; ``victim`` SIGKILLs itself at ``stage``, then the other is SIGKILLed."""
    (tmp_path / "shm").mkdir()
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, stage, str(victim), place,
                               str(tmp_path), "1" if nameless else "0"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for r in range(2)]
    try:
        assert ranks[victim].stdout.read().strip() == "killed"
        assert ranks[victim].wait(timeout=60) == -signal.SIGKILL
        time.sleep(0.2)  # what the survivor does now is its own business...
    finally:
        for r in ranks:  # ...until it is killed as well
            r.kill()
            r.wait()


STAGES = [("start", 0), ("start", 1), ("created", 0), ("received", 0), ("received", 1),
          ("opened", 0), ("opened", 1), ("released", 0), ("released", 1)]
QUICK = {("created", 0), ("received", 1), ("released", 0)}


@pytest.mark.parametrize(("stage", "victim"), [
    s if s in QUICK else pytest.param(*s, marks=pytest.mark.slow) for s in STAGES])
@pytest.mark.parametrize("place", ["memory", "disk"])
def test_a_sigkill_during_store_setup_leaves_no_file(tmp_path, stage, victim, place):
    kill_during_setup(tmp_path, stage, victim, place)
    assert leftovers(tmp_path) == []


def test_without_proc_the_next_start_sweeps_a_killed_runs_file(tmp_path):
    """The named fallback: the file the kill left is its owner's, and goes at the sweep."""
    kill_during_setup(tmp_path, "created", 0, "disk", nameless=False)
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(shared_store.PREFIX)
    mine = tmp_path / f"{shared_store.prefix()}live.bin"  # a live owner's file stays
    mine.write_bytes(b"")
    assert [p.name for p in shared_store.sweep(tmp_path)] == left
    assert leftovers(tmp_path) == [mine.name]
