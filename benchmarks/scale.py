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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time

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
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
