"""report.json, report.md and the accuracy-vs-sparsity plot of a run directory.

The files are rewritten atomically after each step, so an interrupted run still has a
valid report of the steps it finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wfcore import files
from wfcore.run import directory as rundir

TIMING_KEYS = ("gradients", "estimate", "prune", "finetune", "evaluate")


class Report:
    def __init__(self, run_dir: str | Path, config: dict[str, Any], write: bool = True):
        self.run_dir = Path(run_dir)
        self.writes = write  # False on the ranks but 0 of a distributed run: data only
        self.data: dict[str, Any] = {"name": config.get("name"), "config": config,
                                     "dense": {}, "steps": [], "epochs": [],
                                     "finished": False}

    def set_dense(self, **values: Any) -> None:
        self.data["dense"] = values
        self.write()

    def add_step(self, record: dict[str, Any]) -> None:
        self.data["steps"].append(record)
        self.write()

    def add_epoch(self, record: dict[str, Any]) -> None:
        """One fine-tuning epoch: epoch, step, lr, train_loss, accuracy, loss, sparsity."""
        self.data.setdefault("epochs", []).append(record)
        self.write()

    def finish(self) -> None:
        self.data["finished"] = True
        self.write()
        if not self.writes:
            return
        plot_accuracy(self.data, self.run_dir / "accuracy_vs_sparsity.png")
        plot_epochs(self.data, self.run_dir / "epochs.png")

    def write(self) -> None:
        if not self.writes:
            return
        files.write_json(self.run_dir / rundir.REPORT, self.data)
        files.write_text(self.run_dir / "report.md", markdown(self.data))


def table(report: dict[str, Any]) -> str:
    """The steps as a Markdown table, dense first."""
    dense = report.get("dense", {})
    rows = ["| step | target | sparsity | top-1 | loss | seconds |",
            "|---:|---:|---:|---:|---:|---:|"]
    if dense:
        rows.append(f"| dense | - | 0.00% | {number(dense['accuracy'], '.2%')} | "
                    f"{number(dense['loss'], '.4f')} | - |")
    for s in report.get("steps", []):
        seconds = sum(s["timings"].get(k, 0.0) for k in TIMING_KEYS)
        rows.append(f"| {s['index']} | {s['target_sparsity']:.2%} | {s['sparsity']:.2%} | "
                    f"{number(s['accuracy'], '.2%')} | {number(s['loss'], '.4f')} | "
                    f"{seconds:.1f} |")
    return "\n".join(rows)


def markdown(report: dict[str, Any]) -> str:
    cfg = report.get("config", {})
    lines = [f"# {report.get('name')}", ""]
    for key in ("estimator", "scorer", "allocator", "scheduler"):
        section = cfg.get(key) or {}
        opts = ", ".join(f"{k}={v}" for k, v in section.items() if k != "name")
        lines.append(f"- **{key}**: {section.get('name')}" + (f" ({opts})" if opts else ""))
    model, data = cfg.get("model", {}), cfg.get("data", {})
    lines.append(f"- **model**: {model.get('name')} on {data.get('name')}")
    dense = report.get("dense", {})
    if dense:
        lines.append(f"- **prunable weights**: {dense.get('prunable')} of {dense.get('params')}")
    lines += prunable_lines(report.get("prunable"))
    pool = report.get("pruning_data")
    if pool and pool.get("train_fraction", 1.0) < 1.0:
        lines.append(f"- **pruning data**: {pool['samples']} of {pool['of']} training samples "
                     f"(fraction {pool['train_fraction']:g}, seed {pool['seed']}; fine-tuning "
                     f"on {pool.get('finetune', 'all')})")
    lines += ["", table(report), ""]
    steps = report.get("steps", [])
    lines += safeguard_table(steps)
    warned = [(s["index"], w) for s in steps for w in s.get("warnings", [])]
    if warned:
        lines += ["## Warnings", "", *[f"- step {i}: {w}" for i, w in warned], ""]
    if steps:
        last = steps[-1]
        lines += [f"## Layers at step {last['index']}", "", "| parameter | weights | sparsity |",
                  "|---|---:|---:|"]
        lines += [f"| {n} | {v['numel']} | {v['sparsity']:.2%} |"
                  for n, v in last["layers"].items()]
        lines.append("")
    epochs = report.get("epochs", [])
    if epochs:
        lines += ["## Fine-tuning epochs", "", "| epoch | step | lr | train loss | sparsity | "
                  "top-1 | loss |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {e['epoch']} | {e['step']} | {e['lr']:.3g} | {e['train_loss']:.4f} | "
                  f"{e['sparsity']:.2%} | {number(e['accuracy'], '.2%')} | "
                  f"{number(e['loss'], '.4f')} |"
                  for e in epochs]
        lines.append("")
    if report.get("export", {}).get("error"):
        lines += ["## Export", "", f"Failed: {report['export']['error']}. The pruned steps are "
                  f"saved; `{report['export'].get('redo', 'wfcore export RUN')}` exports them.",
                  ""]
    elif report.get("export"):
        lines += ["## Export", "", export_table(report["export"]), ""]
    if not report.get("finished"):
        lines.append("_Run in progress or interrupted._\n")
    return "\n".join(lines)


def prunable_lines(info: dict[str, Any] | None) -> list[str]:
    """What the sparsity is measured over and what is excluded, with why (list items)."""
    if not info:
        return []
    from wfcore.prunable import summary_lines

    return [f"- **{line.split(':', 1)[0]}**:{line.split(':', 1)[1]}"
            for line in summary_lines(info, names=6)]


def number(value: float | None, fmt: str) -> str:
    """``value`` formatted, or ``-`` where it does not apply (None)."""
    return "-" if value is None else format(value, fmt)


def safeguard_table(steps: list[dict[str, Any]]) -> list[str]:
    """Each pruning (sub-)step's damp, alpha and loss increases, as Markdown lines."""
    rows = [(s["index"], r) for s in steps for r in s.get("safeguard", [])]
    if not rows:
        return []
    lines = ["## Update safeguard", "",
             "Loss increases on the calibration batch (training split); predicted by the "
             "quadratic model.", "",
             "| step | target | damp | mask | alpha | predicted increase | actual increase |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {i} | {r['target_sparsity']:.2%} | {number(r['damp'], '.3g')} | "
              f"{r.get('mask', 'scores')} | {number(r['alpha'], 'g')} | "
              f"{number(r['predicted_increase'], '.4g')} | "
              f"{number(r['actual_increase'], '.4g')} |" for i, r in rows]
    return [*lines, ""]


