"""Does `wfcore bench` give the right ratio when the machine's load changes mid-run?

Two identical ONNX files (torchvision's ResNet-18 with random weights, one file copied:
the true speed-up is exactly 1.0) are timed with ``wfcore bench MODEL --dense DENSE`` on
ONNX Runtime. Half-way through its timed rounds, this script starts CPU-burning processes
(``--burners``, default one per core) and stops them when bench ends. One JSON line:

    {"speedup", "speedup_low", "speedup_high", "noisy", "within_15pct", "rounds",
     "baseline_spread", "one_after_another", "burner_started_s", "burners", ...}

``speedup`` is what bench reports (the median of the per-round ratios): it should stay
within 15% of 1.0, and ``noisy`` should be true when the burner spread the baseline's
rounds beyond the bound. ``one_after_another`` is what timing one file after the other
would have said: the dense file's rounds after the burner started against the other
file's rounds before it (the old way, in which the load change lands in the ratio).

    NM_DISABLE_ANALYTICS=1 .venv/bin/python benchmarks/bench_noise.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from wfcore.export.onnx import OnnxOptions, export_checked

BURN = "while True:\n    pass\n"


def export_model(directory: Path, model: str) -> tuple[Path, Path]:
    """The model exported once and copied: two identical files."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(model, weights=None).eval()
    path = directory / "model.onnx"
    export_checked(net, torch.randn(1, 3, 224, 224), path, OnnxOptions())
    dense = directory / "dense.onnx"
    shutil.copyfile(path, dense)
    return path, dense


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a torchvision classifier")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="bench's --min-seconds: how long the rounds run")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--burners", type=int, default=os.cpu_count() or 1,
                   help="CPU-burning processes started half-way (default: one per core)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_noise-") as tmp:
        model, dense = export_model(Path(tmp), args.model)
        out = Path(tmp) / "timings.json"
        command = [sys.executable, "-m", "wfcore.cli", "bench", str(model), "--dense", str(dense),
                   "--engines", "onnxruntime", "--batch-size", str(args.batch_size),
                   "--warmup", "3", "--runs", "10", "--min-seconds", str(args.seconds),
                   "--json", str(out)]
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "TQDM_DISABLE": "1"}
        bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        rounds_began = threading.Event()
        said: list[str] = []

        def watch() -> None:  # the last engine started: the rounds begin right after
            for line in bench.stderr:
                said.append(line)
                if f"starting {dense.name} on onnxruntime" in line:
                    rounds_began.set()

        threading.Thread(target=watch, daemon=True).start()
        burners: list[subprocess.Popen] = []
        began = time.perf_counter()
        if rounds_began.wait(timeout=600):
            began = time.perf_counter()
            time.sleep(args.seconds / 2)
            if bench.poll() is None:
                burners = [subprocess.Popen([sys.executable, "-c", BURN])
                           for _ in range(args.burners)]
        burner_at = time.perf_counter() - began
        stdout = bench.communicate()[0]
        for burner in burners:
            burner.kill()
            burner.wait()
        if bench.returncode != 0:
            sys.stderr.write("".join(said[-20:]))
            return 1
        timings = json.loads(out.read_text())
    print(stdout, file=sys.stderr)
    row = next(t for t in timings if Path(t["model"]).name == model.name)
    base = next(t for t in timings if Path(t["model"]).name == dense.name)
    half = len(base["round_ms"]) // 2
    one_after_another = (statistics.median(base["round_ms"][half:])
                         / statistics.median(row["round_ms"][:half]))
    print(json.dumps({
        "benchmark": "bench_noise", "model": args.model, "batch_size": args.batch_size,
        "speedup": row["speedup"], "speedup_low": row["speedup_low"],
        "speedup_high": row["speedup_high"], "noisy": row["noisy"],
        "within_15pct": abs(row["speedup"] - 1.0) <= 0.15, "rounds": row["runs"],
        "baseline_spread": base["spread"],
        "one_after_another": round(one_after_another, 3),
        "burner_started_s": round(burner_at, 1), "burners": len(burners),
        "seconds": args.seconds, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
