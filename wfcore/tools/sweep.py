"""``wfcore sweep CONFIG key=a,b,c ...``: every combination, one table and the plots.

An override whose value lists several values at top level (commas outside brackets and
quotes) is swept; one with a single value applies to every run. Every combination of the
swept values is one ordinary run (``pipeline.run``) in its own directory under the sweep
directory, which is the config's ``output`` (``output=DIR`` on the command line) or
``runs/sweep-<name>``; a run's directory is named by its swept values, e.g.
``estimator.name=kfac``. The runs share the dense-model cache (keyed by the model, data,
train and seed config), so runs that differ only in pruning train the dense model once.

A finished run whose saved config equals the one it would run with is not run again, an
interrupted one is resumed from its checkpoint; a run of another config in a run's
directory refuses the whole sweep before anything runs (``--force`` runs everything
afresh, replacing them); a failed run is logged, its error kept in ``error.txt`` of its
directory, and the sweep goes on. The sweep directory then holds ``results.csv`` (one
row per run and step: the swept keys by dotted name, then target_sparsity, sparsity,
accuracy, loss, seconds), ``results.md`` (accuracy by target sparsity and method),
``accuracy_vs_sparsity.png`` (a line per method, dense accuracy dashed) and
``layer_sparsity.png`` (per-layer sparsity of each method at the highest target). All
are rebuilt from the runs' ``report.json`` files, so re-running a finished sweep rewrites
them identically.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from wfcore import api, files, manager
from wfcore import config as config_mod
from wfcore.errors import ConfigError, WfcoreError, first_line
from wfcore.run import checkpoint, pipeline
from wfcore.run import directory as rundir
from wfcore.run.report import TIMING_KEYS, pyplot, save_figure

log = logging.getLogger(__name__)

METRICS = ("target_sparsity", "sparsity", "accuracy", "loss", "seconds", "fallback")
FALLBACK_MARK = "†"  # a cell whose mask the safeguard's magnitude fallback chose


def fell_back(step: dict[str, Any]) -> bool:
    """Whether the safeguard replaced the method's mask in any (sub-)step of ``step``
    (``safeguard.fallback: magnitude``): that cell shows magnitude pruning's mask."""
    return any(r.get("mask", "scores") != "scores" for r in step.get("safeguard", []))


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, braces, parentheses and quotes."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(fixed overrides, {swept key: values}) from ``key=value`` / ``key=a,b,c`` items."""
    fixed: list[str] = []
    swept: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value or key=a,b,c")
        if key in seen:
            raise ConfigError(f"config key '{key}' is given twice")
        seen.add(key)
        values = split_values(value)
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
            continue
        if key == "output":
            raise ConfigError("config key 'output' is the sweep directory; it cannot be swept")
        if len(set(values)) != len(values):
            raise ConfigError(f"config key '{key}': a swept value is repeated in '{value}'")
        swept[key] = values
    return fixed, swept


