"""One inference engine on one ONNX model, kept warm and timed a slot at a time.

``Runner`` builds DeepSparse, ONNX Runtime or PyTorch for one model at one batch size in this
process; ``time(repeats)`` runs ``repeats`` batches and returns the seconds per batch.
``Worker`` is the same in a long-lived process of its own, answering requests over a pipe:
DeepSparse 1.8 aborts the whole process when it fails to compile some sparse INT8 graphs,
and that must cost one row of a table, not the others. The worker is started once and timed
round after round (``rounds.py``), so an engine is warm in every round, not rebuilt.

Engines stay alive side by side while they are timed in rounds, so none may burn CPU while
idle: ONNX Runtime's threads are told not to spin waiting for work.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from wfcore import WfcoreError, first_line

log = logging.getLogger(__name__)


class Runner:
    """``engine`` on the ONNX model at ``path``, ready to run batches of random normal input
    of ``shape`` (batch first)."""

    def __init__(self, engine: str, path: str | Path, shape: tuple[int, ...], threads: int,
                 torch_model: nn.Module | None = None, seed: int = 0):
        self.x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        self.run = build(engine, str(path), shape[0], threads, torch_model)

    def time(self, repeats: int = 1) -> float:
        """Seconds per batch over ``repeats`` batches run back to back."""
        start = time.perf_counter()
        for _ in range(repeats):
            self.run(self.x)
        return (time.perf_counter() - start) / repeats

    def close(self) -> None:
        del self.run
        gc.collect()


def build(engine: str, path: str, batch_size: int, threads: int,
          torch_model: nn.Module | None) -> Any:
    """A callable that runs one batch on ``engine``."""
    if engine == "deepsparse":
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
        import deepsparse

        ds = deepsparse.Engine(model=path, batch_size=batch_size, num_cores=threads)
        return lambda x: ds.run([x])
    if engine == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # idle between its slots, a session's threads must not spin and slow the others
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    if torch_model is None:
        raise WfcoreError("torch: no PyTorch model for this ONNX file")
    torch.set_num_threads(threads)
    model = torch_model.cpu().eval()

    def run_torch(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run_torch


class Worker:
    """A ``Runner`` in a process of its own (see the module doc): ``time`` and ``close`` as
    a Runner's. A process that dies (a signal, an exit) is a one-line WfcoreError naming
    ``what`` and why, at start or at any request; this process goes on."""

    def __init__(self, what: str, *args: Any, **kwargs: Any):
        self.what = what
        self._errors: IO[bytes] = tempfile.TemporaryFile(prefix="wfcore-worker-")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"import {__name__} as m; m._serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors)
        try:
            self._ask((list(sys.path), args, kwargs))  # the path first: the runner may need it
        except BaseException:
            self.close()
            raise

    def time(self, repeats: int = 1) -> float:
        return self._ask(("time", repeats))

    def _ask(self, message: Any) -> Any:
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None  # opened as pipes
        try:
            pickle.dump(message, stdin)
            stdin.flush()
            ok, value = pickle.load(stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            code = self._proc.wait()
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            raise WfcoreError(f"{self.what}: the process ended ({how}) before it finished"
                              f"{last_words(self._stderr())}") from None
        if not ok:
            raise WfcoreError(f"{self.what}: {value}")
        return value

    def _stderr(self) -> str:
        self._errors.seek(0)
        return self._errors.read().decode(errors="replace")

    def close(self) -> None:
        """Ask the process to end (kill it if it does not), and replay what it printed."""
        if self._proc.poll() is None:
            try:
                stdin = self._proc.stdin
                assert stdin is not None  # opened as a pipe
                pickle.dump(("close", 0), stdin)
                stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if not self._errors.closed:
            replay(self._stderr())
            self._errors.close()


def _serve() -> None:
    """The other end of ``Worker``: build the runner, then time slots until told to close.

    Replies go to a private copy of stdout; fd 1 itself is pointed at stderr, so that an
    engine printing a banner cannot garble them."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    path, args, kwargs = pickle.load(requests)
    sys.path[:] = path

    def reply(ok: bool, value: Any) -> None:
        pickle.dump((ok, value), replies)
        replies.flush()

    try:
        runner = Runner(*args, **kwargs)
    except Exception as exc:  # sent back as one line; the parent raises it
        reply(False, first_line(exc))
        return
    reply(True, None)
    while True:
        try:
            op, value = pickle.load(requests)
        except EOFError:
            return
        if op == "close":
            return
        try:
            reply(True, runner.time(value))
        except Exception as exc:
            reply(False, first_line(exc))


_REPLAYED: set[str] = set()


def replay(stderr: str) -> None:
    """A finished child's stderr, on this process's, each line once per process: an engine
    prints its banner once, however many children load it."""
    for line in stderr.splitlines(keepends=True):
        if line not in _REPLAYED:
            _REPLAYED.add(line)
            sys.stderr.write(line)


def last_words(stderr: str) -> str:
    """``; <the line that says why>`` from a dead process's stderr: its first assertion or
    error line (a native abort prints pages of backtrace after it), else ''."""
    for line in stderr.splitlines():
        if re.search(r"\b(Assertion|Error|error|Fatal|fatal)\b", line):
            return f"; {line.strip()[:200]}"
    return ""
