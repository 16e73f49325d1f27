"""The sweep of the README's quick start, run and checked: ``wfcore sweep
configs/mnist_cnn.yaml estimator.name=woodfisher,kfac,diag_fisher,magnitude,random``.

Checks that random pruning stays strictly below magnitude at 80, 90 and 95% and that
WoodFisher is at least K-FAC, the diagonal Fisher and magnitude at 90 and 95%, prints one
JSON line with the verdicts, and writes the sweep's table into docs/results.md
(``--write``). The sweep directory (``--out``) keeps the runs, so a second call only
reads them back.

    nice -n 10 python benchmarks/sweep_check.py --write
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from wfcore.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = "woodfisher,kfac,diag_fisher,magnitude,random"


def checks(rows: list[dict]) -> dict[str, bool]:
    acc = {(r["estimator.name"], round(r["target_sparsity"], 4)): r["accuracy"] for r in rows}
    out = {}
    for s in (0.8, 0.9, 0.95):
        out[f"random<magnitude@{s:g}"] = acc[("random", s)] < acc[("magnitude", s)]
    for s in (0.9, 0.95):
        out[f"woodfisher>=others@{s:g}"] = all(
            acc[("woodfisher", s)] >= acc[(e, s)] for e in ("kfac", "diag_fisher", "magnitude"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sweep-check")
    ap.add_argument("--write", action="store_true", help="write the table to docs/results.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = sweep.run_sweep(str(ROOT / "configs" / "mnist_cnn.yaml"),
                             [f"estimator.name={ESTIMATORS}", f"output={args.out}"])
    verdict = checks(result.rows)
    print(json.dumps({"benchmark": "sweep_check", "checks": verdict,
                      "holds": all(verdict.values())}), flush=True)
    table = sweep.table(result)
    print(table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_doc import write_section

        notes = ("One-shot from the dense model of `configs/mnist_cnn.yaml` (seed 0), top-1 "
                 "on the 1,000 test images; `†`: the safeguard's magnitude fallback chose "
                 "the mask (never for `random` or `magnitude`, whose masks are their own). "
                 "Checks: " + ", ".join(f"{k} {'holds' if v else 'FAILS'}"
                                        for k, v in verdict.items()) + ".")
        failed = [f"{r.run_dir.name}: {r.error}" for r in result.runs if r.status == "failed"]
        if failed:
            notes += (" `-`: a target the run was refused at (its earlier targets are shown): "
                      + "; ".join(failed) + ".")
        write_section("sweep-mnist-cnn", "The quick-start sweep on mnist_cnn", table,
                      notes=notes)
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
