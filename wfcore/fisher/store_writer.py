"""Rows written into a gradient store by a thread of their own, while the next ones are computed.

Writing a chunk of rows to a disk store (a cast to the storage dtype, ``pwrite``, the column
sums) took as long as computing a chunk on ResNet-50, and the two ran one after the other.
``StoreWriter`` overlaps them: ``write`` hands a chunk to a writer thread through a bounded
queue (``depth`` chunks: the rows waiting to be written are at most ``depth`` chunks of
memory) and returns at once; when the queue is full it waits, so that a slow disk slows the
sampling instead of filling the memory. ``pwrite`` and torch's kernels release the GIL, so
the thread runs beside the next chunk's gradients.

Errors: an error in the thread (a full disk, a closed store) is raised again in the caller
at its next ``write`` or when the ``with`` block ends, as a one-line WfcoreError, and the
thread stops writing. An error
or Ctrl-C in the caller stops the thread (the chunks still queued are dropped) and waits
for it before the exception goes on, so that whoever closes the store (the pipeline's
``ExitStack``) closes it with no write in flight: an on-disk store is then removed as
always. The rows are the same bytes in the same places as a write in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

import torch

from wfcore.errors import WfcoreError, first_line
from wfcore.fisher.store import GradientStore

_STOP = None  # the sentinel that ends the thread


class StoreWriter:
    """``with StoreWriter(store) as writer: writer.write(start, rows)``: see the module doc."""

    def __init__(self, store: GradientStore, depth: int = 2):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._dropping = threading.Event()  # stop writing: drain the queue, write nothing
        self._thread = threading.Thread(target=self._run, name="wfcore-store-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._dropping.is_set():
                continue
            start, rows = item
            try:
                self.store.write(start, rows)
            except BaseException as exc:  # raised again in the caller's thread
                self._error = exc
                self._dropping.set()

    def _raise_error(self) -> None:
        """The thread's error as a one-line WfcoreError (the cause chained): never taken for
        a failure of the caller's own computation (the sampler's fallback from vmap)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise WfcoreError(f"gradient store: writing rows failed: {first_line(error)}") \
                from error

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Queue rows ``start .. start + len(rows)`` (the tensor must not change afterwards);
        waits while ``depth`` chunks are queued. Raises the thread's error, if any."""
        self._raise_error()
        self._queue.put((start, rows))

    def close(self, failed: bool = False) -> None:
        """Wait for every queued chunk to be written (or, when ``failed``, dropped), then
        raise the thread's error, if any."""
        if failed:
            self._dropping.set()
        self._queue.put(_STOP)
        self._thread.join()
        if not failed:
            self._raise_error()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)
