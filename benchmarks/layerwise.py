"""Layer-wise pruning (exact_obs, sparsegpt, wanda) against WoodFisher, one-shot, on the
shipped MNIST configs: top-1 of every method at every target, mean over seeds.

Each seed prunes its own dense model (trained once and cached). One JSON line per run,
then one per (config, method, sparsity) summary; ``--markdown`` prints the README table.

    nice -n 5 python benchmarks/layerwise.py --configs mnist_cnn --methods best --seeds 0,1,2
    python benchmarks/layerwise.py --methods wanda-2:4,sparsegpt-2:4 --sparsities 0.5

Runs go to ``--out`` (default runs/layerwise/<config>/<method>/seed<k>); a finished run is
read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from wfcore import config as config_mod
from wfcore import first_line
from wfcore.run import pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WF = ["estimator.guide={name: woodfisher, damp: 0.1, block_size: 500}"]
RECON = ["estimator.allocation=reconstruction", "allocator.name=global"]
WHOLE = ["estimator.block_size=null"]
SEARCH = ["estimator.search=32"]  # the calibration loss search over the curves' counts
CORRECT = ["estimator.correct=true"]  # each layer fitted to the dense model's output
POOL = ["estimator.samples=4000"]  # the whole pruning pool of mnist5k as calibration
# method: overrides of the config (U: uniform; G: global magnitude; @WF: the counts of
# WoodFisher's global threshold; R: the reconstruction-aware allocation; S: with the
# calibration loss search; 4k: the whole pool of 4,000 samples as calibration)
METHODS: dict[str, list[str]] = {
    "magnitude-G": ["estimator.name=magnitude"],
    "woodfisher-G": [],  # the shipped config
    "best": [],  # the shipped config itself (configs/best_oneshot*.yaml)
    "wanda-U": ["estimator.name=wanda", "allocator.name=uniform"],
    "sparsegpt-U": ["estimator.name=sparsegpt", "allocator.name=uniform"],
    "exact_obs-U": ["estimator.name=exact_obs", "allocator.name=uniform"],
    "wanda-G": ["estimator.name=wanda"],
    "sparsegpt-G": ["estimator.name=sparsegpt", *WHOLE],
    "exact_obs-G": ["estimator.name=exact_obs"],
    "sparsegpt@WF": ["estimator.name=sparsegpt", *WF],
    "sparsegpt-whole@WF": ["estimator.name=sparsegpt", *WF, *WHOLE],
    "exact_obs@WF": ["estimator.name=exact_obs", *WF],
    "wanda-R": ["estimator.name=wanda", *RECON],
    "sparsegpt-R": ["estimator.name=sparsegpt", *RECON, *WHOLE],
    "exact_obs-R": ["estimator.name=exact_obs", *RECON],
    "exact_obs-RS": ["estimator.name=exact_obs", *RECON, *SEARCH],
    "exact_obs-RS4k": ["estimator.name=exact_obs", *RECON, *SEARCH, *POOL],
    "exact_obs-R4k": ["estimator.name=exact_obs", *RECON, *POOL],
    "exact_obs-RC": ["estimator.name=exact_obs", *RECON, *CORRECT],
    "exact_obs-RCS": ["estimator.name=exact_obs", *RECON, *CORRECT, *SEARCH],
}
for _name in ("magnitude", "woodfisher", "kfac", "diag_fisher", "wanda", "sparsegpt",
              "exact_obs"):
    METHODS[f"{_name}-2:4"] = [f"estimator.name={_name}", "structure.pattern='2:4'",
                               *(WHOLE if _name == "sparsegpt" else [])]
    # the method's own 2:4 mask even where the safeguard's fallback would choose magnitude's
    METHODS[f"{_name}-2:4-own"] = [*METHODS[f"{_name}-2:4"], "safeguard.fallback=none"]


NOTES = ("One-shot from each seed's own dense model (the shipped config, trained once and "
         "cached), no fine-tuning; top-1 % on the 1,000 test images, mean over the seeds; "
         "`(k)`: only k seeds; `*`: on that many seeds the safeguard kept another mask than "
         "the method's (its magnitude fallback), so the cell is not the method's own. "
         "Methods: `-G` global, `-U` uniform, `@WF` at the counts of WoodFisher's global "
         "threshold, `-R` `allocation: reconstruction`, `-RS` with `search: 32` (the "
         "calibration loss search), `C` with `correct: true` (each layer fitted to the dense "
         "model's output), `4k` the whole pool of 4,000 samples as calibration, "
         "`-2:4` `structure.pattern='2:4'` (the target is not used), `-own` with "
         "`safeguard.fallback=none` (the method's own mask). With `allocation: choose` "
         "(the shipped best configs) the per-seed cells name the allocation the step kept: "
         "`[reconstruction]` the curves' counts, `[guide]` the guide's global threshold.")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def run_one(config: str, method: str, seed: int, sparsities: list[float], out: Path,
            extra: list[str]) -> dict[str, Any]:
    run_dir = out / config / method / f"seed{seed}"
    start = time.perf_counter()
    if not pipeline.is_finished(run_dir):
        overrides = [*METHODS[method], *extra, f"seed={seed}", f"output={run_dir}",
                     f"name={config}-{method}-{seed}", f"scheduler.sparsities={sparsities}"]
        try:
            pipeline.run(config_mod.load(CONFIGS / f"{config}.yaml", overrides), force=True)
        except Exception as exc:  # one failed combination must not stop the table
            return {"config": config, "method": method, "seed": seed,
                    "error": f"{type(exc).__name__}: {first_line(exc)}"}
    report = json.loads((run_dir / "report.json").read_text())
    return {"config": config, "method": method, "seed": seed,
            "dense": report["dense"]["accuracy"], "seconds": time.perf_counter() - start,
            "top1": {f"{s['target_sparsity']:g}": s["accuracy"] for s in report["steps"]},
            "sparsity": {f"{s['target_sparsity']:g}": s["sparsity"] for s in report["steps"]},
            "mask": {f"{s['target_sparsity']:g}": [r.get("mask") for r in s.get("safeguard", [])]
                     for s in report["steps"]},
            # allocation: choose: the allocation each step kept
            "allocation": {f"{s['target_sparsity']:g}": r["allocation_choice"]["allocation"]
                           for s in report["steps"] for r in s.get("safeguard", [])
                           if "allocation_choice" in r}}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[float]] = {}
    runs = [r for r in runs if "error" not in r]
    for r in runs:
        for s, acc in r["top1"].items():
            groups.setdefault((r["config"], r["method"], s), []).append(100 * acc)
    return [{"summary": True, "config": c, "method": m, "sparsity": float(s),
             "seeds": len(a), "mean": statistics.fmean(a), "min": min(a), "max": max(a),
             "fallback": sum(r["mask"][s] != ["scores"] for r in runs
                             if (r["config"], r["method"]) == (c, m))}
            for (c, m, s), a in groups.items()]


def markdown(summary: list[dict[str, Any]]) -> str:
    levels = sorted({s["sparsity"] for s in summary})
    lines = ["| config | method | " + " | ".join(f"{100 * s:g}%" for s in levels) + " |",
             "|---|---|" + "---:|" * len(levels)]
    keys = sorted({(s["config"], s["method"]) for s in summary},
                  key=lambda k: (k[0], list(METHODS).index(k[1])))
    cell = {(s["config"], s["method"], s["sparsity"]): s for s in summary}

    def text(c: dict[str, Any] | None) -> str:
        if c is None:
            return "-"  # a star: the safeguard kept another mask on that many seeds
        return f"{c['mean']:.1f}" + (f" ({c['seeds']})" if c["seeds"] != 3 else "") + \
            ("*" * c["fallback"])

    for c, m in keys:
        row = [text(cell.get((c, m, s))) for s in levels]
        lines.append(f"| {c} | {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="mnist_cnn,mnist_mlpnet")
    ap.add_argument("--methods", default="woodfisher-G,exact_obs@WF,exact_obs-R")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sparsities", default="0.9,0.95,0.98")
    ap.add_argument("--out", default="runs/layerwise")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="only read the finished runs back (run nothing)")
    ap.add_argument("--write", default="",
                    help="write the table into docs/results.md under this section name")
    ap.add_argument("--title", default="Layer-wise pruners, one-shot")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    runs = []
    for config in args.configs.split(","):
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                finished = pipeline.is_finished(Path(args.out) / config / method / f"seed{seed}")
                if args.collect and not finished:
                    continue
                runs.append(run_one(config, method, seed, sparsities, Path(args.out),
                                    args.overrides))
                emit(runs[-1])
    summary = summarise(runs)
    for s in summary:
        emit(s)
    if args.markdown or args.write:
        print(markdown(summary))
    if args.write:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_doc import write_section

        per_seed = "; ".join(
            f"{r['config']} {r['method']} seed {r['seed']} (dense {100 * r['dense']:.1f}): "
            + ", ".join(
                f"{100 * float(s):g}% {100 * a:.1f}"
                + (f" [{r['allocation'][s]}]" if s in r.get("allocation", {}) else "")
                for s, a in r["top1"].items())
            for r in runs if "top1" in r)
        failed = "; ".join(f"{r['config']} {r['method']} seed {r['seed']}: {r['error']}"
                           for r in runs if "error" in r)
        write_section(args.write, args.title, markdown(summary), notes=NOTES + (
            f"\n\nPer seed: {per_seed}." if per_seed else "") + (
            f"\n\nFailed: {failed}." if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
