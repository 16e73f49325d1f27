"""The comparison of docs/results.md: every registered estimator, global and uniform allocation,
one-shot at 50-95% (98% on MLPNet), seeds 0-2, on the shipped models and the robustness
models, with the time of each step.

The estimators are read from the plugin registry at run time, so one registered later
(a plugin package, or a built-in added since: exact_obs, sparsegpt, wanda, ...) is in the
table without a change here. Each (model, estimator, allocator, seed) is one ordinary
run with the model's config (``configs/<model>.yaml``) and the shipped defaults (update
safeguard on); a cell whose mask the safeguard's magnitude fallback chose is marked ``†``
(count in the JSON), and ``--no-safeguard`` turns the safeguard off for every run.

Prints one JSON line per run, one per (model, estimator, allocator, sparsity) summary
(mean, std, min, max of top-1 over the seeds, mean seconds of the step, fallbacks), and
with ``--markdown`` the table on stderr.

    nice -n 10 python benchmarks/comparison.py --markdown             # everything: hours
    python benchmarks/comparison.py --models mnist_cnn --seeds 0 --sparsities 0.9,0.95

Runs go to ``--out`` (default runs/comparison/<model>/<estimator>-<allocator>/seed<k>); a
finished run is read back, not run again, so the command can be stopped and restarted.
A run that fails is one JSON line with its error; the others go on.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from wfcore import config as config_mod
from wfcore import first_line, manager
from wfcore.run import pipeline

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # model: its config under configs/
    "mlpnet": "mnist_mlpnet.yaml", "mnist_cnn": "mnist_cnn.yaml", "bn_cnn": "bn_cnn.yaml",
    "mobilenet_tiny": "mobilenet_tiny.yaml", "vit_tiny": "vit_tiny.yaml",
}
SPARSITIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
EXTRA = {"mlpnet": [0.98]}  # sparsities added for a model
ALLOCATORS = ["global", "uniform"]
STAGES = ("gradients", "estimate", "prune")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def registered_estimators() -> list[str]:
    return manager.build([]).registry("estimators").names()


class Unfinished(Exception):
    """A run read back (``--collect``) that stopped before its last target."""


def run_one(model: str, estimator: str, allocator: str, seed: int, sparsities: list[float],
            out: Path, safeguard: bool, collect: bool = False) -> dict[str, Any]:
    """One combination, run (or read back); a run refused at some target (a degenerate
    model) keeps the targets it finished, with the error beside them."""
    run_dir = out / model / f"{estimator}-{allocator}" / f"seed{seed}"
    record: dict[str, Any] = {"model": model, "estimator": estimator, "allocator": allocator,
                              "seed": seed}
    try:
        if not pipeline.is_finished(run_dir) and collect:
            raise Unfinished("did not finish (run it without --collect to see why)")
        if not pipeline.is_finished(run_dir):
            overrides = [f"estimator.name={estimator}", f"allocator.name={allocator}",
                         "scheduler.name=oneshot", f"scheduler.sparsities={sparsities}",
                         f"seed={seed}", f"output={run_dir}", "export=null",
                         f"name={model}-{estimator}-{allocator}-{seed}"]
            if not safeguard:
                overrides.append("safeguard.enabled=false")
            pipeline.run(config_mod.load(ROOT / "configs" / MODELS[model], overrides),
                         force=True)
        report = json.loads((run_dir / "report.json").read_text())
    except Exception as exc:  # one failed combination must not stop the table
        record["error"] = (str(exc) if isinstance(exc, Unfinished)
                           else f"{type(exc).__name__}: {first_line(exc)}")
        try:  # the targets it finished before the failure
            report = json.loads((run_dir / "report.json").read_text())
        except (OSError, ValueError):
            return record
        if not report.get("steps"):
            return record
    steps = report["steps"]
    return {**record, "dense": report["dense"]["accuracy"],
            "top1": {f"{s['target_sparsity']:g}": s["accuracy"] for s in steps},
            "seconds": {f"{s['target_sparsity']:g}": sum(s["timings"][k] for k in STAGES)
                        for s in steps},
            "fallback": {f"{s['target_sparsity']:g}": any(r.get("mask", "scores") != "scores"
                                                          for r in s.get("safeguard", []))
                         for s in steps}}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str], list[tuple[float, float, bool]]] = {}
    for r in runs:
        for s, acc in r.get("top1", {}).items():
            key = (r["model"], r["estimator"], r["allocator"], s)
            groups.setdefault(key, []).append((100 * acc, r["seconds"][s], r["fallback"][s]))
    out = []
    for (model, est, alloc, s), cells in groups.items():
        accs = [a for a, _, _ in cells]
        out.append({"summary": True, "model": model, "estimator": est, "allocator": alloc,
                    "sparsity": float(s), "seeds": len(cells), "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "min": min(accs), "max": max(accs),
                    "seconds": statistics.fmean(t for _, t, _ in cells),
                    "fallbacks": sum(f for _, _, f in cells)})
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    """Rows (model, estimator, allocator), columns the sparsities: mean top-1 (%) over the
    seeds, ``†`` where the fallback chose the mask in some seed, ``(k)`` where only k seeds
    reached that target (the others were refused before it); then seconds per step."""
    full = max(s["seeds"] for s in summary)
    cell = {(s["model"], s["estimator"], s["allocator"], s["sparsity"]): s for s in summary}
    sparsities = sorted({s["sparsity"] for s in summary})
    rows = list(dict.fromkeys((s["model"], s["estimator"], s["allocator"]) for s in summary))
    head = " | ".join(f"{s:.0%}" for s in sparsities)
    lines = [f"| model | estimator | allocator | {head} | s/step |",
             "|---|---|---|" + "---:|" * (len(sparsities) + 1)]
    for model, est, alloc in rows:
        cells = [cell.get((model, est, alloc, s)) for s in sparsities]
        text = ["-" if c is None else f"{c['mean']:.1f}" + ("†" if c["fallbacks"] else "")
                + (f" ({c['seeds']})" if c["seeds"] < full else "") for c in cells]
        seconds = statistics.fmean(c["seconds"] for c in cells if c is not None)
        lines.append(f"| {model} | {est} | {alloc} | " + " | ".join(text) + f" | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--estimators", default="", help="default: every registered estimator")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sparsities", default="", help="default: 50-95%% (and 98%% on MLPNet)")
    ap.add_argument("--out", type=Path, default=Path("runs/comparison"))
    ap.add_argument("--no-safeguard", action="store_true", help="safeguard.enabled=false")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table too")
    ap.add_argument("--collect", action="store_true",
                    help="only read the finished runs back (run nothing)")
    ap.add_argument("--title", default="Every estimator, global and uniform, one-shot",
                    help="the title of the docs/results.md section")
    ap.add_argument("--write", default="",
                    help="write the table into docs/results.md under this section name")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    estimators = args.estimators.split(",") if args.estimators else registered_estimators()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for model in models:
            sparsities = ([float(s) for s in args.sparsities.split(",")] if args.sparsities
                          else SPARSITIES + EXTRA.get(model, []))
            for estimator in estimators:
                for allocator in args.allocators.split(","):
                    run_dir = args.out / model / f"{estimator}-{allocator}" / f"seed{seed}"
                    done = pipeline.is_finished(run_dir)
                    if args.collect and not done and not (run_dir / "report.json").is_file():
                        continue
                    runs.append(run_one(model, estimator, allocator, seed, sparsities,
                                        args.out, not args.no_safeguard, args.collect))
                    emit(runs[-1])
    summary = summarise(runs)
    for s in summary:
        emit(s)
    if args.markdown:
        print(markdown(summary), file=sys.stderr)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_doc import write_section

        seeds = sorted({r["seed"] for r in runs if "top1" in r})
        failed = "; ".join(f"{r['model']} {r['estimator']} {r['allocator']} seed {r['seed']}: "
                           f"{r['error']}" for r in runs if "error" in r)
        notes = ("One-shot from each seed's dense model of the model's shipped config, the "
                 "shipped defaults (update safeguard on), top-1 % on the 1,000 test images, "
                 f"mean over seeds {', '.join(map(str, seeds))}; `†`: in some seed the "
                 "safeguard's magnitude fallback chose the mask (never for `random` or "
                 "`magnitude`); s/step: mean seconds of gradients + estimate + prune per "
                 "target on the machine above, under load from other jobs. The layer-wise "
                 "estimators (`exact_obs`, `sparsegpt`, `wanda`) run with their defaults "
                 "here: `global` = global magnitude's per-layer counts, `uniform` = the "
                 "target in every layer. `(k)`: only k seeds reached that target; `-`: none "
                 "did (each run stopped there is listed below).")
        if failed:
            notes += f"\n\nStopped: {failed}."
        write_section(args.write, args.title,
                      markdown(summary), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