def run_name(combo: dict[str, str]) -> str:
    """A directory name from the swept values, e.g. ``estimator.name=kfac``."""
    if not combo:
        return "run"
    parts = [f"{k}={v}" for k, v in combo.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", "__".join(parts)).strip("_")


def method_label(combo: dict[str, str]) -> str:
    """What a line of the plots stands for: the swept values but the target sparsities
    (the x axis)."""
    shown = {k: v for k, v in combo.items() if k != "scheduler.sparsities"}
    if len(shown) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "run"


@dataclass
class SweepRun:
    combo: dict[str, str]
    cfg: DictConfig
    run_dir: Path
    status: str = "pending"  # done (ran now) | skipped (finished before) | failed
    error: str = ""
    report: dict[str, Any] | None = None


@dataclass
class SweepResult:
    root: Path
    swept: list[str]
    runs: list[SweepRun]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """The report.json of ``run_dir``, or None when there is none or it is not a report."""
    return rundir.read_report(run_dir)


def saved_report(run: SweepRun) -> dict[str, Any] | None:
    """The run's report.json if it was made with exactly this config, else None."""
    report = read_report(run.run_dir)
    if report is None:
        return None
    if report.get("config") != config_mod.to_dict(run.cfg):
        log.info("%s: made with another config; running it again", run.run_dir.name)
        return None
    return report


def refuse_replacing(runs: list[SweepRun]) -> None:
    """Without --force a sweep replaces no run made with another config (other fixed
    overrides): every run directory is checked before any run starts."""
    for run in runs:
        report = read_report(run.run_dir)
        if report is None:
            continue
        keys = checkpoint.config_differences(report.get("config") or {}, run.cfg)
        if keys:
            state = "finished" if report.get("finished") else "unfinished"
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise WfcoreError(f"sweep: {run.run_dir} holds a {state} run of another config "
                              f"(differs in {shown}); use --force to replace it or choose "
                              "another output=")


def finished_report(run: SweepRun) -> dict[str, Any] | None:
    """The run's report if it finished with exactly this config, else None."""
    report = saved_report(run)
    return report if report is not None and report.get("finished") else None


def resumable(run: SweepRun) -> bool:
    """An interrupted run of this config with a checkpoint to continue from."""
    return checkpoint.path(run.run_dir).is_file() and saved_report(run) is not None


def plan(config_path: str, overrides: list[str]) -> tuple[Path, list[str], list[SweepRun]]:
    """Load every combination's config first, so that a bad key fails before any run."""
    fixed, swept = parse_overrides(overrides)
    base = config_mod.load(config_path, fixed)
    root = rundir.RunDirectory.of(base, prefix="sweep-").path
    runs, names = list[SweepRun](), set[str]()
    for values in itertools.product(*swept.values()):
        combo = dict(zip(swept, values, strict=True))
        cfg = config_mod.load(config_path, fixed + [f"{k}={v}" for k, v in combo.items()])
        name = run_name(combo)
        if name in names:
            name = f"{name}__{len(names)}"
        names.add(name)
        cfg.output = str(root / name)
        runs.append(SweepRun(combo, cfg, root / name))
    return root, list(swept), runs


def execute(run: SweepRun, plugins_cache: dict[tuple[str, ...], manager.Plugins],
            force: bool = False) -> None:
    key = tuple(run.cfg.plugins)
    try:
        if key not in plugins_cache:
            plugins_cache[key] = manager.build(run.cfg.plugins,
                                               base_dir=run.cfg.base_dir)
        if not force and resumable(run):
            log.info("%s: resuming the interrupted run", run.run_dir.name)
            try:
                run.report = api.run_config(run.cfg, resume=True,
                                                plugins=plugins_cache[key]).report
            except WfcoreError as exc:
                log.warning("%s: cannot resume (%s); starting over", run.run_dir.name, exc)
        if run.report is None:
            run.report = api.run_config(run.cfg, force=True,
                                            plugins=plugins_cache[key]).report
        run.status = "done"
        (run.run_dir / rundir.ERROR).unlink(missing_ok=True)
    except Exception as exc:  # one failed run must not stop the sweep
        run.status = "failed"
        run.error = f"{type(exc).__name__}: {first_line(exc)}"
        log.error("sweep: %s failed: %s", run.run_dir.name, run.error)
        log.debug("%s", traceback.format_exc())
        if rundir.holder(run.run_dir) is None:  # not into another process's run
            files.write_text(run.run_dir / rundir.ERROR, traceback.format_exc())
        # the steps it finished before the failure stay in the table (a later target
        # refused as degenerate must not hide the earlier ones)
        partial = saved_report(run)
        run.report = partial if partial is not None and partial.get("steps") else None


def run_sweep(config_path: str, overrides: list[str], *, force: bool = False) -> SweepResult:
    """Run (or skip) every combination, then write results.csv, results.md and the plots."""
    start = time.perf_counter()
    root, swept, runs = plan(config_path, overrides)
    with rundir.RunLock(root, check=False):  # one sweep at a time into a root
        return _run_locked(root, swept, runs, start, force)


def _run_locked(root: Path, swept: list[str], runs: list[SweepRun], start: float,
                force: bool) -> SweepResult:
    if not force:
        refuse_replacing(runs)
    dense = {str(r.cfg.model.checkpoint or pipeline.dense_cache_path(r.cfg)) for r in runs}
    log.info("sweep: %d runs under %s, %d dense model(s)", len(runs), root, len(dense))
    plugins_cache: dict[tuple[str, ...], manager.Plugins] = {}
    for i, run in enumerate(runs, 1):
        run.report = None if force else finished_report(run)
        if run.report is not None:
            run.status = "skipped"
            log.info("sweep [%d/%d] %s: finished before, skipped", i, len(runs), run.run_dir.name)
            continue
        log.info("sweep [%d/%d] %s", i, len(runs), run.run_dir.name)
        execute(run, plugins_cache, force)
    result = SweepResult(root, swept, runs)
    result.rows = rows(result)
    write_outputs(result)
    result.seconds = time.perf_counter() - start
    log.info("sweep: %d ran, %d skipped, %d failed in %.1f s", result.count("done"),
             result.count("skipped"), result.count("failed"), result.seconds)
    return result


def rows(result: SweepResult) -> list[dict[str, Any]]:
    out = []
    for run in result.runs:
        if run.report is None:
            continue
        for step in run.report["steps"]:
            seconds = sum(step["timings"].get(k, 0.0) for k in TIMING_KEYS)
            out.append({**run.combo, "target_sparsity": step["target_sparsity"],
                        "sparsity": step["sparsity"], "accuracy": step["accuracy"],
                        "loss": step["loss"], "seconds": seconds,
                        "fallback": fell_back(step)})
    return out


def csv_text(result: SweepResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*result.swept, *METRICS])
    for row in result.rows:
        writer.writerow([*(row[k] for k in result.swept), f"{row['target_sparsity']:g}",
                         f"{row['sparsity']:.6f}",
                         "" if row["accuracy"] is None else f"{row['accuracy']:.4f}",
                         f"{row['loss']:.6f}", f"{row['seconds']:.2f}",
                         str(row["fallback"]).lower()])
    return buf.getvalue()


