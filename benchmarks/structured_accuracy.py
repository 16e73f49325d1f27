"""One-shot channel pruning of trained models to a FLOPs target: group OBS (WoodFisher,
with the OBS update) against group magnitude and Torch-Pruning's own importances, all
allocated by the same global allocator to the same FLOPs, BatchNorm statistics
re-estimated after the step for every method alike.

Prints one JSON line per (model, method, seed) and one summary line per (model, method)
with the mean and standard deviation of top-1 over the seeds; ``--markdown`` prints the
README table.

    nice -n 5 python benchmarks/structured_accuracy.py --models bn_cnn --seeds 0,1,2

Each seed trains its own dense model once (cached like any wfcore run's).

``--finetune`` adds the fine-tuned comparison: every method is an ordinary wfcore run with
``scheduler.name=gradual`` and ``structure.unit=channel`` (pruning steps on the shrunk
model, fine-tuning between and after them); Torch-Pruning's magnitude importance is the
run's own ``structure.scores: tp_magnitude``, so schedule, allocator, BatchNorm
re-estimation and fine-tuning are the same for all.

    nice -n 10 python benchmarks/structured_accuracy.py --finetune \\
        --methods woodfisher,magnitude,tp-magnitude --write-doc
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from results_doc import write_section
from wfcore.plugins.diag_fisher import live_mean

from wfcore import config as config_mod
from wfcore import group_obs, manager, structured
from wfcore.group_obs import Diagonal, DualFisher, GroupScorer, Taylor
from wfcore.run import pipeline
from wfcore.run.training import evaluate
from wfcore.structured import prune_channels, recalibrate_batchnorm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = CONFIGS / "mnist_cnn.yaml"
MODELS = {"bn_cnn": ["model.name=bn_cnn", "train.epochs=10"],
          "mnist_cnn": ["model.name=mnist_cnn", "train.epochs=20"],
          "vit_tiny": []}  # as configs/vit_tiny.yaml (the comparison's dense models)
BASES = {"vit_tiny": CONFIGS / "vit_tiny.yaml"}  # the others: BASE with MODELS' overrides
METHODS = ("woodfisher", "woodfisher-noupdate", "magnitude", "taylor", "tp-magnitude",
           "tp-taylor", "tp-hessian")


def tp_scores(method: str, model, example, batches) -> list[torch.Tensor]:
    """Torch-Pruning's importance of every channel of our groups (``torch_pruning_scores``:
    the groups prune_channels traces), with the gradients Taylor and Hessian need
    accumulated over ``batches``."""
    imp = {"tp-magnitude": tp.importance.GroupMagnitudeImportance(p=2),
           "tp-taylor": tp.importance.GroupTaylorImportance(),
           "tp-hessian": tp.importance.GroupHessianImportance()}[method]
    model.zero_grad()
    loss_fn = torch.nn.CrossEntropyLoss()
    if method == "tp-hessian":
        for x, y in batches:
            for xi, yi in zip(x, y, strict=True):  # per-sample gradients (its OBD estimate)
                model.zero_grad()
                loss_fn(model(xi[None]), yi[None]).backward()
                imp.accumulate_grad(model)
    elif method == "tp-taylor":
        for x, y in batches:
            loss_fn(model(x), y).backward()
    out = structured.torch_pruning_scores(model, example, imp)
    model.zero_grad()
    return out


def run_one(model_name: str, name: str, seed: int, target: float, m: int,
            extra: list[str] = (), min_keep: float = 0.1,
            damp: float = 0.01, unit: str = "channel") -> dict[str, Any]:
    """``name``: a method, with ``@per_cost`` for that allocation order and ``+mean`` for
    scores divided by their group's mean (``structure.normalize: mean``); ``extra``: config
    overrides (e.g. other dense epochs); ``unit``: channel | head."""
    scored, _, normalize = name.partition("+")
    method, _, rank = scored.partition("@")
    cfg = config_mod.load(BASES.get(model_name, BASE),
                          MODELS[model_name] + [f"seed={seed}", f"fisher.num_grads={m}", *extra])
    plugins = manager.build(cfg.plugins)
    setup = pipeline.set_up(cfg, plugins, pipeline.build_components(cfg, plugins),
                            Path("runs/structured_accuracy"))
    p = pipeline.Pruning(setup)
    model = p.model.eval()
    dense = p.evaluate()["accuracy"]
    example = setup.data.test[0][0][None]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(setup.data.train), generator=gen)[:1024].tolist()
    xs = torch.stack([setup.data.train[i][0] for i in order])
    ys = torch.as_tensor([int(setup.data.train[i][1]) for i in order])
    batches = [(xs[i:i + 128], ys[i:i + 128]) for i in range(0, len(xs), 128)]
    params = p.params
    update = True
    if method.startswith("woodfisher"):
        G = p.sampler.sample(m).double()  # (m, d)
        scorer: GroupScorer = DualFisher(G, damp * live_mean(G.square().mean(0)))
        update = method == "woodfisher"
    elif method == "magnitude":
        scorer = Diagonal()
    elif method == "taylor":
        scorer = Taylor(p.sampler.sample(m).double().mean(0))
    else:
        scorer = group_obs.Precomputed(tp_scores(method, model, example, batches[:2]))
    # the shrunk model's outputs equal the masked one's (to 1e-5, tests/test_structured.py):
    # its accuracy before the statistics are re-estimated is the masked model's
    step = prune_channels(model, example, params, scorer, target, rank=rank or "saliency",
                          min_keep=min_keep, update=update, unit=unit,
                          normalize=normalize or "none")
    before = evaluate(model, setup.data.test, batch_size=256, loss_fn=setup.loss_fn,
                      device=setup.device)["accuracy"]
    recalibrate_batchnorm(model, [x for x, _ in batches])
    acc = evaluate(model, setup.data.test, batch_size=256, loss_fn=setup.loss_fn,
                   device=setup.device)["accuracy"]
    counted = step.record()["counted"]
    return {"model": model_name, "method": name, "seed": seed, "target": target,
            "dense": dense, "top1": acc, "top1_no_bn_recalibration": before,
            "flops_removed": counted["flops_removed"],
            "params_removed": counted["params_removed"],
            "units_removed": step.record()["channels_removed"]}



def schedule(args: argparse.Namespace) -> list[str]:
    """The gradual schedule of every fine-tuned run: steps at epochs 0 .. ``end_epoch``
    (every epoch) from ``initial`` to ``target`` of the FLOPs removed, fine-tuning at a
    constant LR until the last step, then cosine-annealed to zero."""
    return ["scheduler.name=gradual", f"scheduler.initial_sparsity={args.ft_initial}",
            f"scheduler.final_sparsity={args.target}", "scheduler.start_epoch=0",
            f"scheduler.end_epoch={args.ft_end_epoch}", "scheduler.freq=1",
            f"scheduler.epochs={args.ft_epochs}", f"scheduler.lr={args.ft_lr}",
            "scheduler.lr_schedule=cosine", f"scheduler.lr_decay_start={args.ft_end_epoch}"]


def finetune_one(model_name: str, method: str, seed: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One wfcore run with the gradual schedule: woodfisher (group OBS over the whole
    Fisher, with the OBS update), magnitude (group L2) or tp-magnitude (Torch-Pruning's
    group magnitude importance, ``structure.scores: tp_magnitude``); ``+mean``: with
    ``structure.normalize: mean``."""
    base, _, normalize = method.partition("+")
    overrides = [*MODELS[model_name], f"seed={seed}", f"fisher.num_grads={args.num_grads}",
                 "structure.unit=channel", "structure.target=flops", "structure.round_to=1",
                 f"structure.min_keep={args.min_keep}", "structure.recalibrate=1024",
                 "scorer.update=joint", f"structure.normalize={normalize or 'none'}",
                 *schedule(args)]
    if base == "woodfisher":
        overrides += ["estimator.name=woodfisher", f"estimator.damp={args.damp}"]
    elif base == "magnitude":
        overrides += ["estimator.name=magnitude"]
    elif base == "tp-magnitude":
        overrides += ["estimator.name=magnitude", "structure.scores=tp_magnitude"]
    else:
        raise SystemExit(f"--finetune: method {method!r} is not one of woodfisher, "
                         "magnitude, tp-magnitude")
    out = Path(tempfile.mkdtemp(prefix="wfcore-structured-ft-"))
    try:
        cfg = config_mod.load(BASES.get(model_name, BASE),
                              [*overrides, *args.overrides, f"output={out}"])
        report = pipeline.run(cfg, force=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    last = report["steps"][-1]
    counted = last["safeguard"][-1]["structured"]["counted"]
    return {"model": model_name, "method": method, "seed": seed, "target": args.target,
            "dense": report["dense"]["accuracy"], "finetuned": last["accuracy"],
            "steps": [s["accuracy"] for s in report["steps"]],
            "epochs": [e["accuracy"] for e in report["epochs"]],
            "flops_removed": counted["flops_removed_from_dense"],
            "params_removed": counted["params_removed_from_dense"]}

def finetune_table(args: argparse.Namespace) -> None:
    """Per (model, method, seed): the one-shot path above and a gradual wfcore run, on the
    same dense model."""
    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                oneshot = run_one(model_name, method, seed, args.target, args.num_grads,
                                  args.overrides, args.min_keep, args.damp)
                row = {**finetune_one(model_name, method, seed, args),
                       "oneshot": oneshot["top1"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = ["| model | method | one-shot top-1 % | fine-tuned top-1 % (mean ± std) | per seed "
             "| dense | FLOPs / params removed |", "|---|---|---|---|---|---|---|"]
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            mine = [r for r in rows if r["model"] == model_name and r["method"] == method]
            acc = [r["finetuned"] for r in mine]
            s = {"model": model_name, "method": method, "finetuned_mean": statistics.mean(acc),
                 "finetuned_std": statistics.pstdev(acc),
                 "oneshot_mean": statistics.mean(r["oneshot"] for r in mine),
                 "dense": statistics.mean(r["dense"] for r in mine), "seeds": len(mine)}
            print(json.dumps({"summary": s}), flush=True)
            flops = statistics.mean(r["flops_removed"] for r in mine)
            params = statistics.mean(r["params_removed"] for r in mine)
            lines.append(f"| {model_name} | {method} | {100 * s['oneshot_mean']:.2f} | "
                         f"{100 * s['finetuned_mean']:.2f} ± {100 * s['finetuned_std']:.2f} | "
                         + " / ".join(f"{100 * a:.1f}" for a in acc)
                         + f" | {100 * s['dense']:.2f} | {100 * flops:.1f}% / "
                         f"{100 * params:.1f}% |")
    table = "\n".join(lines)
    if args.markdown:
        print(table)
    if not args.write_doc:
        return
    extra = " ".join(args.overrides) or "none"
    notes = (f"{100 * args.target:.0f}% of the Conv/Linear FLOPs removed, seeds {args.seeds}, "
             "each seed on its own dense model (as the one-shot tables: "
             + "; ".join(f"{m}: {' '.join(o)}" for m, o in MODELS.items()
                         if m in args.models.split(","))
             + f", the rest as configs/mnist_cnn.yaml; extra overrides: {extra}). "
             "Fine-tuned: one wfcore run per cell with structure.unit=channel and "
             f"scheduler.name=gradual: steps at epochs 0..{args.ft_end_epoch} (one per epoch, "
             f"{100 * args.ft_initial:.0f}% of the FLOPs at epoch 0, cubic to "
             f"{100 * args.target:.0f}%), each on the shrunk model, then fine-tuning, "
             f"{args.ft_epochs} epochs in all (SGD, momentum 0.9, LR {args.ft_lr} until the "
             "last step, then cosine-annealed to zero; batch 64, the 4,000 training images). "
             "Every method has the same schedule, the same global allocator "
             f"(structure.min_keep {args.min_keep}, round_to 1) and the same BatchNorm "
             "re-estimation after each step (1,024 samples); woodfisher is group OBS over the "
             f"whole Fisher with the OBS update (m = {args.num_grads}, damp {args.damp} x "
             "mean diagonal), magnitude group L2 (estimator.name=magnitude), tp-magnitude "
             "Torch-Pruning's GroupMagnitudeImportance of the same groups, recomputed at each "
             "step (structure.scores=tp_magnitude); a method without +mean has "
             "structure.normalize=none, +mean each group's scores divided by their mean. "
             "One-shot: the same dense models pruned at once to the target (the path "
             "of the one-shot tables), BatchNorm statistics re-estimated, no training. Top-1 "
             "on the 1,000 embedded test images.")
    title = (f"Channel pruning with fine-tuning (gradual): accuracy at "
             f"{100 * args.target:.0f}% FLOPs removed ({args.models}; {args.methods})")
    write_section(args.section or "structured-accuracy-gradual", title, table, notes=notes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bn_cnn,mnist_cnn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", type=float, default=0.5, help="share of FLOPs removed")
    ap.add_argument("--num-grads", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--damp", type=float, default=0.01,
                    help="woodfisher's relative damp (estimator.damp, damp_mode relative)")
    ap.add_argument("--min-keep", type=float, default=0.1, help="structure.min_keep")
    ap.add_argument("--unit", choices=("channel", "head"), default="channel",
                    help="structure.unit of the one-shot table (head: woodfisher, magnitude)")
    ap.add_argument("--section", default=None,
                    help="results.md section (default structured-accuracy-MODELS)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--write-doc", action="store_true",
                    help="write the table into docs/results.md (structured-accuracy-MODELS)")
    ft = ap.add_argument_group("fine-tuning (--finetune: wfcore runs, scheduler.name=gradual)")
    ft.add_argument("--finetune", action="store_true",
                    help="one-shot and gradual with fine-tuning, side by side (methods: "
                         "woodfisher, magnitude, tp-*)")
    ft.add_argument("--ft-epochs", type=int, default=5, help="scheduler.epochs")
    ft.add_argument("--ft-end-epoch", type=int, default=2,
                    help="scheduler.end_epoch: the last step (one every epoch from 0)")
    ft.add_argument("--ft-initial", type=float, default=0.25,
                    help="scheduler.initial_sparsity (share of FLOPs removed at epoch 0)")
    ft.add_argument("--ft-lr", type=float, default=0.01, help="scheduler.lr")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.finetune:
        return finetune_table(args)
    if args.unit == "head" and any(m.startswith(("tp-", "taylor"))
                                   for m in args.methods.split(",")):
        raise SystemExit("--unit head: methods woodfisher, woodfisher-noupdate, magnitude")
    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = run_one(model_name, method, seed, args.target, args.num_grads,
                              args.overrides, args.min_keep, args.damp, args.unit)
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            accs = [r["top1"] for r in rows if r["model"] == model_name and r["method"] == method]
            raw = [r["top1_no_bn_recalibration"] for r in rows
                   if r["model"] == model_name and r["method"] == method]
            s = {"model": model_name, "method": method, "mean": statistics.mean(accs),
                 "std": statistics.pstdev(accs), "mean_no_bn_recalibration": statistics.mean(raw),
                 "seeds": len(accs)}
            summary.append(s)
            print(json.dumps({"summary": s}), flush=True)
    table = markdown(summary, rows)
    if args.markdown:
        print(table)
    if args.write_doc and args.unit == "head":
        write_heads(args, table, rows)
    elif args.write_doc:
        extra = " ".join(args.overrides) or "none"
        notes = (f"One-shot, {100 * args.target:.0f}% of the Conv/Linear FLOPs removed, "
                 f"seeds {args.seeds} (each seed trains its own dense model: "
                 + "; ".join(f"{m}: {' '.join(o)}" for m, o in MODELS.items()
                             if m in args.models.split(","))
                 + f", the rest as configs/mnist_cnn.yaml; extra overrides: {extra}). "
                 f"m = {args.num_grads} gradients for woodfisher (damp {args.damp} x mean "
                 "diagonal) "
                 "and taylor. Every method goes through the same global allocator "
                 f"(structure.min_keep {args.min_keep}, round_to 1) and the same BatchNorm "
                 "re-estimation (1,024 training samples); tp-* are Torch-Pruning's "
                 "importances of the same groups. Top-1 on the 1,000 embedded test images.")
        models = args.models.replace(",", "-")
        title = (f"Channel pruning: one-shot accuracy at {100 * args.target:.0f}% FLOPs "
                 f"removed ({args.models}; {args.methods})")
        write_section(args.section or f"structured-accuracy-{models}", title, table,
                      notes=notes)


def write_heads(args: argparse.Namespace, table: str, rows: list[dict[str, Any]]) -> None:
    heads = statistics.mean(r["units_removed"] for r in rows)
    extra = " ".join(args.overrides) or "none"
    notes = (f"One-shot, whole attention heads removed (structure.unit head) until "
             f"{100 * args.target:.0f}% of the model's FLOPs are gone ({heads:.1f} heads "
             "removed on average), seeds "
             f"{args.seeds}, each on its own dense model (configs/{args.models}.yaml as it is, "
             f"the comparison's dense models; extra overrides: {extra}). woodfisher: group "
             f"OBS over the whole Fisher with the OBS update (m = {args.num_grads}, damp "
             f"{args.damp} x mean diagonal) of the weights that read a head (its out_proj "
             "columns); magnitude: group L2 of the head's Q, K, V rows and out_proj columns. "
             f"Same global allocator (structure.min_keep {args.min_keep}); no fine-tuning; "
             "no BatchNorm (the column without re-estimation is the same top-1). Top-1 on "
             "the 1,000 embedded test images.")
    title = (f"Head pruning: one-shot accuracy at {100 * args.target:.0f}% FLOPs removed "
             f"({args.models}; {args.methods})")
    write_section(args.section or f"structured-accuracy-heads-{args.models.replace(',', '-')}",
                  title, table, notes=notes)


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | top-1 % (mean ± std) | per seed | without BN re-estimation "
             "| dense | FLOPs / params removed |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        mine = [r for r in rows if r["model"] == s["model"] and r["method"] == s["method"]]
        seeds = " / ".join(f"{100 * r['top1']:.1f}" for r in mine)
        dense = statistics.mean(r["dense"] for r in mine)
        flops = statistics.mean(r["flops_removed"] for r in mine)
        params = statistics.mean(r["params_removed"] for r in mine)
        lines.append(f"| {s['model']} | {s['method']} | {100 * s['mean']:.2f} ± "
                     f"{100 * s['std']:.2f} | {seeds} | "
                     f"{100 * s['mean_no_bn_recalibration']:.2f} | {100 * dense:.2f} | "
                     f"{100 * flops:.1f}% / {100 * params:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
