"""The gradient store: the (m, d) rows of one pruning step, in memory or in a file on disk.

Rows are written once, a chunk of rows at a time, while the gradients are sampled; the
estimators then read a contiguous range of columns (a chunk of blocks) for all m rows at
once, as many times as they need (``columns``). In memory the layout is row-major. On disk
the columns are cut into tiles of ``tile`` columns (about ``TILE_BYTES`` each), each tile
row-major over all m rows and the tiles one after another: a chunk of rows is one
contiguous write per tile, and a range of columns is one contiguous read per tile it
covers (m short reads a tile's width apart for a tile it covers in part). A pass over the
columns in order thus reads the file in order, as a disk serves fastest; with whole rows
one after another it would read m pieces a whole row (tens of MB) apart for each chunk.

``memory``: one (m, d) tensor (pinned CPU memory when the solves run on a GPU, so that
chunks copy to the device asynchronously). ``disk``: a file of m*d values in the storage
dtype (float32, float16 or bfloat16), allocated in full up front (a full disk fails at
once, not half-way through the sampling) and read and written with explicit ``pread`` /
``pwrite``, never mapped: its pages stay in the kernel's page cache and never count in the
process's resident set, so a 20 GB store does not inflate the peak memory. On POSIX the file
is unlinked as soon as it is open: it has no name while in use and its space returns to the
file system when the store is closed or the process ends, even when it is killed.

Under torchrun on one machine the ranks share one store (``shared``): each rank writes its
own rows, and an in-memory store lives in /dev/shm, mapped once for all ranks.

Where a run's store lives is decided once, by its plan (``wfcore.fisher.plan.plan_store``): a
``StorePlan`` (m, d, dtype, memory or disk, the directory, the host of the rows, shared
or not) that every step follows (``StorePlan.open``, the run's one way to make a store).
Rows are put into a store only by the gradient sampler (``GradientSampler.sample_into``).

A disk store sums the squares of each column as its rows are written (``square_mean``, what
a relative damp scales by): reading a 20 GB store once more only for those d numbers
would cost as much as a pass of the estimator. The sums are taken from the values as
stored (after the cast to the storage dtype), in float64, so they are those of a pass over
the file; under torchrun the ranks' sums are added up when the rows are complete
(``finish_rows``). ``StoreWriter`` (store_writer.py) writes rows from a thread of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wfcore import distributed
from wfcore.choices import PLACES, STORAGE_DTYPE_NAMES, STORE_CHOICES
from wfcore.errors import WfcoreError
from wfcore.fisher import shared_store

log = logging.getLogger(__name__)

STORAGE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name)
                                           for name in STORAGE_DTYPE_NAMES}
DISK_MARGIN = 1 * 2**30  # free space left on the file system beside a store
TILE_BYTES = 64 * 2**20  # the columns of a disk store, m rows of them, per tile
SUM_SLICE_BYTES = 64 * 2**20  # float64 temporaries of the column sums, per slice of columns
SHARED_MEMORY = Path("/dev/shm")  # where the ranks of one machine share an in-memory store


def store_bytes(m: int, d: int, dtype: torch.dtype) -> int:
    return m * d * dtype.itemsize


def rows_host(device: torch.device, offload: bool) -> tuple[torch.device, bool]:
    """Where gradient rows live, and whether pinned: with ``fisher.offload`` in host memory
    (page-locked when the solves run on a GPU, for asynchronous copies), else on the run's
    ``device``. The one rule: the plan's store and the sampler's own rows follow it."""
    if offload:
        return torch.device("cpu"), device.type == "cuda"
    return device, False


@dataclass(frozen=True)
class StorePlan:
    """The gradient store of a run's pruning steps, decided once by its plan
    (``wfcore.fisher.plan.plan_store``): every step opens an empty one (``open``) as planned."""

    m: int
    d: int
    dtype: str  # fisher.storage_dtype (a key of STORAGE_DTYPES)
    place: str  # memory | disk
    directory: str  # where a disk store's file goes
    device: str  # where the rows live (``rows_host``)
    pin: bool  # page-locked host memory
    shared: bool  # one store for the ranks of a torchrun run on one machine (host rows)

    @property
    def nbytes(self) -> int:
        return store_bytes(self.m, self.d, STORAGE_DTYPES[self.dtype])

    def open(self) -> GradientStore:
        """An empty store as planned (close it, or use it as a context manager)."""
        return GradientStore(self.m, self.d, dtype=STORAGE_DTYPES[self.dtype], place=self.place,
                             directory=self.directory, device=self.device, pin=self.pin,
                             shared=self.shared)


def free_disk(directory: str | Path) -> int:
    """Free bytes on the file system that holds ``directory`` (or its nearest parent)."""
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_directory(directory: str | Path, key: str = "fisher.store_dir") -> None:
    """Refuse, before anything is trained, a store directory that cannot hold a file: a
    path that is a file, or under one, or a directory that cannot be written. A missing
    directory must be one that could be made; nothing is written (the probe file of an
    existing directory has no name)."""
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WfcoreError(f"config key '{key}': {existing} is not a directory"
                          + (f", so {path} cannot be one" if existing != path else ""))
    try:
        if existing == path:
            with tempfile.TemporaryFile(dir=path):
                pass
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise WfcoreError(f"config key '{key}': {path} cannot hold the gradient store: "
                          f"{exc.strerror or exc}") from None


def tile_columns(m: int, d: int, dtype: torch.dtype) -> int:
    """Columns per tile of a disk store: m rows of them fill about ``TILE_BYTES``."""
    return max(1, min(d, TILE_BYTES // max(1, m * dtype.itemsize)))


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return t.view(torch.uint8).numpy().data.cast("B")


class GradientStore:
    """m rows of d gradient values; see the module doc."""

    def __init__(self, m: int, d: int, *, dtype: torch.dtype = torch.float32,
                 place: str = "memory", directory: str | Path | None = None,
                 device: torch.device | str = "cpu", pin: bool = False, shared: bool = False):
        """An empty store of m rows of d values (a run makes its stores from the plan's
        ``StorePlan.open``). ``shared``: one store for all the ranks of a torchrun run on
        one machine, each writing its own rows (host memory only; see ``_share``)."""
        if place not in PLACES:
            raise WfcoreError(f"fisher.store: '{place}' is not one of {', '.join(STORE_CHOICES)}")
        self.m, self.d, self.dtype, self.place = m, d, dtype, place
        self.device = torch.device("cpu") if shared else torch.device(device)
        self.nbytes = store_bytes(m, d, dtype)
        self.tile = tile_columns(m, d, dtype)  # columns per tile of the file (disk)
        self.path: Path | None = None
        self._fd: int | None = None
        self._rows: torch.Tensor | None = None
        self.shared = shared  # one store written by every rank of a machine
        self._square_sum: torch.Tensor | None = None  # (d + 1,): column sums, rows summed
        where = Path(directory if directory is not None else tempfile.gettempdir())
        if shared:
            self._share(where)
        elif place == "memory":
            self._rows = torch.empty(m, d, dtype=dtype, device=self.device,
                                     pin_memory=pin and self.device.type == "cpu")
        else:
            self._open_file(where)

    @classmethod
    def from_tensor(cls, G: torch.Tensor) -> GradientStore:
        """An in-memory store holding ``G`` (m, d) itself (no copy)."""
        store = cls.__new__(cls)
        store.m, store.d = G.shape
        store.dtype, store.place, store.device = G.dtype, "memory", G.device
        store.nbytes, store.path, store._fd, store._rows = G.numel() * G.element_size(), \
            None, None, G
        store.shared, store._square_sum = False, None
        store.tile = store.d
        return store

    def _share(self, where: Path) -> None:
        """Set up the store that all the ranks of a torchrun run on one machine share, each
        writing its own rows into it (CPU host memory only).

        Rank 0 creates the file (``memory``: in /dev/shm when it has room, else in
        ``where``, mapped by every rank; ``disk``: in ``where``, read and written with
        pread / pwrite); every rank opens it without a name where /proc allows, else by
        its name, removed once all have (wfcore/fisher/shared_store.py).
        """
        store, m, d, dtype, place = self, self.m, self.d, self.dtype, self.place
        if place == "memory" and SHARED_MEMORY.is_dir() \
                and free_disk(SHARED_MEMORY) > store.nbytes + DISK_MARGIN:
            where = SHARED_MEMORY

        nameless = shared_store.by_descriptor()  # no name a SIGKILL could leave behind

        def create() -> str | tuple[int, int]:
            store._open_file(where, keep_name=not nameless)
            return shared_store.handle(store._require_fd()) if nameless else str(store.path)

        try:
            name = distributed.on_main(create)
            if not distributed.is_main():
                store._fd = shared_store.open_handle(name) if isinstance(name, tuple) \
                    else os.open(name, os.O_RDWR)
            if place == "memory":  # every rank maps the same pages
                store._rows = torch.from_file(f"/proc/self/fd/{store._fd}"
                                              if isinstance(name, tuple) else name, shared=True,
                                              size=m * d, dtype=dtype).view(m, d)
            distributed.barrier()  # every rank has it open: the name (or rank 0's fd) can go
        finally:  # on rank 0, which made it, also when another rank failed
            if store.path is not None:
                store.path.unlink(missing_ok=True)
                store.path = None
            if place == "memory" and store._fd is not None:  # the mapping holds the pages
                os.close(store._fd)
                store._fd = None
        # every rank sums its own rows' squares (a disk store), added up in ``finish_rows``:
        # the same on every rank, or the ranks' collectives would not match
        store._square_sum = torch.zeros(d + 1, dtype=torch.float64) if place == "disk" \
            else None

    def _open_file(self, directory: Path, keep_name: bool = False) -> None:
        directory = directory.expanduser()
        free = free_disk(directory)
        if self.nbytes + DISK_MARGIN > free:
            raise WfcoreError(
                f"gradient store: {self.nbytes / 2**30:.2f} GiB needed on disk in {directory}, "
                f"{free / 2**30:.2f} GiB free (less a {DISK_MARGIN / 2**30:.0f} GiB margin); "
                "set fisher.store_dir to a larger file system, fewer fisher.num_grads or "
                "fisher.storage_dtype=float16")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            shared_store.sweep(directory)  # the files of killed runs
            fd, name = tempfile.mkstemp(dir=directory, prefix=shared_store.prefix(),
                                        suffix=".bin")
        except OSError as exc:
            raise WfcoreError(f"gradient store: cannot create a file in {directory}: "
                              f"{exc.strerror or exc}") from None
        self._fd, self.path = fd, Path(name)
        self._square_sum = torch.zeros(self.d + 1, dtype=torch.float64)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self.nbytes)
            else:
                os.ftruncate(fd, self.nbytes)
        except OSError as exc:
            self.close()
            raise WfcoreError(f"gradient store: cannot allocate {self.nbytes / 2**30:.2f} GiB "
                              f"in {directory}: {exc.strerror or exc}") from None
        if os.name == "posix" and not keep_name:  # nameless from now on: gone with the process
            self.path.unlink()
        log.info("gradient store: %.2f GiB on disk in %s (%d x %d, %s)", self.nbytes / 2**30,
                 directory, self.m, self.d, str(self.dtype).removeprefix("torch."))

    # -- writing --------------------------------------------------------------------------
    def write(self, start: int, rows: torch.Tensor) -> None:
        """Rows ``start .. start + len(rows)`` from ``rows`` (c, d), cast to the storage dtype."""
        if rows.shape[1] != self.d or start + rows.shape[0] > self.m:
            raise ValueError(f"rows {start}..{start + rows.shape[0]} of width {rows.shape[1]} "
                             f"do not fit a ({self.m}, {self.d}) store")
        if self._rows is not None:
            self._rows[start:start + rows.shape[0]].copy_(rows)
            return
        stored = rows.detach().to("cpu", self.dtype).contiguous()
        fd = self._require_fd()
        for a, b in self.column_ranges(self.tile):  # the rows' piece of each tile
            data = _bytes_view(stored[:, a:b].contiguous())
            offset, done = self._offset(start, a), 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        if self._square_sum is not None:
            self._add_squares(self._square_sum, stored)

    def _add_squares(self, sums: torch.Tensor, stored: torch.Tensor) -> None:
        """Add the squares of ``stored`` (c, d), as stored, to the column sums, a slice of
        columns at a time (a float64 copy of a whole chunk of rows would double its memory)."""
        step = max(1, SUM_SLICE_BYTES // max(1, 8 * stored.shape[0]))
        for a in range(0, self.d, step):
            b = min(self.d, a + step)
            # a copy: a float64 ``stored`` may be the caller's own rows
            sums[a:b] += stored[:, a:b].to(torch.float64, copy=True).square_().sum(0)
        sums[-1] += stored.shape[0]

    def finish_rows(self) -> None:
        """Every row is written: under torchrun, each rank's column sums of a shared store
        are added up (the others wrote rows this rank did not see)."""
        if self._square_sum is not None and self.shared:
            distributed.sum_(self._square_sum)

    # -- reading --------------------------------------------------------------------------
    def columns(self, start: int, stop: int, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """(m, stop - start): columns ``start:stop`` of every row, a new tensor."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        if self._rows is not None:
            return self._rows[:, start:stop].to(device=device, dtype=dtype, copy=True)
        out = torch.empty(self.m, stop - start, dtype=self.dtype)
        for t in range(start // self.tile, (stop - 1) // self.tile + 1):  # tiles, in order
            lo, hi = t * self.tile, min(self.d, (t + 1) * self.tile)
            a, b = max(start, lo), min(stop, hi)
            if (a, b) == (lo, hi):  # the whole tile: one read
                tile = out if (a, b) == (start, stop) else torch.empty(self.m, b - a,
                                                                      dtype=self.dtype)
                self._read(_bytes_view(tile), self._offset(0, a))
                if tile is not out:
                    out[:, a - start:b - start] = tile
            else:  # part of it: m reads a tile row apart, each into its row of ``out``
                for i in range(self.m):
                    self._read(_bytes_view(out[i, a - start:b - start]), self._offset(i, a))
        return out.to(device=device, dtype=dtype)

    def _offset(self, row: int, column: int) -> int:
        """Byte offset of (row, column) in the file: tiles of ``tile`` columns, each
        row-major over the m rows (the last tile may be narrower)."""
        lo = column // self.tile * self.tile
        width = min(self.tile, self.d - lo)
        return (self.m * lo + row * width + column - lo) * self.dtype.itemsize

    def _read(self, view: memoryview, offset: int) -> None:
        done, fd = 0, self._require_fd()
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise WfcoreError("gradient store: the file ended early (was it removed?)")
            done += got

    def column_ranges(self, max_columns: int) -> Iterator[tuple[int, int]]:
        """Consecutive (start, stop) ranges of at most ``max_columns`` covering 0..d."""
        step = max(1, max_columns)
        for start in range(0, self.d, step):
            yield start, min(self.d, start + step)

    def chunk_columns(self, budget_bytes: int, copies: int = 3) -> int:
        """Columns per chunk so that ``copies`` float64 copies of an (m, cols) chunk fit."""
        return max(1, budget_bytes // max(1, self.m * 8 * copies))

    def column_reduce(self, fn, dtype: torch.dtype, budget_bytes: int = 256 * 2**20) \
            -> torch.Tensor:
        """(d,): ``fn`` of each float64 (m, cols) chunk of columns, streamed, as ``dtype``."""
        out = torch.empty(self.d, dtype=dtype)
        for a, b in self.column_ranges(self.chunk_columns(budget_bytes)):
            out[a:b] = fn(self.columns(a, b, torch.float64, "cpu"))
        return out

    def mean(self, budget_bytes: int = 256 * 2**20) -> torch.Tensor:
        """(d,) float32: the mean of the rows, streamed over column chunks."""
        return self.column_reduce(lambda G: G.mean(0), torch.float32, budget_bytes)

    def square_mean(self, budget_bytes: int = 256 * 2**20) -> torch.Tensor:
        """(d,) float64: the mean of the squared rows (diag(G^T G) / m): from the sums taken
        while the rows were written when every row was written once, else streamed."""
        if self._square_sum is not None and int(self._square_sum[-1]) == self.m:
            return self._square_sum[:-1] / self.m
        return self.column_reduce(lambda G: G.square_().mean(0), torch.float64, budget_bytes)

    def tensor(self) -> torch.Tensor:
        """The whole (m, d) matrix in memory (small stores and tests)."""
        return self._rows if self._rows is not None else self.columns(0, self.d)

    # -- lifetime -------------------------------------------------------------------------
    def _require_fd(self) -> int:
        if self._fd is None:
            raise WfcoreError("gradient store: used after it was closed")
        return self._fd

    def close(self) -> None:
        """Free the rows; a disk store's file is closed and removed."""
        self._rows = None
        self._square_sum = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        where = "in memory" if self.place == "memory" else "on disk"
        return (f"{self.m} x {self.d} {str(self.dtype).removeprefix('torch.')}, "
                f"{self.nbytes / 2**30:.3g} GiB {where}")
