"""CPU latency of ONNX models on DeepSparse, ONNX Runtime and PyTorch, side by side.

Each measurement builds the engine for one model at one batch size, runs ``warmup``
untimed batches, then timed batches until both ``runs`` batches and ``min_seconds``
have passed (a slow engine stops at ``max_seconds``). It reports the median and p90
latency of a batch, items per second, and the speed-up against the dense model on ONNX
Runtime at the same batch size.

Engines run one at a time and each is freed before the next starts, so that no idle
engine's threads or memory compete with the one being timed. Every engine gets the same
number of threads (default: all cores).

DeepSparse runs in a process of its own (``isolated``): DeepSparse 1.8 aborts the whole
process when it fails to compile some sparse INT8 graphs, and that must cost one row of
the table, not the others (nor a run's export). Its row is then skipped with one line that
names the file and the signal.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wfcore.errors import WfcoreError, first_line

log = logging.getLogger(__name__)

ENGINES = ("deepsparse", "onnxruntime", "torch")
INSTALL = {
    "deepsparse": "pip install 'wfcore[deepsparse]' (deepsparse 1.8.0: Python < 3.12, "
                  "x86-64 Linux or macOS)",
    "onnxruntime": "pip install onnxruntime",
    "torch": "pip install torch",
}


@dataclass
class Timing:
    """One engine on one model at one batch size."""

    model: str  # a label: the file name, or what the caller calls it
    engine: str
    batch_size: int
    median_ms: float
    p90_ms: float
    items_per_s: float
    runs: int
    speedup: float | None = None  # dense ONNX Runtime median / this median

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


def read_onnx(path: str | Path) -> Any:
    """The ONNX model at ``path``; a missing or non-ONNX file is a one-line error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise WfcoreError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise WfcoreError(f"{path} is not an ONNX model: {first_line(exc)[:120]}") \
            from None
    if not proto.graph.node or not proto.graph.input:
        raise WfcoreError(f"{path} is not an ONNX model: no graph")
    return proto


def graph_inputs(proto: Any) -> list[Any]:
    """The graph's inputs that are fed at run time (not initializers)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]


def check_benchable(proto: Any, path: str | Path) -> None:
    """One float32 input: what every engine here is fed (random normal data)."""
    import onnx

    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise WfcoreError(f"{path}: the model has {len(inputs)} inputs ({names}); bench times "
                          "models with one float32 input")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(elem).lower() if elem else "not a tensor"
        raise WfcoreError(f"{path}: input '{inputs[0].name}' is {kind}; bench times models "
                          "with one float32 input")


def signature(proto: Any) -> tuple[Any, ...]:
    """Input and output shapes (less the batch dimension) and element types."""
    def shape(value: Any) -> tuple[Any, ...]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value or d.dim_param for d in tensor.shape.dim[1:])
        return (tensor.elem_type, dims)

    return (tuple(shape(i) for i in graph_inputs(proto)),
            tuple(shape(o) for o in proto.graph.output))


def check_same_model(proto: Any, dense_proto: Any, path: Path, dense: Path) -> None:
    """A speed-up against ``dense`` means something only for the same inputs and outputs."""
    if signature(proto) != signature(dense_proto):
        raise WfcoreError(f"--dense {dense}: its inputs or outputs differ from those of "
                          f"{path} ({signature(dense_proto)} vs {signature(proto)}); a speed-up "
                          "compares one model dense and sparse")


def input_shape(proto: Any, batch_size: int) -> tuple[int, ...]:
    """The input's shape with the batch dimension set (dynamic dims -> error)."""
    dims = graph_inputs(proto)[0].type.tensor_type.shape.dim
    shape = [batch_size] + [d.dim_value for d in dims[1:]]
    if dims and dims[0].dim_value and dims[0].dim_value != batch_size:
        raise WfcoreError(f"the model's batch dimension is fixed at {dims[0].dim_value}; "
                          f"export it with a dynamic batch to bench batch {batch_size}")
    if any(s <= 0 for s in shape[1:]):
        raise WfcoreError(f"the model's input has dynamic dimensions besides the batch: {shape}")
    return tuple(shape)


