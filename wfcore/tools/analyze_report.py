"""analysis.md and the PNG plots of `wfcore analyze` (from the analysis.json result)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from wfcore.run.report import pyplot, save_figure

INVERSE_COLUMNS = (("diag_rel_error", "diag rel. error"),
                   ("ihvp_random_rel_error", "IHVP rel. error (random v)"),
                   ("ihvp_random_cos", "IHVP cosine (random v)"),
                   ("ihvp_gradient_rel_error", "IHVP rel. error (gradient v)"),
                   ("ihvp_gradient_cos", "IHVP cosine (gradient v)"))


def label(row: dict[str, Any]) -> str:
    name = row["curvature"]
    return f"{name} (exact)" if row["m"] is None else f"{name}, m={row['m']}"


def largest_m(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The exact references and every estimator at its largest m."""
    top = max((r["m"] for r in result["results"] if r["m"] is not None), default=None)
    return [r for r in result["results"] if r["m"] in (None, top)]


def inverse_table(result: dict[str, Any], ref: str) -> list[str]:
    lines = ["| curvature | m | " + " | ".join(t for _, t in INVERSE_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(INVERSE_COLUMNS)]
    for r in result["results"]:
        if r["curvature"] == ref:
            continue
        values = r["inverse"][ref]
        lines.append(f"| {r['curvature']} | {r['m'] or 'exact'} | " +
                     " | ".join(f"{values[k]:.3g}" for k, _ in INVERSE_COLUMNS) + " |")
    return lines


def obs_table(result: dict[str, Any]) -> list[str]:
    sparsities = result["config"]["analyze"]["sparsities"]
    head = ["Spearman"] + [f"rank err. {s:.0%}" for s in sparsities] + [
        f"set {s:.0%}: predicted / Taylor / actual" for s in sparsities]
    lines = ["| curvature | m | " + " | ".join(head) + " |",
             "|---|---:|" + "---:|" * len(head)]
    for r in result["results"]:
        single = r["single"]
        cells = [f"{single['spearman']:.3f}"]
        cells += [f"{single['ranking_error'][str(s)]:.2f}" for s in sparsities]
        cells += ["n/a" if "error" in s else
                  f"{s['predicted']:.3g} / {s['taylor']:.3g} / {s['actual']:.3g}"
                  for s in r["sets"]]
        lines.append(f"| {r['curvature']} | {r['m'] or 'exact'} | " + " | ".join(cells) + " |")
    return lines


def summary_table(result: dict[str, Any]) -> list[str]:
    """Against the exact Hessian, grouped by m: IHVP errors and the single-weight Spearman."""
    lines = ["| m | curvature | IHVP rel. error, random v | IHVP rel. error, gradient v | "
             "IHVP cosine, gradient v | Spearman, single weights |",
             "|---:|---|---:|---:|---:|---:|"]
    rows = sorted(result["results"], key=lambda r: (r["m"] is None, r["m"] or 0))
    for r in rows:
        if r["curvature"] == "hessian":
            continue
        h = r["inverse"]["hessian"]
        lines.append(f"| {r['m'] or 'exact'} | {r['curvature']} | "
                     f"{h['ihvp_random_rel_error']:.3f} | {h['ihvp_gradient_rel_error']:.3f} | "
                     f"{h['ihvp_gradient_cos']:.3f} | {r['single']['spearman']:.3f} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    a = result["config"]["analyze"]
    h = result["spectra"]["hessian"]
    params = ", ".join(f"{n} ({k})" for n, k in result["params"].items())
    lines = [f"# Curvature analysis: {result['name']}", "",
             f"- **analysed**: {params}: {result['plan']['weights']} weights, the rest fixed",
             f"- **exact curvatures** over {result['samples']} training samples (loss "
             f"{result['loss']:.4f}), damped by {a['damp']:g} before inverting",
             f"- **Hessian spectrum**: {h['min']:.3g} to {h['max']:.3g}, {h['negative']} "
             f"negative eigenvalues ({h['negative_mass']:.1%} of the absolute mass)"
             + (", clipped to zero" if a["psd"] else ""),
             f"- **estimators**: {', '.join(a['estimators'])} at m = "
             f"{', '.join(map(str, a['num_grads']))}; scorer "
             f"{result['config']['scorer']['name']}, allocator "
             f"{result['config']['allocator']['name']}",
             f"- {result['seconds']:.0f} s in all", "", "## Summary", ""]
    lines += summary_table(result)
    lines += ["", "## Inverse against the exact Hessian", "",
              "Medians over the directions: (H + damp I)^-1 v against F^-1 v.", ""]
    lines += inverse_table(result, "hessian")
    lines += ["", "## The OBS question", "",
              "Single weights: Spearman correlation of the predicted w_q^2 / (2 [F^-1]_qq) "
              "with the actual loss increase after the single-weight OBS update; rank error: "
              "the fraction of the lowest-predicted weights that the actual increases do not "
              "also rank lowest. Sets: the scorer's summed scores and the actual loss increase "
              "after the allocator's pruning and the scorer's update; Taylor: "
              "0.5 dw^T H dw + g^T dw of that update with the exact H and gradient g. "
              "n/a: the curvature has no such "
              "update (see analysis.json).", ""]
    lines += obs_table(result)
    for ref in ("empirical_fisher", "true_fisher"):
        lines += ["", f"## Inverse against the exact {ref.replace('_', ' ')}", ""]
        lines += inverse_table(result, ref)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result.get("plots", [])] + [""]
    return "\n".join(lines)


def plot_heatmaps(blocks: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """One block of each curvature side by side, each on its own symmetric colour scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks), 3.4), squeeze=False)
    for ax, (name, block) in zip(axes[0], blocks.items(), strict=True):
        vmax = float(np.abs(block).max()) or 1.0
        ax.imshow(block, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_errors(result: dict[str, Any], path: Path) -> Path:
    """IHVP and diagonal errors against the Hessian, and the rank correlation, against m."""
    plt = pyplot()
    panels = [("ihvp_random_rel_error", "IHVP rel. error, random v"),
              ("ihvp_gradient_rel_error", "IHVP rel. error, gradient v"),
              ("diag_rel_error", "diag(F^-1) rel. error"), ("spearman", "single-weight Spearman")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        def value(r: dict[str, Any], k: str = key) -> float:
            return r["single"]["spearman"] if k == "spearman" else r["inverse"]["hessian"][k]

        names = dict.fromkeys(r["curvature"] for r in result["results"] if r["m"] is not None)
        for i, name in enumerate(names):
            rows = [r for r in result["results"] if r["curvature"] == name]
            ax.plot([r["m"] for r in rows], [value(r) for r in rows], marker="o",
                    color=f"C{i}", label=name)
        for i, r in enumerate(r for r in result["results"] if r["m"] is None):
            if r["curvature"] != "hessian" or key == "spearman":
                ax.axhline(value(r), ls="--", color=f"C{len(names) + i}",
                           label=f"{r['curvature']} (exact)")
        ax.set_xscale("log")
        ax.set_xlabel("m (gradients)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def linthresh(values: list[float]) -> float:
    """The linear range of a symlog axis: the 5th percentile of the nonzero magnitudes."""
    nonzero = np.abs(np.asarray(values))[np.asarray(values) != 0]
    return float(np.percentile(nonzero, 5)) if len(nonzero) else 1.0


def scatter(ax, x: list[float], y: list[float], **kwargs) -> None:
    """Predicted (x) against actual (y) with the line y = x; log or symlog axes."""
    ax.scatter(x, y, **kwargs)
    if min(x) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
    else:
        ax.set_xscale("symlog", linthresh=linthresh(x))
    ax.set_yscale("symlog", linthresh=linthresh(y))
    positive = [v for v in x if v > 0]
    if positive:
        ax.plot([min(positive), max(positive)], [min(positive), max(positive)], color="gray",
                lw=0.8, ls="--")
    ax.grid(alpha=0.3)


def plot_single(result: dict[str, Any], path: Path) -> Path:
    """Predicted against actual loss increase of single weights, one panel per curvature."""
    plt = pyplot()
    rows = largest_m(result)
    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.3 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        scatter(ax, r["single"]["predicted"], r["single"]["actual"], s=4, alpha=0.5)
        ax.set_title(f"{label(r)}\nSpearman {r['single']['spearman']:.3f}", fontsize=9)
        ax.set_xlabel("predicted increase", fontsize=8)
        ax.set_ylabel("actual increase", fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sets(result: dict[str, Any], path: Path) -> Path:
    """Predicted against actual loss increase of the pruned sets, one marker per sparsity."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs: list[float] = []
    ys: list[float] = []
    for i, r in enumerate(largest_m(result)):
        sets = [s for s in r["sets"] if "error" not in s]
        x, y = [s["predicted"] for s in sets], [s["actual"] for s in sets]
        ax.plot(x, y, marker="o", color=f"C{i}", label=label(r))
        xs, ys = xs + x, ys + y
    if xs:
        scatter(ax, xs, ys, s=0)
    ax.set_xlabel("predicted increase (summed scores)")
    ax.set_ylabel("actual increase")
    ax.set_title("pruned sets at " + ", ".join(
        f"{s:.0%}" for s in result["config"]["analyze"]["sparsities"]), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_all(result: dict[str, Any], heatmaps: dict[str, np.ndarray], run_dir: Path) -> list[str]:
    """Every plot into ``run_dir``; returns the file names."""
    h = result["heatmap"]
    title = f"{h['param']}: its first {h['size']} weights (row-major)"
    paths = [plot_heatmaps(heatmaps, title, run_dir / "heatmaps.png"),
             plot_errors(result, run_dir / "errors_vs_m.png"),
             plot_single(result, run_dir / "obs_single.png"),
             plot_sets(result, run_dir / "obs_sets.png")]
    return [p.name for p in paths]
