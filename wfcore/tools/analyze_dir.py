"""Where `wfcore analyze` writes, and what it checks before the work.

An analysis takes minutes to hours (the dense model, the exact Hessian, every estimator at
every m), so everything that would fail it is found first, in one line naming the key:
its options (``check_options``), then its output directory (``check_output``), which is
a run directory like a run's (wfcore/run/directory.py): locked for the whole analysis, claimed
by the marker, an earlier analysis replaced only with ``--force`` and only once the new
one is complete, a user's file never.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from wfcore import files
from wfcore.errors import ConfigError, WfcoreError
from wfcore.run import directory as rundir


def _at_least(value: float | None, low: float, key: str, what: str) -> None:
    if value is not None and value < low:
        raise ConfigError(f"config key 'analyze.{key}': {value} is not {what}")


def check_options(cfg: DictConfig) -> None:
    """Refuse an ``analyze`` option the analysis would fail on, or report nonsense for,
    before any data is read or model trained."""
    a = cfg.analyze
    if not a.num_grads or min(a.num_grads) < 1:
        raise ConfigError("config key 'analyze.num_grads': a list of m >= 1")
    if not a.estimators:
        raise ConfigError("config key 'analyze.estimators': name at least one estimator")
    for key in ("samples", "num_weights", "directions", "batch_size", "heatmap_size"):
        _at_least(a[key], 1, key, "an integer >= 1")
    _at_least(a.damp, 0.0, "damp", ">= 0 (it is added to the exact curvatures)")
    for key in ("max_memory_gb", "max_minutes"):
        if a[key] is not None and not a[key] > 0:
            raise ConfigError(f"config key 'analyze.{key}': {a[key]} is not > 0")
    if not a.sparsities:
        raise ConfigError("config key 'analyze.sparsities': name at least one sparsity")
    for s in a.sparsities:
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"config key 'analyze.sparsities': {s} is not in [0, 1)")


def check_heatmap_param(cfg: DictConfig, names: list[str]) -> None:
    """``analyze.heatmap_param`` must be one of the analysed parameters."""
    name = cfg.analyze.heatmap_param
    if name is not None and name not in names:
        raise ConfigError(f"config key 'analyze.heatmap_param': '{name}' is not analysed; "
                          f"analysed: {', '.join(names)}")


def output_of(cfg: DictConfig) -> Path:
    """The analysis's directory: a run directory's (``RunDirectory.of``)."""
    return rundir.RunDirectory.of(cfg).path


def check_output(run_dir: Path, force: bool) -> None:
    """Refuse a directory the analysis may not write: not a run directory (a user's file
    in it), an earlier analysis without ``force``, or a file it cannot replace. Reads only."""
    rundir.check_usable(run_dir)
    if not run_dir.exists():
        return
    earlier = rundir.owned_files(run_dir, rundir.ANALYSIS)
    if earlier and not force:
        raise WfcoreError(f"output={run_dir} holds an analysis ({earlier[0].name}); use "
                          "--force to replace it or choose another output=")
    for name in rundir.ANALYSIS:
        files.check_writable(run_dir / name, f"output={run_dir}")


def replace(run_dir: Path) -> None:
    """Just before the new analysis is written (``--force`` was checked): remove the
    earlier one's files, so that none of them stays beside the new ones, and claim the
    directory."""
    rundir.clear(run_dir, rundir.ANALYSIS)
    rundir.claim(run_dir)