def _runner(engine: str, path: str, batch_size: int, threads: int,
            torch_model: nn.Module | None) -> Callable[[np.ndarray], Any]:
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


def isolated(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh Python process; its result, or its error again as a
    one-line WfcoreError. A process that dies (a signal, an exit) is a one-line WfcoreError
    naming ``what``: nothing of this process is lost. ``fn``, its arguments and its result
    are pickled; the caller's ``__main__`` is never imported again (unlike multiprocessing's
    spawn), so a plain script may call this."""
    with tempfile.TemporaryDirectory(prefix="wfcore-isolated-") as tmp:
        result, errors = Path(tmp) / "result.pkl", Path(tmp) / "stderr.txt"
        call = pickle.dumps((fn, args, kwargs, str(result)))
        payload = pickle.dumps((list(sys.path), call))  # the path first: fn may need it
        with errors.open("w+b") as err:
            code = subprocess.run([sys.executable, "-c", f"import {__name__} as m; m._child()"],
                                  input=payload, stderr=err, check=False).returncode
            err.seek(0)
            said = err.read().decode(errors="replace")
        if not result.is_file():
            how = (f"killed by {signal.Signals(-code).name}" if code < 0
                   else f"exit status {code}")
            raise WfcoreError(f"{what}: the process ended ({how}) before it finished"
                              f"{last_words(said)}")
        replay(said)
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise WfcoreError(f"{what}: {value}")
    return value


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


def _child() -> None:
    """The other end of ``isolated``: read the call from stdin, write its outcome."""
    path, call = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = path
    fn, args, kwargs, result = pickle.loads(call)
    try:
        outcome = (True, fn(*args, **kwargs))
    except Exception as exc:  # sent back as one line; the parent raises it
        outcome = (False, first_line(exc))
    Path(result).write_bytes(pickle.dumps(outcome))


def time_engine(engine: str, path: str | Path, batch_size: int, *, label: str | None = None,
                torch_model: nn.Module | None = None, warmup: int = 5, runs: int = 20,
                min_seconds: float = 2.0, max_seconds: float = 60.0,
                threads: int | None = None, seed: int = 0, isolate: bool = True) -> Timing:
    """Warm up, then time ``engine`` on the ONNX model at ``path`` (see module doc).

    A slow engine stops after ``max_seconds`` of timed batches (but never before 3).
    DeepSparse is timed in a process of its own (see the module doc).
    """
    if engine == "deepsparse" and isolate:
        return isolated(time_engine, engine, str(path), batch_size, label=label,
                        warmup=warmup, runs=runs, min_seconds=min_seconds,
                        max_seconds=max_seconds, threads=threads, seed=seed, isolate=False,
                        what=f"deepsparse on {Path(path).name}")
    threads = threads or os.cpu_count() or 1
    shape = input_shape(read_onnx(path), batch_size)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    run = _runner(engine, str(path), batch_size, threads, torch_model)
    try:
        for _ in range(warmup):
            run(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            if len(times) >= 10 * runs or (len(times) >= 3 and elapsed > max_seconds):
                break
    finally:
        del run
        gc.collect()
    ms = np.array(times) * 1e3
    median = float(np.median(ms))
    return Timing(label or Path(path).name, engine, batch_size, round(median, 3),
                  round(float(np.percentile(ms, 90)), 3), round(batch_size * 1e3 / median, 2),
                  len(times))


def add_speedups(timings: list[Timing], dense_label: str) -> None:
    """Fill ``speedup`` against the dense model on ONNX Runtime, per batch size."""
    # Throughputs, not the rounded medians: a model that runs in microseconds keeps its ratio.
    base = {t.batch_size: t.items_per_s for t in timings
            if t.model == dense_label and t.engine == "onnxruntime"}
    for t in timings:
        if t.batch_size in base:
            t.speedup = round(t.items_per_s / base[t.batch_size], 3)


def is_quantized(proto: Any) -> bool:
    """Whether the ONNX model holds quantized operators (an INT8 export, or any QDQ model)."""
    ops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm",
           "ConvInteger", "MatMulInteger"}
    return any(node.op_type in ops for node in proto.graph.node)


def bench(path: str | Path | list[str | Path], *, dense: str | Path | None = None,
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
    if dense:
        for p in paths[:-1]:
            check_same_model(protos[p], protos[paths[-1]], p, paths[-1])
    quantized = {p: is_quantized(proto) for p, proto in protos.items()}
    torch_models = {str(Path(k)): v for k, v in (torch_models or {}).items()}
    out: list[Timing] = []
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
            log.info("timing %s on %s at batch %d", p.name, engine, batch_size)
            try:
                out.append(time_engine(engine, p, batch_size, torch_model=model,
                                       label=str(p), **kwargs))
            except WfcoreError as exc:
                if engine != "deepsparse":
                    raise
                log.warning("skipped: %s", exc)  # the other engines' rows are kept
    if dense:
        add_speedups(out, str(Path(dense)))
    return out


def torch_model_for(path: str | Path) -> nn.Module | None:
    """The PyTorch model behind an ONNX file that ``wfcore export`` wrote, or None.

    The file names its run (paths relative to the file). The run's config.yaml and
    state_dict are read, but no module is imported on the file's word: a run whose config
    names ``plugins:`` gets no torch timing.
    """
    from wfcore import config as config_mod
    from wfcore import manager, runs, states

    path = Path(path)
    proto = read_onnx(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    run_dir, state = meta.get("wfcore.run_dir"), meta.get("wfcore.state")
    if not run_dir or not state:
        return None
    base = path.resolve().parent
    run_dir, state = base / run_dir, base / state  # (an absolute path stays as it is)
    if not state.is_file() or not (run_dir / "config.yaml").is_file():
        return None
    try:
        plugins = config_mod.load(run_dir / "config.yaml").plugins
        if plugins:
            log.warning("torch: skipped for %s: its run imports plugins (%s), and bench "
                        "imports nothing that a model file names", path.name, ", ".join(plugins))
            return None
        shape = input_shape(proto, 1)[1:]
        num_classes = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        model = runs.rebuild(run_dir, (shape, num_classes), plugins=manager.build()).model
        states.load_state(model, state, "torch engine")
    except WfcoreError as exc:
        log.warning("torch: skipped for %s: %s", path.name, exc)
        return None
    return model.eval()


def describe(path: str | Path) -> str:
    """What an ONNX file holds, for a summary line: the run's model and data set when the
    file comes from a run (its metadata or the run directory it sits in), else its name."""
    from omegaconf import OmegaConf

    meta = {p.key: p.value for p in read_onnx(path).metadata_props}
    run_dir = Path(meta.get("wfcore.run_dir") or Path(path).parent)
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        untrained = not cfg.model.checkpoint and cfg.train.epochs == 0
        return (f"{cfg.model.name}{' with random weights' if untrained else ''} on "
                f"{cfg.data.name} ({run_dir})")
    except Exception:  # not a run: any file, any directory
        return Path(path).name


def summary(timings: list[Timing], dense: str | Path) -> str:
    """One line: the fastest non-dense model against dense float32 ONNX Runtime."""
    others = [t for t in timings if t.model != str(Path(dense)) and t.speedup is not None]
    if not others:
        return ""
    best = max(others, key=lambda t: t.speedup or 0.0)
    return (f"fastest: {Path(best.model).name} on {best.engine}, {best.speedup:.2f}x dense "
            f"float32 ONNX Runtime at batch {best.batch_size}; model: {describe(best.model)}")


def format_table(timings: list[Timing]) -> str:
    """The timings as fixed-width text, one line per model and engine."""
    head = (f"{'model':<28} {'engine':<12} {'batch':>5} {'median ms':>10} {'p90 ms':>9} "
            f"{'items/s':>9} {'vs dense ORT':>12}")
    lines = [head, "-" * len(head)]
    for t in timings:
        speedup = f"{t.speedup:.3g}x" if t.speedup is not None else "-"
        lines.append(f"{Path(t.model).name[:28]:<28} {t.engine:<12} {t.batch_size:>5} "
                     f"{t.median_ms:>10.2f} {t.p90_ms:>9.2f} {t.items_per_s:>9.1f} "
                     f"{speedup:>12}")
    return "\n".join(lines)
