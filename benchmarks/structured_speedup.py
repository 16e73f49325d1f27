"""Speed of channel-pruned (physically smaller, dense) models on ONNX Runtime and PyTorch.

torchvision resnet50 and mobilenet_v3_small with random weights (speed does not depend on
the values) lose 30/50/70% of their FLOPs to ``structure.unit: channel`` (group L2
scores, the global allocator; the classifier's outputs stay), are exported to ordinary
dense ONNX, and are timed against the dense model in one run with interleaved rounds:
each round times every candidate once, in an order rotated from round to round, so that
the load of a shared machine falls on all of them alike; the speed-up is the median of
the per-round ratios (dense time / candidate time of the same round).

Prints one JSON object per line: model, flops_removed (target and counted), params
(PyTorch, and the numbers in the ONNX file's initializers), engine, batch_size,
median_ms, speedup.

    NM_DISABLE_ANALYTICS=1 nice -n 5 .venv/bin/python benchmarks/structured_speedup.py
    .venv/bin/python benchmarks/structured_speedup.py --models resnet50 --targets 0.5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from wfcore.export.onnx import torch_to_onnx

from wfcore.group_obs import Diagonal
from wfcore.masks import select_params
from wfcore.structured import prune_channels

log = logging.getLogger("structured_speedup")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def onnx_numel(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def timer(engine: str, model: torch.nn.Module, path: Path, x: torch.Tensor, threads: int):
    """A function that runs one inference of ``x`` and returns its seconds."""
    if engine == "onnxruntime":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run() -> float:
            start = time.perf_counter()
            session.run(None, feed)
            return time.perf_counter() - start
        return run

    def run_torch() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            return time.perf_counter() - start
    return run_torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v3_small")
    ap.add_argument("--targets", default="0.3,0.5,0.7", help="shares of FLOPs removed")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--engines", default="onnxruntime,pytorch")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    example = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            candidates = {0.0: build(name)}
            counted = {0.0: 0.0}
            for target in targets:
                model = build(name)
                step = prune_channels(model, example, select_params(model, None), Diagonal(),
                                      target)
                candidates[target] = model.eval()
                counted[target] = step.record()["counted"]["flops_removed"]
            paths = {t: torch_to_onnx(m, example, Path(tmp) / f"{name}-{t}.onnx")
                     for t, m in candidates.items()}
            for engine in args.engines.split(","):
                for batch in map(int, args.batch_sizes.split(",")):
                    x = torch.randn(batch, 3, 224, 224)
                    runs = {t: timer(engine, candidates[t], paths[t], x, args.threads)
                            for t in candidates}
                    for run in runs.values():
                        for _ in range(args.warmup):
                            run()
                    times: dict[float, list[float]] = {t: [] for t in runs}
                    order = list(runs)
                    for r in range(args.rounds):
                        for t in order[r % len(order):] + order[:r % len(order)]:
                            times[t].append(runs[t]())
                    for t in runs:
                        ratios = [d / c for d, c in zip(times[0.0], times[t], strict=True)]
                        row = {"model": name, "flops_removed_target": t,
                               "flops_removed": round(counted[t], 4),
                               "params_torch": sum(p.numel() for p in
                                                   candidates[t].parameters()),
                               "onnx_initializer_numel": onnx_numel(paths[t]),
                               "engine": engine, "batch_size": batch,
                               "median_ms": round(1000 * statistics.median(times[t]), 2),
                               "speedup": round(statistics.median(ratios), 3),
                               "rounds": args.rounds}
                        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
