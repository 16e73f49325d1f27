"""CPU latency of ONNX models on DeepSparse, ONNX Runtime and PyTorch, side by side.

Every model on every engine is built once and kept warm (``engines.py``), given ``warmup``
untimed batches, then timed in rounds (``rounds.py``): each round runs every model and
engine once, a slot of a few batches each, in an order rotated from round to round, until
both ``runs`` rounds and ``min_seconds`` have passed (a slow set stops at ``max_seconds``).
A row reports the median and p90 over the rounds of the time per batch, items per second,
and the speed-up against the dense model on ONNX Runtime at the same batch size: the
median of the ratios measured round by round, with their interquartile range. When the
dense model's own rounds spread beyond ``rounds.NOISE_BOUND`` (the machine's load changed
during the run), its speed-ups are marked noisy, in the table and the JSON.

Every engine gets the same number of threads (default: all cores). DeepSparse runs in a
process of its own (``engines.Worker``), started once and timed round after round:
DeepSparse 1.8 aborts the whole process when it fails to compile some sparse INT8 graphs,
and that must cost one row of the table, not the others (nor a run's export). Its row is
then skipped with one line that names the file and the signal.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from wfcore import WfcoreError, progress, rounds
from wfcore.choices import ENGINES

from .engines import Runner, Worker
from .graph import check_benchable, input_shape, read_onnx
from .provenance import check_same_model, describe, torch_model_for

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "Timing", "bench", "check_same_model", "describe", "format_table",
           "summary", "time_rows", "torch_model_for"]

SLOT_SECONDS = 0.01  # a slot runs enough batches to last this long (one batch at least)

INSTALL = {
    "deepsparse": "pip install 'wfcore[deepsparse]' (deepsparse 1.8.0: Python < 3.12, "
                  "x86-64 Linux or macOS)",
    "onnxruntime": "pip install onnxruntime",
    "torch": "pip install torch",
}


@dataclass
class Timing:
    """One engine on one model at one batch size, over the rounds it was timed in."""

    model: str  # a label: the file name, or what the caller calls it
    engine: str
    batch_size: int
    median_ms: float  # median over the rounds of the time per batch
    p90_ms: float
    items_per_s: float
    runs: int  # rounds
    repeats: int = 1  # batches per slot (one slot per round)
    spread: float = 0.0  # interquartile range / median of this row's rounds
    speedup: float | None = None  # median of the per-round ratios dense ONNX Runtime / this
    speedup_low: float | None = None  # their first quartile
    speedup_high: float | None = None  # and third
    noisy: bool = False  # the baseline's rounds spread beyond the bound (see the module doc)
    round_ms: list[float] = field(default_factory=list)  # time per batch in each round

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def installed(engine: str) -> bool:
    if engine not in ENGINES:
        raise WfcoreError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
    return importlib.util.find_spec(engine) is not None


def available(engines: tuple[str, ...] | list[str]) -> list[str]:
    """The installed engines among ``engines``; each missing one is logged with its install."""
    found = []
    for engine in engines:
        if installed(engine):
            found.append(engine)
        else:
            log.warning("%s: not installed, skipped (install: %s)", engine, INSTALL[engine])
    return found


@dataclass
class Row:
    """What to time: a model file on an engine (a PyTorch module for the torch engine)."""

    label: str
    engine: str
    path: Path
    torch_model: nn.Module | None = None


def _start(row: Row, shape: tuple[int, ...], threads: int, seed: int,
           isolate: bool) -> Runner | Worker:
    if row.engine == "deepsparse" and isolate:
        return Worker(f"deepsparse on {row.path.name}", row.engine, str(row.path), shape,
                      threads, seed=seed)
    return Runner(row.engine, row.path, shape, threads, row.torch_model, seed)


def time_rows(rows: list[Row], batch_size: int, *, warmup: int = 5, runs: int = 20,
              min_seconds: float = 2.0, max_seconds: float = 60.0,
              threads: int | None = None, seed: int = 0, isolate: bool = True) -> list[Timing]:
    """Build every row's engine, warm each up, then time them all in rounds (module doc).

    A DeepSparse row whose process dies, at start or later, is skipped with a warning; any
    other failure is an error. The engines are freed when the rounds end.
    """
    threads = threads or os.cpu_count() or 1
    started: dict[int, Runner | Worker] = {}
    repeats: dict[int, int] = {}
    try:
        for i, row in enumerate(rows):
            shape = input_shape(read_onnx(row.path), batch_size)
            log.info("starting %s on %s at batch %d", row.path.name, row.engine, batch_size)
            try:
                engine = started[i] = _start(row, shape, threads, seed, isolate)
                if warmup:
                    engine.time(warmup)
                once = engine.time(1)
            except WfcoreError as exc:
                if row.engine != "deepsparse":
                    raise
                log.warning("skipped: %s", exc)  # the other engines' rows are kept
                if i in started:
                    started.pop(i).close()
                continue
            repeats[i] = max(1, min(1000, math.ceil(SLOT_SECONDS / max(once, 1e-9))))

        def timer(i: int):
            def slot() -> float:
                try:
                    return started[i].time(repeats[i])
                except WfcoreError as exc:
                    if rows[i].engine != "deepsparse":
                        raise
                    raise rounds.Dropped(str(exc)) from None
            return slot

        bar = tqdm(total=max(runs, rounds.MIN_ROUNDS), desc="rounds", unit="round",
                   leave=False, delay=1, disable=progress.disabled(False, False))
        try:
            values = rounds.interleave({i: timer(i) for i in started}, runs=runs,
                                       min_seconds=min_seconds, max_seconds=max_seconds,
                                       on_round=lambda done: bar.update(1))
        finally:
            bar.close()
    finally:
        for engine in started.values():
            engine.close()
    out = []
    for i, seconds in values.items():
        ms = [s * 1e3 for s in seconds]
        median = rounds.quartiles(ms)[1]
        p90 = sorted(ms)[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)]
        out.append(Timing(rows[i].label, rows[i].engine, batch_size, round(median, 4),
                          round(p90, 4), round(batch_size * 1e3 / median, 2), len(ms),
                          repeats[i], round(rounds.spread(ms), 4),
                          round_ms=[round(v, 6) for v in ms]))
    return out


def time_engine(engine: str, path: str | Path, batch_size: int, *, label: str | None = None,
                torch_model: nn.Module | None = None, **kwargs: Any) -> Timing:
    """One model on one engine (``time_rows`` of one row): no ratio, so no rounds to share."""
    row = Row(label or Path(path).name, engine, Path(path), torch_model)
    timings = time_rows([row], batch_size, **kwargs)
    if not timings:
        raise WfcoreError(f"{engine} on {Path(path).name}: its process ended early")
    return timings[0]


def add_speedups(timings: list[Timing], is_baseline, bound: float = rounds.NOISE_BOUND
                 ) -> None:
    """Fill the speed-ups against the row ``is_baseline(timing)`` picks at each batch size:
    the per-round ratios of the baseline's time to each row's (all timed in the same rounds),
    their median and quartiles, and the noisy mark (the baseline's own spread beyond
    ``bound``). A row without a baseline is marked noisy by its own spread."""
    base = {t.batch_size: t for t in timings if is_baseline(t)}
    for t in timings:
        b = base.get(t.batch_size)
        if b is None:
            t.noisy = rounds.noisy(t.round_ms, bound)
            continue
        ratio = rounds.Ratio.of(b.round_ms, t.round_ms)
        t.speedup, t.speedup_low, t.speedup_high = (round(ratio.median, 3),
                                                    round(ratio.low, 3), round(ratio.high, 3))
        t.noisy = rounds.noisy(b.round_ms, bound)


def is_quantized(proto: Any) -> bool:
    """Whether the ONNX model holds quantized operators (an INT8 export, or any QDQ model)."""
    ops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm",
           "ConvInteger", "MatMulInteger"}
    return any(node.op_type in ops for node in proto.graph.node)


def bench(path: str | Path | list[str | Path], *, dense: str | os.PathLike[str] | None = None,
          batch_size: int = 1, engines: tuple[str, ...] | list[str] = ENGINES,
          torch_models: dict[str, nn.Module] | None = None, **kwargs: Any) -> list[Timing]:
    """Time ``path`` (one ONNX file or several, e.g. a float and an INT8 export) and
    ``dense`` on every installed engine in ``engines``, in one run.

    ``torch_models``: {file path: module} for the torch engine; without one, an ONNX file
    that ``wfcore export`` wrote is rebuilt from its run, and any other is skipped. An INT8
    model has no PyTorch counterpart: the torch engine skips it.
    """
    if batch_size < 1:
        raise WfcoreError(f"batch size must be at least 1, got {batch_size}")
    paths = [Path(p) for p in (path if isinstance(path, list | tuple) else [path])]
    paths += [Path(dense)] if dense else []
    protos = {p: read_onnx(p) for p in paths}
    for p, proto in protos.items():
        check_benchable(proto, p)
    quantized = {p: is_quantized(proto) for p, proto in protos.items()}
    if dense:
        for p in paths[:-1]:
            check_same_model(protos[p], protos[paths[-1]], p, paths[-1], quantized[p])
    torch_models = {str(Path(k)): v for k, v in (torch_models or {}).items()}
    rows: list[Row] = []
    for p in paths:
        for engine in available(engines):
            model = None
            if engine == "torch":
                if quantized[p]:
                    log.info("torch: skipped for %s: an INT8 model has no PyTorch counterpart",
                             p.name)
                    continue
                model = torch_models.get(str(p)) or torch_model_for(p)
                if model is None:
                    log.warning("torch: skipped for %s: it does not name a wfcore run "
                                "(export it with `wfcore export`)", p.name)
                    continue
            rows.append(Row(str(p), engine, p, model))
    out = time_rows(rows, batch_size, **kwargs)
    if dense:
        dense_label = str(Path(dense))
        add_speedups(out, lambda t: t.model == dense_label and t.engine == "onnxruntime")
    else:
        add_speedups(out, lambda t: False)
    return out


def summary(timings: list[Timing], dense: str | Path) -> str:
    """One line: the fastest row (dense ones included) against dense float32 ONNX Runtime,
    the median of its per-round ratios with their interquartile range."""
    rated = [t for t in timings if t.speedup is not None]
    if not rated:
        return ""
    best = max(rated, key=lambda t: t.speedup or 0.0)
    noisy = (f"; noisy: the dense model's rounds spread beyond "
             f"{rounds.NOISE_BOUND:.0%}" if best.noisy else "")
    return (f"fastest: {Path(best.model).name} on {best.engine}, {best.speedup:.2f}x dense "
            f"float32 ONNX Runtime at batch {best.batch_size} (median of {best.runs} rounds, "
            f"quartiles {best.speedup_low:.2f}-{best.speedup_high:.2f}{noisy}); "
            f"model: {describe(best.model)}")


def format_table(timings: list[Timing]) -> str:
    """The timings as fixed-width text, one line per model and engine; a speed-up whose
    baseline's rounds spread beyond the bound is marked ``noisy``, with a note below."""
    head = (f"{'model':<28} {'engine':<12} {'batch':>5} {'median ms':>10} {'p90 ms':>9} "
            f"{'items/s':>9} {'spread':>7} {'vs dense ORT (quartiles)':>26}")
    lines = [head, "-" * len(head)]
    for t in timings:
        speedup = "-"
        if t.speedup is not None:
            speedup = f"{t.speedup:.3g}x ({t.speedup_low:.3g}-{t.speedup_high:.3g})"
        lines.append(f"{Path(t.model).name[:28]:<28} {t.engine:<12} {t.batch_size:>5} "
                     f"{t.median_ms:>10.2f} {t.p90_ms:>9.2f} {t.items_per_s:>9.1f} "
                     f"{t.spread:>7.1%} {speedup:>26}{' noisy' if t.noisy else ''}")
    if any(t.noisy for t in timings):
        lines.append(f"noisy: the baseline's rounds spread (interquartile range / median) "
                     f"beyond {rounds.NOISE_BOUND:.0%}: the machine's load changed during the "
                     "run, and the ratios are less sure than their quartiles say")
    return "\n".join(lines)
