"""2:4 weights on sparse tensor cores: a Linear layer's matmul dense against PyTorch's
semi-structured sparse tensor (``torch.sparse.to_sparse_semi_structured``), on CUDA only.

The mask is wfcore's own (``wfcore.nm.nm_keep`` on the weights' magnitudes: 2 kept of every
4 consecutive input weights), so the check also shows that the layout wfcore prunes to is
the one the kernels accept. Prints one JSON line per size; without a CUDA device (or one
older than compute capability 8.0) it prints ``{"skipped": ...}`` and exits 0.

    python benchmarks/semi_structured.py --sizes 4096x4096,11008x4096 --batch 4096
"""

from __future__ import annotations

import argparse
import json

import torch

from wfcore.nm import nm_keep, pattern_holds


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x4096,11008x4096", help="out x in, comma-separated")
    ap.add_argument("--batch", type=int, default=4096, help="rows of the input")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    if torch.cuda.get_device_capability() < (8, 0):
        print(json.dumps({"skipped": "sparse tensor cores need compute capability >= 8.0"}))
        return 0
    from torch.sparse import to_sparse_semi_structured

    for size in args.sizes.split(","):
        out_f, in_f = (int(v) for v in size.split("x"))
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        keep = nm_keep({"w": w.abs()}, {"w": torch.ones_like(w, dtype=torch.bool)}, (2, 4))
        assert pattern_holds(keep, (2, 4))
        w = w * keep["w"]
        x = torch.randn(args.batch, in_f, device="cuda", dtype=torch.float16)
        sparse = to_sparse_semi_structured(w)
        dense_ms = timed(lambda w=w, x=x: torch.nn.functional.linear(x, w), args.repeats)
        sparse_ms = timed(lambda s=sparse, x=x: torch.nn.functional.linear(x, s), args.repeats)
        same = torch.allclose(torch.nn.functional.linear(x, w),
                              torch.nn.functional.linear(x, sparse), rtol=1e-2, atol=1e-1)
        print(json.dumps({"size": size, "batch": args.batch, "dense_ms": dense_ms,
                          "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                          "same_output": bool(same), "device": torch.cuda.get_device_name()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
