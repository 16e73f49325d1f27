"""CPU speed-up of sparse and sparse INT8 ResNet-50: DeepSparse, ONNX Runtime and PyTorch.

torchvision resnet50 with random weights (speed does not depend on the values) is pruned
by magnitude to each sparsity with the ``uniform`` and ``global`` allocators, unstructured
and in blocks of 4 input channels (``--blocks``, ``structure.block``), exported
with the checked ONNX exporter and, with ``--quantize int8``, quantized to INT8 with the
zeros kept (export/quantize.py; calibrated on random inputs, which is all a speed test
needs), then timed at each batch size on every installed engine, all in one run. Each
engine times the INT8 file laid out for it: ``deepsparse`` (QLinearConv, per-tensor
weights) on DeepSparse, ``onnxruntime`` (QDQ, per-channel) on ONNX Runtime; PyTorch has no
INT8 counterpart.

Timing is interleaved (wfcore/rounds.py): the float and INT8 files of one sparse model, on
every engine, and the dense float32 model on ONNX Runtime (the baseline) are kept warm and
timed in rounds, each round running every one of them once in a rotated order; a
speed-up is the median of the ratios measured round by round, with their quartiles, and
is marked ``noisy`` when the baseline's own rounds spread beyond the bound (the machine's
load changed). One group of files is alive at a time, so that memory stays that of a few
models. Prints one JSON object per line (model, sparsity, allocation, block, quantize,
batch_size, engine, median_ms, items_per_s, p90_ms, rounds, spread, achieved_sparsity,
speedup, speedup_low, speedup_high, noisy), then a summary table on stderr.

    NM_DISABLE_ANALYTICS=1 .venv/bin/python benchmarks/cpu_speedup.py > speedup.jsonl
    .venv/bin/python benchmarks/cpu_speedup.py --quick      # 0 and 95% uniform, batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from wfcore.export import bench
from wfcore.export.onnx import OnnxOptions, conv_linear_weights, export_checked
from wfcore.export.quantize import quantize_int8
from wfcore.plugins.allocators import GlobalAllocator, UniformAllocator

from wfcore import rounds
from wfcore.masks import block_scores

log = logging.getLogger("cpu_speedup")
ALLOCATORS = {"uniform": UniformAllocator, "global": GlobalAllocator}


def magnitude_prune(model: nn.Module, sparsity: float, allocation: str, block: int = 1) -> float:
    """Zero the smallest-magnitude Conv/Linear weights in place, in blocks of ``block`` input
    channels (``structure.block``); returns the sparsity reached."""
    weights = conv_linear_weights(model)
    keep = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    scores = block_scores({n: w.double() ** 2 for n, w in weights.items()}, keep, block)
    keep = ALLOCATORS[allocation]().allocate(scores, keep, sparsity)
    with torch.no_grad():
        for n, w in weights.items():
            w.mul_(keep[n])
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(
        w.numel() for w in weights.values())


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a short run: 0 and 95%% uniform, batch 16, fewer timed batches")
    p.add_argument("--model", default="resnet50", help="a torchvision classifier")
    p.add_argument("--sparsities", default="0,0.8,0.9,0.95")
    p.add_argument("--allocations", default="uniform,global")
    p.add_argument("--blocks", default="1,4",
                   help="structure.block of each sparse model: 1 = unstructured, 4 = blocks "
                        "of 4 input channels (DeepSparse's INT8 kernels)")
    p.add_argument("--batch-sizes", default="16,1")
    p.add_argument("--engines", default=",".join(bench.ENGINES))
    p.add_argument("--quantize", default="none,int8",
                   help="none (float32) and/or int8 (each sparsity also quantized)")
    p.add_argument("--calibration-samples", type=int, default=8,
                   help="random inputs that calibrate the INT8 activation ranges")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--runs", type=int, default=10,
                   help="timed rounds (at least), each running every file of a group once")
    p.add_argument("--min-seconds", type=float, default=3.0, help="and at least this long")
    p.add_argument("--max-seconds", type=float, default=40.0,
                   help="but a slow engine stops after this long (3 batches at least)")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--workdir", help="where the ONNX files go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.quick:
        args.sparsities, args.allocations, args.batch_sizes = "0,0.95", "uniform", "16"
        args.warmup, args.runs, args.min_seconds = 2, 5, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    import torchvision

    started = time.perf_counter()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    allocations = args.allocations.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engines = bench.available(args.engines.split(","))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cpu_speedup-"))
    workdir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    dense = torchvision.models.get_model(args.model, weights=None).eval()
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calibration = torch.randn(args.calibration_samples, 3, 224, 224,
                              generator=torch.Generator().manual_seed(2)).numpy()
    # The dense model first: its file on ONNX Runtime is the baseline timed in every group.
    blocks = [int(b) for b in args.blocks.split(",")]
    plan = [(0.0, "none", 1)] if 0 in sparsities else []
    plan += [(s, a, b) for a in allocations for s in sparsities if s != 0 for b in blocks]
    quantize = args.quantize.split(",")
    models = []  # (sparsity, allocation, block, reached, quantize, {engine: path}, module)
    for sparsity, allocation, block in plan:
        model = copy.deepcopy(dense)
        reached = magnitude_prune(model, sparsity, allocation, block) if sparsity else 0.0
        path = workdir / f"{args.model}-{allocation}-{round(sparsity * 100)}-block{block}.onnx"
        log.info("exporting %s (sparsity %.4f)", path.name, reached)
        export_checked(model, example, path, OnnxOptions())
        if "none" in quantize:
            models.append((sparsity, allocation, block, reached, "none",
                           dict.fromkeys(engines, path), model))
        if "int8" in quantize:
            params = conv_linear_weights(model)
            int8 = {}
            for engine in (e for e in engines if e != "torch"):  # one layout per engine
                int8[engine] = path.with_name(f"{path.stem}.int8-{engine}.onnx")
                quantize_int8(path, int8[engine], calibration, params, engine)
            models.append((sparsity, allocation, block, reached, "int8", int8, None))

    records = []
    dense_path = next((paths["onnxruntime"] for s, _, _, _, q, paths, _ in models
                       if s == 0 and q == "none" and "onnxruntime" in paths), None)
    groups: dict[tuple, list] = {}  # the float and INT8 files of one sparse model together
    for entry in models:
        groups.setdefault(entry[:3], []).append(entry)
    for batch_size in batch_sizes:
        for entries in groups.values():
            # one group timed in rounds, with the dense ONNX Runtime baseline in every round
            rows, about = [], {}
            if dense_path is not None:
                rows.append(bench.Row("baseline", "onnxruntime", dense_path))
            for sparsity, allocation, block, reached, quantized, paths, model in entries:
                for engine, path in paths.items():
                    if path == dense_path and engine == "onnxruntime":
                        about["baseline"] = (sparsity, allocation, block, reached, quantized)
                        continue
                    label = f"{path.name}/{engine}"
                    rows.append(bench.Row(label, engine, path, model))
                    about[label] = (sparsity, allocation, block, reached, quantized)
            log.info("timing %s at batch %d in rounds", ", ".join(r.label for r in rows),
                     batch_size)
            timings = bench.time_rows(rows, batch_size, warmup=args.warmup, runs=args.runs,
                                      min_seconds=args.min_seconds,
                                      max_seconds=args.max_seconds, threads=args.threads)
            bench.add_speedups(timings, lambda t: t.model == "baseline")
            for t in timings:
                if t.model not in about:  # the baseline of a sparse group: only its ratios
                    continue
                sparsity, allocation, block, reached, quantized = about[t.model]
                record = {"model": args.model, "sparsity": sparsity, "allocation": allocation,
                          "block": block, "quantize": quantized, "batch_size": batch_size,
                          "engine": t.engine, "median_ms": t.median_ms,
                          "items_per_s": t.items_per_s, "p90_ms": t.p90_ms, "rounds": t.runs,
                          "spread": t.spread, "achieved_sparsity": round(reached, 4),
                          "speedup": t.speedup, "speedup_low": t.speedup_low,
                          "speedup_high": t.speedup_high, "noisy": t.noisy}
                records.append(record)
                print(json.dumps(record), flush=True)

    wall = time.perf_counter() - started
    lines = [f"{'sparsity':>8} {'alloc':<7} {'block':>5} {'weights':<7} {'batch':>5} "
             f"{'engine':<12} {'median ms':>10} {'items/s':>9} {'vs dense ORT (quartiles)':>26}"]
    for r in records:
        speedup = (f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
                   if r["speedup"] else "-") + (" noisy" if r["noisy"] else "")
        weights = "int8" if r["quantize"] == "int8" else "float32"
        lines.append(f"{r['sparsity']:>8.2f} {r['allocation']:<7} {r['block']:>5} {weights:<7} "
                     f"{r['batch_size']:>5} {r['engine']:<12} {r['median_ms']:>10.2f} "
                     f"{r['items_per_s']:>9.1f} {speedup:>26}")
    if any(r["noisy"] for r in records):
        lines.append(f"noisy: the baseline's rounds spread beyond {rounds.NOISE_BOUND:.0%} "
                     "(the machine's load changed during the run)")
    print("\n".join(lines) + f"\nwall time {wall:.0f} s on {os.cpu_count()} CPUs",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
