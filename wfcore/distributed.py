"""torch.distributed for a run started by torchrun; nothing at all for one started without.

``torchrun --nproc-per-node N -m wfcore prune CONFIG`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; ``init`` joins them into one process
group (gloo on CPU, NCCL on CUDA: ``distributed.backend: auto``) and gives each rank its
local device. Without those variables (a plain ``wfcore prune``) nothing is initialised,
``world()`` is 1 and every helper here returns its input: a run started without torchrun
does exactly what it did before.

How a run is split (see DESIGN.md, "Scale and distribution"):

- gradient rows: every rank draws the same seeded sample stream; each chunk of rows is cut
  into ``share`` ranges and each rank computes its range, so the rows are the same for
  any number of ranks. The ranks of one machine write them into one shared store
  (``GradientStore(..., shared=True)``); elsewhere ``gather_rows`` gives every rank the
  whole chunk for its own store;
- block solves: the chunks of blocks are dealt to the ranks (``owns``); each per-weight
  result is filled on its owner and zero elsewhere, and ``sum_`` (an all-reduce) gives
  every rank the whole vector (x + 0 is exact, so the values are the owners' bit for bit);
- rank 0's masks are broadcast before a pruning step's update, its weights after it;
- files: rank 0 alone writes (``is_main``); ``on_main`` runs a step there and hands its
  result, or its one-line error, to every rank; ``agree`` raises on every rank the first
  rank's error of a step that each rank runs.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from wfcore.choices import BACKENDS
from wfcore.errors import ConfigError, WfcoreError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Group:
    """The process group a run belongs to (world 1: no group at all)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no torch.distributed


_group = Group()
_processes: list[tuple[str, int] | None] = []  # (host, pid) of each rank, from ``init``


class LostRankError(WfcoreError):
    """A collective failed because a process of the run is gone (``lost_ranks``)."""


class AgreedError(WfcoreError):
    """A user error raised on every rank at once: rank 0 alone prints it."""


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), before ``init``."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str = "auto", timeout_s: float = 1800.0) -> Group:
    """Join torchrun's process group once (idempotent); world 1 without torchrun.

    ``backend`` auto = nccl when CUDA is available, else gloo. ``timeout_s`` bounds every
    collective: a rank that died leaves the others waiting at most that long.
    """
    global _group
    if _group.backend is not None or not launched():
        return _group
    if backend not in BACKENDS:
        raise ConfigError(f"config key 'distributed.backend': '{backend}' is not one of "
                          f"{', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("config key 'distributed.backend': nccl needs CUDA; use gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _group = Group(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                   backend=backend)
    global _processes
    _processes = [None] * _group.world  # (host, pid) of every rank: to name a lost one
    dist.all_gather_object(_processes, (socket.gethostname(), os.getpid()))
    log.info("distributed: rank %d of %d (%s), local rank %d", _group.rank, _group.world,
             backend, local_rank)
    return _group


def shutdown(barrier: bool = False) -> None:
    """Leave the process group (no-op without one). ``barrier``: first wait for every rank
    to get here (a command that finished on every rank), so that no rank tears its
    connections down while another still uses them; a rank that exits with an error does
    not wait for the others (they may be waiting in a collective for it)."""
    global _group
    if _group.backend is not None and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _group = Group()


def initialized() -> bool:
    """Whether this process has joined a process group (``init`` under torchrun)."""
    return _group.backend is not None


def one_machine() -> bool:
    """Whether every rank runs on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", _group.world)) == _group.world


def rank() -> int:
    return _group.rank


def world() -> int:
    return _group.world


def is_main() -> bool:
    return _group.rank == 0


def local_device(name: str) -> str:
    """The run's ``device`` for this rank: cuda / auto on a GPU machine -> cuda:LOCAL_RANK."""
    if _group.world == 1 or not torch.cuda.is_available():
        return name
    if name in ("auto", "cuda"):
        return f"cuda:{_group.local_rank}"
    return name


def share(count: int, rank_: int | None = None, world_: int | None = None) -> tuple[int, int]:
    """This rank's contiguous range [lo, hi) of ``count`` items (the first ranks get one
    more when ``count`` does not divide evenly)."""
    r = _group.rank if rank_ is None else rank_
    n = _group.world if world_ is None else world_
    base, extra = divmod(count, n)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


def owns(index: int) -> bool:
    """Whether item ``index`` of a dealt sequence (chunks of blocks) is this rank's."""
    return index % _group.world == _group.rank


# -- collectives (each a no-op in one process) --------------------------------------------
def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _group.backend == "nccl" \
        else torch.device("cpu")


def gather_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """(count, d): every rank's ``share(count)`` rows (its ``rows``), in rank order."""
    if _group.world == 1:
        return rows
    width = -(-count // _group.world)  # ranks send equal sizes: padded to the largest share
    device = _comm_device()
    padded = rows.new_zeros((width, *rows.shape[1:]), device=device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(_group.world)]
    dist.all_gather(parts, padded)
    out = [part[:hi - lo] for part, (lo, hi) in
           zip(parts, (share(count, r) for r in range(_group.world)), strict=True)]
    return torch.cat(out).to(rows.device)


def _in_place(t: torch.Tensor, collective) -> torch.Tensor:
    """Run ``collective`` on ``t`` on the communication device, the result back in ``t``."""
    if _group.world == 1:
        return t
    device = _comm_device()
    buf = t if t.device == device else t.to(device)
    collective(buf)
    if buf is not t:
        t.copy_(buf)
    return t


def sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (and returned)."""
    return _in_place(t, dist.all_reduce)


def sum_float(value: float) -> float:
    """A float summed over the ranks (float64)."""
    if _group.world == 1:
        return value
    return float(sum_(torch.tensor([value], dtype=torch.float64)))


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, in place (and returned)."""
    return _in_place(t, lambda buf: dist.broadcast(buf, src=0))


def broadcast_object(obj: T) -> T:
    """Rank 0's picklable ``obj`` on every rank."""
    if _group.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers in ``model`` on every rank."""
    if _group.world == 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        broadcast_(t.data)


def gather_objects(obj: T | None) -> list[T]:
    """Every rank's picklable ``obj`` (None ones left out), in rank order."""
    if _group.world == 1:
        return [obj] if obj is not None else []
    out: list[Any] = [None] * _group.world
    dist.all_gather_object(out, obj)
    return [o for o in out if o is not None]


def barrier() -> None:
    if _group.world > 1:
        dist.barrier()


# -- errors -------------------------------------------------------------------------------
def lost_ranks() -> list[int]:
    """The ranks of this machine whose process no longer exists (the others' are unknown)."""
    host, lost = socket.gethostname(), []
    for r, proc in enumerate(_processes):
        if proc is None or proc[0] != host or r == _group.rank:
            continue
        try:
            os.kill(proc[1], 0)
            stat = open(f"/proc/{proc[1]}/stat").read()
            if stat.rpartition(")")[2].split()[0] in ("Z", "X"):  # killed, not yet reaped
                lost.append(r)
        except ProcessLookupError:
            lost.append(r)
        except OSError:  # alive (another user's), or no /proc to tell a zombie by
            pass
    return lost


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer gone, a timeout), not the code's."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer",
                            "Connection reset by peer", "Broken pipe"))