def export_table(export: dict[str, Any]) -> str:
    """The exported files: sparsity, zeros kept and, with INT8, top-1 (ONNX Runtime, test).

    An exporter's result may lack any of these keys (they are the onnx exporter's): "-".
    """
    rows = ["| file | weights | sparsity | zeros kept | top-1 (ONNX Runtime) |",
            "|---|---|---:|---:|---:|"]
    for entry in (export, export.get("dense")):
        if not entry:
            continue
        sparsity = f"{entry['sparsity']:.2%}" if "sparsity" in entry else "-"
        for r, kind in ((entry, "float32"), (entry.get("quantized"), "int8")):
            if r:
                name = Path(r["path"]).name if "path" in r else "-"
                zeros = r.get("zeros")
                kept = f"{zeros['kept_zeros']}/{zeros['torch_zeros']}" if zeros else "-"
                top1 = f"{r['top1']:.2%}" if "top1" in r else "-"
                rows.append(f"| {name} | {kind} | {sparsity} | {kept} | {top1} |")
    return "\n".join(rows)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file, then rename) and close it."""
    with files.temporary(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
        pyplot().close(fig)
        tmp.replace(path)
    return path


def plotted(records: list[dict[str, Any]]) -> tuple[Callable[[dict[str, Any]], float], str]:
    """What a plot of ``records`` (dense, steps, epochs) shows, and its axis label: top-1 in
    %, or the test loss where top-1 does not apply (a data set with a loss of its own)."""
    if any(r.get("accuracy") is None for r in records):
        return (lambda r: r["loss"]), "test loss"
    return (lambda r: 100 * r["accuracy"]), "top-1 accuracy (%)"


def plot_accuracy(report: dict[str, Any], path: Path) -> Path | None:
    """Top-1 (or the loss, see ``plotted``) against sparsity for the run's steps, the dense
    model's dashed."""
    steps = report.get("steps", [])
    if not steps:
        return None
    dense = report.get("dense", {})
    if dense.get("loss") is None:  # no test set (wfcore.prune without one): nothing to plot
        return None
    value, label = plotted([*steps, *([dense] if dense else [])])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * s["sparsity"] for s in steps]
    ax.plot(xs, [value(s) for s in steps], marker="o",
            label=report["config"]["estimator"]["name"])
    if dense:
        ax.axhline(value(dense), ls="--", color="gray", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(label)
    ax.set_title(str(report.get("name")))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_epochs(report: dict[str, Any], path: Path) -> Path | None:
    """Top-1 accuracy (or the loss, see ``plotted``) and sparsity against fine-tuning
    epochs (gradual runs)."""
    epochs = report.get("epochs", [])
    if not epochs:
        return None
    dense = report.get("dense", {})
    if dense.get("loss") is None:  # no test set: nothing to plot
        return None
    value, label = plotted([*epochs, *([dense] if dense else [])])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [e["epoch"] for e in epochs]
    ax.plot(xs, [value(e) for e in epochs], marker=".", color="C0", label=label)
    if dense:
        ax.axhline(value(dense), ls="--", color="gray", label="dense")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(label, color="C0")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.step(xs, [100 * e["sparsity"] for e in epochs], where="post", color="C3",
               label="sparsity")
    right.set_ylabel("sparsity (%)", color="C3")
    right.set_ylim(0, 100)
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="lower left")
    ax.set_title(str(report.get("name")))
    fig.tight_layout()
    return save_figure(fig, path)
