"""The demo's speed-up line on a quiet machine and beside one other CPU-bound job.

``make demo`` ends with ``wfcore bench`` on the sparse ResNet-50 of
``configs/resnet50_speed.yaml`` (runs/demo-resnet50, made first when missing) and its
"fastest:" line. This script runs that same bench command twice, one right after the
other: once as it is, once while one CPU-burning process (``--burners``) runs beside it
from before the first round to after the last. bench times its files in rounds (every file
on every engine once a round, in rotated order) and quotes the median of the per-round
ratios, so the burner slows both terms of each ratio alike and the line should move far
less than the timings do. One JSON line:

    {"quiet": {"line", "speedup", "row"}, "loaded": {...}, "loaded_over_quiet",
     "within_25pct", "burners", "load_average", ...}

``--results`` writes both lines into docs/results.md.

    NM_DISABLE_ANALYTICS=1 .venv/bin/python benchmarks/demo_load.py [--results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "demo-resnet50"
BURN = "while True:\n    pass\n"


def wfcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "wfcore.cli", *args]


def bench_once(out: Path, burners: int) -> dict:
    """The demo's bench command (the Makefile's ``demo`` target) with ``burners``
    CPU-burning processes beside it; its "fastest:" line and its row of the JSON."""
    command = wfcore("-q", "bench", str(RUN / "model.onnx"), str(RUN / "model.int8.onnx"),
                     "--dense", str(RUN / "dense.onnx"), "--batch-size", "16",
                     "--engines", "deepsparse,onnxruntime", "--warmup", "2", "--runs", "7",
                     "--json", str(out))
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(burners)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              env={**os.environ, "NM_DISABLE_ANALYTICS": "1",
                                   "TQDM_DISABLE": "1"})
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    line = next(x for x in done.stdout.splitlines() if x.startswith("fastest:"))
    rows = json.loads(out.read_text())
    best = max(rows, key=lambda r: r["speedup"] or 0.0)  # the "fastest:" line's row
    return {"line": line, "speedup": best["speedup"], "noisy": best.get("noisy"),
            "row": f"{Path(best['model']).name} on {best['engine']}",
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burners", type=int, default=1,
                   help="CPU-burning processes beside the second run (default 1: one job)")
    p.add_argument("--results", action="store_true",
                   help="write both lines into docs/results.md")
    args = p.parse_args(argv)
    if not (RUN / "model.int8.onnx").exists():  # as `make demo` makes it
        subprocess.run(wfcore("-q", "prune", "configs/resnet50_speed.yaml", f"output={RUN}",
                              "--force"), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="demo_load-") as tmp:
        quiet = bench_once(Path(tmp) / "quiet.json", 0)
        loaded = bench_once(Path(tmp) / "loaded.json", args.burners)
    ratio = loaded["speedup"] / quiet["speedup"]
    result = {"benchmark": "demo_load", "quiet": quiet, "loaded": loaded,
              "loaded_over_quiet": round(ratio, 3), "within_25pct": abs(ratio - 1) <= 0.25,
              "burners": args.burners, "cpus": os.cpu_count()}
    print(json.dumps(result))
    if args.results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_doc import write_section

        body = (f"quiet:  `{quiet['line']}`\n\n"
                f"beside {args.burners} CPU-bound job(s): `{loaded['line']}`\n\n"
                f"loaded over quiet: **{ratio:.2f}** (within 25%: "
                f"{'yes' if result['within_25pct'] else 'no'})")
        write_section("demo-load", "The demo's speed-up line, quiet and beside another job",
                      body, notes=(
                          "The two runs are the demo's own `wfcore bench` command, one right "
                          "after the other on the same files; the second with a `while True: "
                          "pass` process beside it from start to end. Load averages at the "
                          f"end: {quiet['load_average']} and {loaded['load_average']}."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
