"""WoodFisher at the paper's ResNet-50 scale on one machine: one JSON line.

torchvision's ResNet-50 (25.5M prunable weights, randomly initialised: the dense model is
"trained" for 0 epochs, which changes no cost) on fake 224x224 data, pruned one-shot to
90% with global allocation: m = 400 per-sample gradients (grad_batch 1) in a float16
gradient store, blocks of 2000, absolute damp 1e-5, float64 solves, ``obs`` with the joint
update (the paper's setting: no update safeguard unless ``--safeguard``).
The run goes through the ordinary pipeline (``wfcore.run.pipeline.run``), so the plan, the
store and the chunked solves are the ones a user gets.

Prints ``seconds`` per stage (gradients, estimate, prune), ``peak_rss_gb`` (the process's
peak resident set), ``store_gb``, ``store`` (memory | disk), ``d``, ``m``, the plan's
estimate (in all, and per stage in ``planned_s`` beside the measured ``seconds``), how the
per-sample gradients were taken (``gradient_method``: the calibrated choice), the sparsity
reached and the wall time. ``--quick``: m = 16 (a CI-sized check of
the same path). ``--model`` and ``--num-grads`` give a reduced setting of the same
pipeline (e.g. torchvision:resnet18, m = 100) for checking the plan per stage where the
paper's would take too long; ``--results`` writes the run's plan-against-measured table into
docs/results.md (``--results-name`` names the section).

    .venv/bin/python benchmarks/scale.py [--quick] [--num-grads M] [--max-memory-gb G]
        [--device cuda] [--model torchvision:resnet18] [--results]
        [--runs 2 [--evict-gb 10]]

``--runs N`` runs the step N times, each in a process of its own under ``/usr/bin/time -v``
(the peak RSS measured from outside), with the page cache dropped between them (or, where
that is not allowed, ``--evict-gb`` GiB of another file written and read), and prints the
slowest total over the fastest; ``--results`` then writes one table of all the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wfcore import config
from wfcore.run import pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="m = 16 instead of 400")
    parser.add_argument("--num-grads", type=int, help="m (default 400, or 16 with --quick)")
    parser.add_argument("--max-memory-gb", type=float,
                        help="estimator.max_memory_gb (default: a quarter of free memory)")
    parser.add_argument("--device", default="cpu",
                        help="device of the run: cpu (the paper's one-machine setting) | cuda")
    parser.add_argument("--store", default="auto", help="fisher.store: auto | memory | disk")
    parser.add_argument("--store-dir", help="fisher.store_dir (default: the run directory)")
    parser.add_argument("--safeguard", action="store_true",
                        help="also run the update safeguard (off: the paper's plain OBS step)")
    parser.add_argument("--calibration-samples", type=int, default=256,
                        help="safeguard.calibration_samples with --safeguard")
    parser.add_argument("--model", default="torchvision:resnet50",
                        help="model.name (a reduced setting: e.g. torchvision:resnet18)")
    parser.add_argument("--results", action="store_true",
                        help="write the plan-against-measured table into docs/results.md")
    parser.add_argument("--results-name", default="scale",
                        help="the section of docs/results.md that --results writes")
    parser.add_argument("--runs", type=int, default=1,
                        help="run the step this many times, each in a process of its own "
                             "under /usr/bin/time -v (peak RSS from outside), the page cache "
                             "dropped between them (or --evict-gb read); one table of all")
    parser.add_argument("--evict-gb", type=float, default=10.0,
                        help="with --runs, where the page cache cannot be dropped: GiB of "
                             "another file read between the runs")
    args = parser.parse_args()
    if args.runs > 1:
        return repeated(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    m = args.num_grads or (16 if args.quick else 400)
    with tempfile.TemporaryDirectory(prefix="wfcore-scale-") as tmp:
        overrides = [
            "name=scale", f"output={tmp}/run", f"cache_dir={tmp}/cache", f"device={args.device}",
            f"model.name={args.model}",
            "data.name=fake", "data.batch_size=32", f"data.options.train_size={max(m, 64)}",
            "data.options.test_size=32",
            "train.epochs=0",
            f"fisher.num_grads={m}", "fisher.grad_batch=1", "fisher.storage_dtype=float16",
            f"fisher.store={args.store}",
            "estimator.name=woodfisher", "estimator.damp=1e-5", "estimator.damp_mode=absolute",
            "estimator.block_size=2000",
            "estimator.form=auto", "estimator.dtype=float64",
            "scorer.name=obs", "scorer.update=joint", "allocator.name=global",
            "scheduler.name=oneshot", "scheduler.sparsities=[0.9]",
            f"safeguard.enabled={str(args.safeguard).lower()}",
            f"safeguard.calibration_samples={args.calibration_samples}",
        ]
        if args.max_memory_gb is not None:
            overrides.append(f"estimator.max_memory_gb={args.max_memory_gb}")
        if args.store_dir:
            overrides.append(f"fisher.store_dir={args.store_dir}")
        cfg = config.load(None, overrides)
        start = time.perf_counter()
        report = pipeline.run(cfg)
        wall = time.perf_counter() - start
        step = report["steps"][0]
        plan = report["plan"]
    timings = step["timings"]
    stages = ("gradients", "estimate", "prune")
    planned = plan["stages"]
    result = {
        "benchmark": "scale", "model": args.model, "quick": args.quick,
        "device": args.device,
        "seconds": {k: round(timings[k], 1) for k in stages},
        # the plan's prediction per stage (report.json's plan.stages), beside the measured
        # seconds above, and planned / measured per stage and in all
        "planned_s": {k: round(planned[k], 1) for k in stages},
        "planned_over_measured": {
            **{k: round(planned[k] / timings[k], 2) for k in stages},
            "total": round(sum(planned[k] for k in stages) / sum(timings[k] for k in stages),
                           2)},
        "estimate_plus_prune_s": round(timings["estimate"] + timings["prune"], 1),
        "total_s": round(sum(timings[k] for k in stages), 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "store_gb": round(plan["store_bytes"] / 2**30, 2), "store": plan["store_place"],
        "store_passes": plan.get("store_passes", 0.0),
        "d": plan["d"], "m": plan["m"], "block_size": 2000, "damp": 1e-5, "dtype": "float64",
        "sparsity": round(step["sparsity"], 4), "safeguard": args.safeguard,
        "gradient_method": step.get("safeguard", [{}])[0].get("gradient_method"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(wall, 1),
    }
    if args.results:
        from results_doc import write_section

        rows = "\n".join(f"| {k} | {planned[k]:.1f} | {timings[k]:.1f} | "
                         f"{planned[k] / timings[k]:.2f} |" for k in stages)
        total_p, total_m = (sum(planned[k] for k in stages), sum(timings[k] for k in stages))
        table = ("| stage | planned s | measured s | planned / measured |\n|---|---|---|---|\n"
                 f"{rows}\n| total | {total_p:.1f} | {total_m:.1f} | {total_p / total_m:.2f} |")
        write_section(args.results_name,
                      f"Plan against measured, {args.model}, m = {m}, "
                      f"{result['store_gb']} GiB store on {result['store']}", table,
                      notes=f"peak RSS {result['peak_rss_gb']} GiB (this process), "
                            f"load average at the end {result['load_average']}.")
    print(json.dumps(result))
    return 0


def drop_page_cache(evict_gb: float, directory: str) -> str:
    """Empty the page cache (root: /proc/sys/vm/drop_caches), else read ``evict_gb`` GiB of
    another file through it; says which."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache dropped"
    except OSError:
        pass
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        block = os.urandom(2**20)
        for _ in range(int(evict_gb * 1024)):
            f.write(block)
        f.flush()
        f.seek(0)
        while f.read(64 * 2**20):
            pass
    return f"{evict_gb:g} GiB of another file written and read"


