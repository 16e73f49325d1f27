"""Gradient-sampling throughput at 1 and 2 processes (torchrun, gloo on CPU).

Each setting launches ``python -m torch.distributed.run --standalone --nproc-per-node N``
on this script in worker mode: every rank builds the model of the config (random
weights: the speed does not depend on them), samples the step's m gradient rows with the
pipeline's ``GradientSampler`` into one in-memory store shared by the ranks (each rank
computes and writes its share of each chunk of rows), and rank 0 reports the wall time of
the whole sampling after a warm-up. One JSON object per line:

    {"processes", "threads_per_process", "model", "m", "d", "seconds", "rows_per_s",
     "rounds", "spread", "speedup", "speedup_low", "speedup_high", "noisy"}

The settings are timed in rounds (``--rounds``), each round launching every setting once
in a rotated order: ``seconds`` is the median over the rounds, ``speedup`` against the first
setting the median of the per-round ratios (``speedup_low``/``speedup_high`` their
quartiles), and ``noisy`` says that the first setting's own rounds spread beyond
``rounds.NOISE_BOUND`` (the machine's load changed during the run).

``--threads`` intra-op threads in all are split between the processes (a fair split of one
machine's cores); with ``--threads`` 1 every process gets one thread, the processes then use
as many cores as there are of them.

    python benchmarks/distributed.py                      # mnist_cnn, 512 rows, 1 and 2 procs
    python benchmarks/distributed.py --nprocs 1 2 4 --rows 1024 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wfcore import rounds

ROOT = Path(__file__).parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    from wfcore import config, distributed, manager
    from wfcore.fisher.gradients import GradientSampler
    from wfcore.fisher.store import GradientStore
    from wfcore.masks import Masks, select_params
    from wfcore.run import pipeline

    distributed.init("gloo")
    cfg = config.load(args.config, ["device=cpu", *args.overrides])
    plugins = manager.build(cfg.plugins)
    data = pipeline.load_data(cfg, plugins)
    model = pipeline.build_model(cfg, plugins, data)
    params = select_params(model, cfg.model.params)
    sampler = GradientSampler(model, params, Masks(params).keep, data.train, torch.nn.
                              CrossEntropyLoss(), num_grads=args.m, seed=cfg.seed,
                              progress=False)
    d = sampler.layout.d
    with GradientStore(min(args.m, 64), d) as store:  # warm-up: the first vmap traces
        sampler.sample_into(store)
    # as the pipeline does on one machine: one store in shared memory, each rank its rows
    with GradientStore(args.m, d, shared=distributed.world() > 1) as store:
        distributed.barrier()
        start = time.perf_counter()
        sampler.sample_into(store)
        distributed.barrier()
        seconds = time.perf_counter() - start
    if distributed.is_main():
        Path(args.out).write_text(json.dumps({
            "processes": distributed.world(), "threads_per_process": torch.get_num_threads(),
            "model": cfg.model.name, "m": args.m, "d": d, "seconds": round(seconds, 3),
            "rows_per_s": round(args.m / seconds, 1)}))
    distributed.shutdown()


def launch(args: argparse.Namespace, nproc: int) -> dict:
    threads = max(1, args.threads // nproc) if args.threads > 1 else 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", str(Path(__file__).resolve()), "--worker",
                   "--out", str(out), "--rows", str(args.m), "--config", str(args.config),
                   *args.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{nproc} process(es) failed:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist_cnn.yaml"))
    p.add_argument("--rows", dest="m", type=int, default=512, help="gradient rows m")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="processes")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads in all, split between the processes")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, each launching every setting once (rotated order)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    # the settings in rounds, each round launching every setting once in a rotated order;
    # a speed-up is the median of the per-round ratios (wfcore/rounds.py)
    results: dict[int, list[dict]] = {n: [] for n in args.nprocs}
    for r in range(max(1, args.rounds)):
        for i in rounds.rotation(len(args.nprocs), r):
            results[args.nprocs[i]].append(launch(args, args.nprocs[i]))
    first = [res["seconds"] for res in results[args.nprocs[0]]]
    for nproc in args.nprocs:
        seconds = [res["seconds"] for res in results[nproc]]
        result = dict(results[nproc][0])
        _, median, _ = rounds.quartiles(seconds)
        ratio = rounds.Ratio.of(first, seconds)
        result.update(seconds=round(median, 3), rows_per_s=round(args.m / median, 1),
                      rounds=len(seconds), spread=round(rounds.spread(seconds), 4),
                      speedup=round(ratio.median, 2), speedup_low=round(ratio.low, 2),
                      speedup_high=round(ratio.high, 2), noisy=rounds.noisy(first))
        print(json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
