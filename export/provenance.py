"""Where an ONNX file comes from: the run behind it, and whether two files are one model.

``wfcore export`` writes into each file the run that made it: ``wfcore.run_dir`` and
``wfcore.state``, paths relative to the file (no absolute path leaves the machine in a
file). ``wfcore bench`` reads that run to name the model in its summary and to rebuild the
PyTorch model for the torch row. A file is data, though, and may be crafted: bench reads
nothing that the metadata points to outside the file's own run directory. That is

- the directory the file sits in, when it holds a run (``config.yaml``): the metadata
  must name that directory (an export inside a run is that run's);
- else the directory ``wfcore.run_dir`` names, relative to the file (``wfcore export -o``
  elsewhere); an absolute one is ignored;

and ``wfcore.state`` must lie inside it. Anything else gets no torch row and the file's
name in the summary, with one warning.

A speed-up compares one model dense and sparse: ``check_same_model`` refuses a ``--dense``
model whose weights (names and shapes of the initializers of two or more dimensions, the
only ones quantization keeps recognisable) differ.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from wfcore import RunDirectory, WfcoreError

from .graph import input_shape, read_onnx, signature

log = logging.getLogger(__name__)

QUANTIZED_SUFFIX = "_quantized"  # what ONNX Runtime's quantizer appends to a weight's name


def metadata(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def run_of(path: str | Path, proto: Any) -> tuple[Path, Path | None] | None:
    """(run directory, state file or None) of the ONNX file at ``path`` under the rules of the
    module doc, or None (with a warning when the metadata points elsewhere)."""
    path = Path(path)
    home = path.resolve().parent
    meta = metadata(proto)
    run_dir, state = meta.get("wfcore.run_dir"), meta.get("wfcore.state")
    own = home if RunDirectory(home).config.is_file() else None
    if not run_dir:
        return (own, None) if own else None
    if os.path.isabs(run_dir) or (state and os.path.isabs(state)):
        log.warning("%s: its metadata names an absolute run directory or state; bench reads "
                    "only what lies inside the file's own run directory", path.name)
        return (own, None) if own else None
    named = (home / run_dir).resolve()
    if own is not None and named != own:
        log.warning("%s: its metadata names a run (%s) that is not the directory the file sits "
                    "in; bench reads only the file's own run", path.name, run_dir)
        return own, None
    if not state:
        return named, None
    state_path = (home / state).resolve()
    if not state_path.is_relative_to(named):
        log.warning("%s: its metadata names a state (%s) outside its run directory; bench "
                    "reads only what lies inside the file's own run directory", path.name, state)
        return named, None
    return named, state_path


def torch_model_for(path: str | Path) -> nn.Module | None:
    """The PyTorch model behind an ONNX file that ``wfcore export`` wrote, or None.

    The file's run (see ``run_of``): its config.yaml and state_dict are read, but no module
    is imported on the file's word: a run whose config names ``plugins:`` gets no torch
    timing.
    """
    from wfcore import load_model

    path = Path(path)
    proto = read_onnx(path)
    found = run_of(path, proto)
    if found is None:
        return None
    run_dir, state = found
    if state is None or not state.is_file() or not RunDirectory(run_dir).config.is_file():
        return None
    try:
        shape = input_shape(proto, 1)[1:]
        num_classes = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        return load_model(run_dir, state, shapes=(shape, num_classes), run_plugins=False,
                          what="torch engine")
    except WfcoreError as exc:
        log.warning("torch: skipped for %s: %s", path.name, exc)
        return None


def describe(path: str | Path) -> str:
    """What an ONNX file holds, for a summary line: the run's model and data set when the
    file comes from a run (see ``run_of``), else its name."""
    from omegaconf import OmegaConf

    found = run_of(path, read_onnx(path))
    if found is None:
        return Path(path).name
    run_dir = found[0]
    try:
        cfg = OmegaConf.load(RunDirectory(run_dir).config)
        untrained = not cfg.model.checkpoint and cfg.train.epochs == 0
        return (f"{cfg.model.name}{' with random weights' if untrained else ''} on "
                f"{cfg.data.name} ({run_dir})")
    except Exception:  # not a run after all: any file, any directory
        return Path(path).name


def weights(proto: Any) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the initializers with two or more dimensions (the weights), a
    quantized weight under its float name."""
    return {i.name.removesuffix(QUANTIZED_SUFFIX): tuple(i.dims)
            for i in proto.graph.initializer if len(i.dims) >= 2}


def check_same_model(proto: Any, dense_proto: Any, path: Path, dense: Path,
                     quantized: bool) -> None:
    """A speed-up against ``dense`` means something only for one model, dense and sparse:
    the same weights by name and shape. A quantized file may store a weight transposed
    (DeepSparse's MatMul layout), so its shapes are compared as sorted dimensions."""
    if signature(proto) != signature(dense_proto):
        raise WfcoreError(f"--dense {dense}: its inputs or outputs differ from those of "
                          f"{path} ({signature(dense_proto)} vs {signature(proto)}); a speed-up "
                          "compares one model dense and sparse")
    mine, theirs = weights(proto), weights(dense_proto)
    if quantized:
        mine = {n: tuple(sorted(s)) for n, s in mine.items()}
        theirs = {n: tuple(sorted(s)) for n, s in theirs.items()}
    if mine == theirs:
        return
    differ = sorted(set(mine.items()) ^ set(theirs.items()))
    name = differ[0][0]
    shapes = Counter(theirs.values()) == Counter(mine.values())
    raise WfcoreError(
        f"--dense {dense}: not the same architecture as {path}: weight '{name}' is "
        f"{theirs.get(name, 'absent')} there and {mine.get(name, 'absent')} here"
        f"{' (same shapes, other names)' if shapes else ''}"
        f" ({len({n for n, _ in differ})} weights differ); a speed-up compares one model "
        "dense and sparse")
