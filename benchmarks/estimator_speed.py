"""Speed, peak memory and accuracy of the WoodFisher forms on one block of random gradients.

For each block size B and number of gradients m, every form factorises the same random
(m, B) gradients and computes diag(F^-1) (what the OBS scores need), and is compared with
the float64 explicit inverse ``torch.linalg.inv(F)``. One JSON object per line:

    {"B", "m", "form", "dtype", "seconds", "peak_mb", "max_rel_diff_diag", "device"}

``peak_mb`` is the memory the form needed beyond the gradients: on CUDA the peak of
``torch.cuda.max_memory_allocated``; on CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement) less the resident set before it.
``seconds`` is the best of a few repeats after a warm-up (one run for ``recursive``).

    python benchmarks/estimator_speed.py            # B in {128, 2000, 10000}, m in {100, 1000}
    python benchmarks/estimator_speed.py --quick    # B=2000, m=1000 only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import torch
from wfcore.plugins.woodfisher import DTYPES, BlockGroup

DAMP = 1e-5
RUNS = [("dual", "float64"), ("primal", "float64"), ("recursive", "float64"),
        ("dual", "float32"), ("primal", "float32")]


def gradients(B: int, m: int, seed: int = 0) -> torch.Tensor:
    """(m, B) random gradients with a decaying spectrum, like real ones."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, B, generator=gen, dtype=torch.float64)
    scale = torch.logspace(0, -3, B, dtype=torch.float64)[torch.randperm(B, generator=gen)]
    return (G * scale).float()


def reference_diag(G: torch.Tensor) -> torch.Tensor:
    """diag(F^-1) from the float64 explicit inverse."""
    G = G.double()
    F = DAMP * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / G.shape[0]
    return torch.linalg.inv(F).diagonal().clone()


def fixed_mmap_threshold() -> None:
    """Have glibc return every large buffer to the OS when freed, so that the resident set
    follows the live tensors (its default threshold grows and keeps freed buffers)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def resident_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        return -1
    return resident_kb("VmRSS") * 1024


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resident_kb("VmHWM") * 1024


def run_form(G: torch.Tensor, form: str) -> torch.Tensor:
    """Factorise and take diag(F^-1): what the OBS scores need."""
    diag = BlockGroup(G, DAMP, form, lambda k: "the benchmark block").diag()[0]
    if diag.is_cuda:
        torch.cuda.synchronize(diag.device)
    return diag


def measure(G32: torch.Tensor, ref: torch.Tensor, form: str, dtype: str,
            device: torch.device) -> dict:
    m, B = G32.shape
    G = G32.to(device=device, dtype=DTYPES[dtype])[None]  # (1, m, B)
    run_form(G[:, :64, :128].contiguous(), form)  # warm-up: libraries, thread pools
    seconds, peak_mb, rel = float("inf"), 0.0, 0.0
    for _ in range(1 if form == "recursive" else 3):
        before = reset_peak(device)
        start = time.perf_counter()
        diag = run_form(G, form)
        seconds = min(seconds, time.perf_counter() - start)
        peak_mb = (peak(device) - before) / 2**20 if before >= 0 else float("nan")
        rel = ((diag.double().cpu() - ref).abs() / ref.abs()).max().item()
        del diag
    return {"B": B, "m": m, "form": form, "dtype": dtype, "seconds": round(seconds, 4),
            "peak_mb": round(peak_mb, 1), "max_rel_diff_diag": rel, "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only B=2000, m=1000")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--forms", default=None,
                   help="comma-separated form:dtype pairs (default: all five)")
    args = p.parse_args(argv)
    fixed_mmap_threshold()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    sizes = [(2000, 1000)] if args.quick else [(B, m) for B in (128, 2000, 10000)
                                                for m in (100, 1000)]
    runs = [tuple(r.split(":")) for r in args.forms.split(",")] if args.forms else RUNS
    for B, m in sizes:
        G = gradients(B, m)
        ref = reference_diag(G)
        for form, dtype in runs:
            print(json.dumps(measure(G, ref, form, dtype, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
