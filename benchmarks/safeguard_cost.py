"""What the update safeguard and the BatchNorm re-estimation cost in one pruning step.

Runs one one-shot step of a config twice, with the safeguard on and off (every other key
equal, the dense model trained once and cached), and prints one JSON line: the seconds
of each step (gradients + estimate + prune, as timed in the report), their ratio, the
samples the safeguard ran forward, and the seconds the running statistics took
(``batchnorm`` record of the step; 0 on a model without BatchNorm).

    python benchmarks/safeguard_cost.py                       # vit_tiny, magnitude, 90%
    python benchmarks/safeguard_cost.py --config configs/bn_cnn.yaml --estimator woodfisher

Timings on a shared machine are disturbed by other jobs: compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from wfcore import config as config_mod
from wfcore.run import pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("gradients", "estimate", "prune")


def one_step(config: Path, estimator: str, sparsity: float, guard: bool, out: Path,
             extra: list[str]) -> dict[str, Any]:
    run_dir = out / f"{config.stem}-{estimator}-safeguard-{str(guard).lower()}"
    overrides = [f"estimator.name={estimator}", "scheduler.name=oneshot",
                 f"scheduler.sparsities=[{sparsity}]", f"safeguard.enabled={str(guard).lower()}",
                 f"output={run_dir}", "export=null", *extra]
    report = pipeline.run(config_mod.load(config, overrides), force=True)
    step = report["steps"][0]
    record = step["safeguard"][0]
    return {"seconds": sum(step["timings"][k] for k in STAGES),
            "timings": {k: step["timings"][k] for k in STAGES},
            "accuracy": step["accuracy"], "alpha": record["alpha"], "mask": record["mask"],
            "skipped": record.get("skipped"), "forward_samples": record.get("forward_samples", 0),
            "batchnorm": record.get("batchnorm")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "vit_tiny.yaml")
    ap.add_argument("--estimator", default="magnitude")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("runs/safeguard_cost"))
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for both runs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    off = one_step(args.config, args.estimator, args.sparsity, False, args.out, args.overrides)
    on = one_step(args.config, args.estimator, args.sparsity, True, args.out, args.overrides)
    print(json.dumps({"config": args.config.name, "estimator": args.estimator,
                      "sparsity": args.sparsity, "on": on, "off": off,
                      "ratio": on["seconds"] / off["seconds"] if off["seconds"] else None}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