def repeated(args: argparse.Namespace) -> int:
    """``--runs N``: the step N times, each in its own process under /usr/bin/time -v."""
    own = ["--model", args.model, "--device", args.device, "--store", args.store,
           "--calibration-samples", str(args.calibration_samples)]
    for flag, value in (("--num-grads", args.num_grads), ("--store-dir", args.store_dir),
                        ("--max-memory-gb", args.max_memory_gb)):
        own += [flag, str(value)] if value is not None else []
    own += ["--quick"] * args.quick + ["--safeguard"] * args.safeguard
    results, between = [], []
    for k in range(args.runs):
        if k:
            between.append(drop_page_cache(args.evict_gb, args.store_dir or tempfile.gettempdir()))
        done = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, *own],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        result["peak_rss_gib_outside"] = round(int(kb.group(1)) / 2**20, 2) if kb else None
        results.append(result)
        print(json.dumps(result), flush=True)
    totals = [r["total_s"] for r in results]
    summary = {"benchmark": "scale-runs", "runs": args.runs, "totals_s": totals,
               "max_over_min": round(max(totals) / min(totals), 3),
               "between": between}
    print(json.dumps(summary))
    if args.results:
        from results_doc import write_section

        stages = ("gradients", "estimate", "prune")
        lines = ["| run | gradients s | estimate s | prune s | total s | planned total s "
                 "| planned / measured | peak RSS (outside) |", "|---|---|---|---|---|---|---|---|"]
        for k, r in enumerate(results, 1):
            planned = sum(r["planned_s"][s] for s in stages)
            lines.append(f"| {k} | " + " | ".join(f"{r['seconds'][s]:.1f}" for s in stages)
                         + f" | **{r['total_s']:.1f}** | {planned:.1f} | "
                           f"{planned / r['total_s']:.2f} | {r['peak_rss_gib_outside']} GiB |")
        r0 = results[0]
        write_section(
            args.results_name, f"The paper's step, {args.runs} runs: {r0['model']}, "
            f"m = {r0['m']}, {r0['store_gb']} GiB store on {r0['store']}", "\n".join(lines),
            notes=("The paper's setting: random weights and fake 224x224 data, one-shot to "
                   "90% with global allocation, per-sample gradients in a float16 store, "
                   "blocks of 2000, absolute damp 1e-5, float64 solves, `obs` joint update, "
                   "no safeguard (BatchNorm statistics re-estimated, as in every run). "
                   f"Slowest over fastest total: {summary['max_over_min']:.2f}. Between the "
                   f"runs: {'; '.join(between)}. Each run in a process of its own under "
                   "`/usr/bin/time -v`; planned per stage in each run's JSON (`planned_s`). "
                   f"Gradients by {r0['gradient_method']['method']} "
                   f"({r0['gradient_method'].get('chunk')} rows a call); load averages at "
                   f"the ends: {', '.join(str(r['load_average']) for r in results)}."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
