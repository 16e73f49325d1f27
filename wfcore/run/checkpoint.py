"""Per-epoch checkpoints of a run, and loading them to resume it exactly.

``wfcore.run.runner.Runner`` drives a plan epoch by epoch. A checkpoint
(``RUN_DIR/checkpoint.pt``) is
written atomically (temporary file, then rename) after every epoch and every pruning
step, so an interrupted run loses at most the epoch in progress. It holds only tensors
and plain containers and is read back with ``weights_only=True``: the model and masks,
the trainer (optimizer, LR schedule, data-order generator), the position in the pruning
schedule, every RNG state, the report so far, and a digest of the resolved config that
tells a checkpoint of another config apart.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig

from wfcore import config as config_mod
from wfcore import files
from wfcore.errors import WfcoreError
from wfcore.run import directory as rundir
from wfcore.run import states

log = logging.getLogger(__name__)

FILENAME = rundir.CHECKPOINT
FORMAT = 1
# Keys that may change between a run and its resumption without changing its results
# (`analyze` is read by `wfcore analyze` only; `base_dir` moves with the config file).
IGNORED_KEYS = ("output", "cache_dir", "device", "analyze", "distributed", "base_dir")
# Dotted keys inside a section that only place files: a resumed run may move them (a
# store directory that turned out to be full or unwritable). Checkpoints written before
# this list existed digested them; ``load`` accepts that digest too.
PLACEMENT_KEYS = ("fisher.store_dir",)
# What ``save`` writes and ``load`` needs.
FIELDS = ("format", "digest", "position", "model", "masks", "trainer", "sampler", "rng", "report")


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILENAME


def resumable_config(cfg: DictConfig | dict[str, Any],
                     placement: tuple[str, ...] = PLACEMENT_KEYS) -> dict[str, Any]:
    """The resolved config less the keys that a resumed run may change."""
    values = config_mod.to_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    out = {k: v for k, v in values.items() if k not in IGNORED_KEYS}
    for key in placement:
        section, name = key.split(".", 1)
        if isinstance(out.get(section), dict) and name in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def config_digest(cfg: DictConfig | dict[str, Any],
                  placement: tuple[str, ...] = PLACEMENT_KEYS) -> str:
    return config_mod.digest(resumable_config(cfg, placement))


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: values}


def config_differences(saved: dict[str, Any], cfg: DictConfig | dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    a, b = _flatten(resumable_config(saved)), _flatten(resumable_config(cfg))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


# -- RNG states ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain values."""
    # the legacy tuple (get_state's default form)
    kind, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float],
                                             np.random.get_state(legacy=True))
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- save / load -----------------------------------------------------------------------
def save(run_dir: str | Path, *, digest: str, position: dict[str, Any],
         model: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
         trainer: dict[str, Any] | None, sampler: dict[str, Any],
         report: dict[str, Any], components: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint atomically; every argument must be tensors or plain values."""
    payload = {
        "format": FORMAT,
        "digest": digest,
        "position": position,
        "model": model,
        "masks": masks,
        "trainer": trainer,
        "sampler": sampler,  # the gradient sampler's generator and data position
        "rng": rng_state(),
        "report": report,
        # the random state of components that hold one ({section: their state_dict()})
        "components": components or {},
    }
    return files.save_torch(path(run_dir), payload)


def require(run_dir: str | Path) -> Path:
    """The checkpoint file of ``run_dir``; a one-line error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WfcoreError(f"--resume {run_dir}: no checkpoint: the directory does not exist")
    file = path(run_dir)
    if not file.is_file():
        raise WfcoreError(f"--resume {run_dir}: no checkpoint in this directory "
                          f"({FILENAME} is missing)")
    return file


def load(run_dir: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint of ``run_dir`` if it was written by a run of ``cfg``.

    Raises a one-line WfcoreError when there is none, it cannot be read, or it comes from
    a different config (naming the keys that differ).
    """
    run_dir = Path(run_dir)
    where = f"--resume {run_dir}"
    file = require(run_dir)
    state = states.read_torch(file, where, kind="wfcore checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WfcoreError(f"{where}: {file} is not a wfcore checkpoint (format {FORMAT})")
    missing = [k for k in FIELDS if k not in state]
    if missing:
        raise WfcoreError(f"{where}: {file} is not a complete wfcore checkpoint: no "
                          f"{', '.join(repr(k) for k in missing)}; start over with --force")
    model = states.check_state_dict(state["model"], where, file)
    states.check_finite(model, where, file)
    if state["digest"] not in (config_digest(cfg), config_digest(cfg, placement=())):
        report = state["report"] if isinstance(state["report"], dict) else {}
        saved = report.get("config", {})
        keys = config_differences(saved, cfg) if saved else []
        which = f" (differs in {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" \
            if keys else ""
        raise WfcoreError(f"{where}: the checkpoint is from a different config{which}; "
                          "resume with the run's own config.yaml, or start over with --force")
    return state