@contextmanager
def lost_rank(resume: str) -> Iterator[None]:
    """A collective that fails because a rank is gone becomes one line (``LostRankError``):
    which rank, and ``resume``, the command that continues the run."""
    try:
        yield
    except Exception as exc:
        if _group.world == 1 or isinstance(exc, WfcoreError) or not is_communication_error(exc):
            raise
        lost = lost_ranks()
        if not lost:  # a peer's end may reach this rank before the kernel has it dead
            time.sleep(0.2)
            lost = lost_ranks()
        who = (f"rank {', '.join(map(str, lost))} of {_group.world} was lost" if lost else
               f"a process of the {_group.world} was lost (on another machine, or hung)")
        detail = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))  # gloo's source position
        detail = detail if len(detail) <= 100 else detail[:97] + "..."
        raise LostRankError(f"{who} ({detail}); the run directory keeps "
                            f"every finished step: {resume}") from None


def agree(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; a WfcoreError (or OSError) on any rank is raised on every rank,
    with the message of the lowest failing rank (so it is printed once, by rank 0)."""
    if _group.world == 1:
        return fn()
    error, result = None, None
    try:
        result = fn()
    except (WfcoreError, OSError) as exc:
        error = first_line(exc)
    errors: list[str | None] = [None] * _group.world
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise AgreedError(failed[0])
    return cast(T, result)  # fn() returned it: no rank failed


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone; its result, or its one-line error, on every rank."""
    if _group.world == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except (WfcoreError, OSError) as exc:
            error = first_line(exc)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise AgreedError(error)
    return cast(T, result)  # rank 0's fn() returned it


def same_on_every_rank(state: dict[str, torch.Tensor]) -> bool:
    """Whether every rank holds bit for bit the same ``state`` (a digest compared)."""
    if _group.world == 1:
        return True
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        flat = state[name].detach().cpu().reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).numpy().data)
    return len(set(gather_objects(digest.hexdigest()))) == 1


def provenance() -> dict[str, Any]:
    """What report.json records of the run's processes."""
    return {"processes": _group.world, "backend": _group.backend}


def broadcast_masks(keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's boolean masks on every rank (new tensors; ``keep`` itself in one process)."""
    if _group.world == 1:
        return keep
    return {n: broadcast_(k.to(torch.uint8)).bool() for n, k in keep.items()}
