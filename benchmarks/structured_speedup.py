"""Speed of channel-pruned (physically smaller, dense) models on ONNX Runtime and PyTorch.

torchvision resnet50 and mobilenet_v3_small with random weights (speed does not depend on
the values) lose 30/50/70% of their FLOPs to ``structure.unit: channel`` (group L2
scores, the global allocator; the classifier's outputs stay), are exported to ordinary
dense ONNX, and are timed against the dense model in one run with interleaved rounds:
each round times every candidate (the fastest of ``--repeats`` runs in a row), in an
order rotated from round to round, so that the load of a shared machine falls on all of
them alike; the speed-up is the median of
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
from results_doc import write_section
from wfcore.export.onnx import torch_to_onnx

from wfcore.channels import CostModel
from wfcore.group_obs import Diagonal
from wfcore.masks import select_params
from wfcore.structured import prune_channels

log = logging.getLogger("structured_speedup")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def onnx_numel(path: Path, weights: bool = False) -> int:
    """Numbers in the ONNX file's initializers (``weights``: the Conv/Gemm weights only,
    those with two or more dimensions)."""
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer
               if not weights or len(t.dims) > 1)


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def write_doc(rows: list[dict], args: argparse.Namespace) -> None:
    lines = ["| model | FLOPs removed (counted) | params removed | params (report / ONNX "
             "weights) | engine | batch | median ms | speed-up vs dense (median, IQR) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_q1_q3"]
        lines.append(f"| {r['model']} | {100 * r['flops_removed']:.1f}% | "
                     f"{100 * r['params_removed']:.1f}% | {r['params_report']:,} / "
                     f"{r['onnx_weight_numel']:,} | {r['engine']} | {r['batch_size']} | "
                     f"{r['median_ms']} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) |")
    notes = (f"Random weights (speed does not depend on values), group-L2 scores, global "
             f"allocation (structure.rank {args.rank}, min_keep {args.min_keep}, round_to "
             f"{args.round_to}), the classifier's outputs kept. {args.rounds} interleaved "
             f"rounds (the fastest of {args.repeats} runs in a row per candidate and round), "
             f"{args.threads} threads; speed-up = median over rounds of dense time / "
             "candidate time in the same round, IQR of those ratios beside it. The ONNX "
             "weights (initializers with two or more dimensions) equal the report's "
             "parameters less the biases; the ONNX file also holds one bias per channel of "
             "each BatchNorm folded into its conv.")
    write_section(args.section, args.title, "\n".join(lines), notes=notes)


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
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of a candidate in a row within a round; the fastest counts "
                         "(a load spike on a shared machine slows one, rarely all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", type=int, default=8,
                    help="structure.round_to: every layer keeps a multiple of this")
    ap.add_argument("--rank", default="saliency", help="structure.rank: saliency | per_cost")
    # a floor of 40% per layer spreads the removal over every layer: with group L2 on
    # random weights the global ranking otherwise empties the 3x3 convs first and leaves
    # the 1x1 ones whole, which gains less speed for the same FLOPs (docs/structured.md)
    ap.add_argument("--min-keep", type=float, default=0.4, help="structure.min_keep")
    ap.add_argument("--write-doc", action="store_true",
                    help="write the table into docs/results.md (section --section)")
    ap.add_argument("--section", default="structured-speedup",
                    help="the section of docs/results.md that --write-doc writes")
    ap.add_argument("--title", default="Channel pruning: speed of the smaller dense model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    example = torch.randn(1, 3, 224, 224)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            candidates = {0.0: build(name)}
            counted: dict[float, dict[str, float]] = {}
            for target in targets:
                model = build(name)
                step = prune_channels(model, example, select_params(model, None), Diagonal(),
                                      target, min_keep=args.min_keep, rank=args.rank,
                                      round_to=args.round_to)
                candidates[target] = model.eval()
                counted[target] = step.record()["counted"]
            counted[0.0] = {"flops_removed": 0.0, "params_removed": 0.0,
                            "params": CostModel(candidates[0.0], example).total()[1]}
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
                            times[t].append(min(runs[t]() for _ in range(args.repeats)))
                    for t in runs:
                        ratios = [d / c for d, c in zip(times[0.0], times[t], strict=True)]
                        row = {"model": name, "flops_removed_target": t,
                               "flops_removed": round(counted[t]["flops_removed"], 4),
                               "params_removed": round(counted[t]["params_removed"], 4),
                               # the report's count (Conv/Linear weights and biases), all
                               # of PyTorch's (BatchNorm too) and the ONNX file's (the
                               # BatchNorms folded into the convs: one bias per channel)
                               "params_report": int(counted[t]["params"]),
                               "params_torch": sum(p.numel() for p in
                                                   candidates[t].parameters()),
                               "onnx_initializer_numel": onnx_numel(paths[t]),
                               "onnx_weight_numel": onnx_numel(paths[t], weights=True),
                               "engine": engine, "batch_size": batch,
                               "median_ms": round(1000 * statistics.median(times[t]), 2),
                               "speedup": round(statistics.median(ratios), 3),
                               "speedup_q1_q3": [round(q, 3) for q in quartiles(ratios)],
                               "rounds": args.rounds, "repeats": args.repeats,
                               "round_to": args.round_to,
                               "rank": args.rank}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    if args.write_doc:
        write_doc(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