def lines(result: SweepResult) -> dict[str, list[dict[str, Any]]]:
    """The reports of the finished runs grouped by method label, in sweep order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in result.runs:
        if run.report is not None:
            out.setdefault(method_label(run.combo), []).append(run.report)
    return out


def shown(result: SweepResult) -> str:
    """What the table and the plot show: ``accuracy`` (top-1), or ``loss`` where top-1 does
    not apply to some run (a data set with a loss of its own)."""
    records = [r for run in result.runs if run.report is not None
               for r in (run.report["dense"], *run.report["steps"])]
    return "loss" if any(r["accuracy"] is None for r in records) else "accuracy"


def table(result: SweepResult) -> str:
    """Top-1 accuracy (or the test loss, see ``shown``) by target sparsity (rows) and
    method (columns), Markdown. A cell where the safeguard's fallback replaced the
    method's mask by magnitude pruning's carries ``FALLBACK_MARK``."""
    key = shown(result)
    fmt = ".2%" if key == "accuracy" else ".4f"
    groups = lines(result)
    cells: dict[float, dict[str, str]] = {}
    dense: dict[str, float] = {}
    for label, reports in groups.items():
        for report in reports:
            dense.setdefault(label, report["dense"][key])
            for step in report["steps"]:
                cells.setdefault(step["target_sparsity"], {})[label] = (
                    format(step[key], fmt) + (FALLBACK_MARK if fell_back(step) else ""))
    header = "| sparsity | " + " | ".join(groups) + " |"
    out = [header, "|---:|" + "---:|" * len(groups)]
    out.append("| dense | " + " | ".join(format(dense[g], fmt) for g in groups) + " |")
    for target in sorted(cells):
        row = [cells[target].get(g, "-") for g in groups]
        out.append(f"| {target:.0%} | " + " | ".join(row) + " |")
    return "\n".join(out)


def write_outputs(result: SweepResult) -> None:
    files.write_text(result.root / "results.csv", csv_text(result))
    failed = [r for r in result.runs if r.status == "failed"]
    what = "Top-1 accuracy." if shown(result) == "accuracy" else \
        "Test loss (top-1 does not apply to this data)."
    md = [f"# sweep {result.root.name}", "", what, "", table(result), ""]
    replaced = [r for r in result.rows if r["fallback"]]
    if replaced:
        md += [f"{FALLBACK_MARK} {len(replaced)} cell(s) show magnitude pruning's mask: the "
               "update safeguard's fallback judged it better on the calibration batch than "
               "the method's own (safeguard.fallback=none, or safeguard.enabled=false for "
               "every row, shows each method's own result).", ""]
    if failed:
        md += ["## Failed runs", ""] + [f"- {r.run_dir.name}: {r.error}" for r in failed] + [""]
    files.write_text(result.root / "results.md", "\n".join(md))
    groups = lines(result)
    if groups:
        title = str(result.runs[0].cfg.name)
        plot_accuracy(groups, result.root / "accuracy_vs_sparsity.png", title, shown(result))
        plot_layers(groups, result.root / "layer_sparsity.png")


def plot_accuracy(groups: dict[str, list[dict[str, Any]]], path: Path, title: str,
                  key: str = "accuracy") -> None:
    """Top-1 (``key`` accuracy, in %) or the test loss (``key`` loss) against sparsity, a
    line per method, each distinct dense value dashed."""
    scale = 100 if key == "accuracy" else 1
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = []
    for label, reports in groups.items():
        steps = sorted((s for r in reports for s in r["steps"]),
                       key=lambda s: s["target_sparsity"])
        ax.plot([100 * s["sparsity"] for s in steps], [scale * s[key] for s in steps],
                marker="o", label=label)
        for r in reports:
            if r["dense"][key] not in dense:
                dense.append(r["dense"][key])
    for i, value in enumerate(dense):
        ax.axhline(scale * value, ls="--", color="gray", label="dense" if i == 0 else None)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("top-1 accuracy (%)" if key == "accuracy" else "test loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_layers(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per-layer sparsity of every method at the highest target sparsity, grouped bars."""
    top = max(s["target_sparsity"] for reports in groups.values() for r in reports
              for s in r["steps"])
    layers: dict[str, dict[str, float]] = {}
    for label, reports in groups.items():
        step = next((s for r in reports for s in r["steps"] if s["target_sparsity"] == top),
                    None)
        if step is not None:
            layers[label] = {n: v["sparsity"] for n, v in step["layers"].items()}
    names = list(next(iter(layers.values())))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(len(layers), 2) / 2), 4.5))
    width = 0.8 / len(layers)
    for i, (label, values) in enumerate(layers.items()):
        xs = [j + (i - (len(layers) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * values.get(n, 0.0) for n in names], width, label=label)
    ax.axhline(100 * top, ls="--", color="gray", label=f"target {top:.0%}")
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right"
                  if len(names) > 4 else "center")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer sparsity at {top:.0%} target")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
