"""The ``wfcore`` command: prune, plan, sweep, analyze, export, bench, config, options,
plugins; ``wfcore --help`` describes each, the environment it reads and examples. User
errors print one line and exit 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from wfcore import __version__
from wfcore.choices import ENGINES, QUANTIZE_MODES
from wfcore.errors import ConfigError, WfcoreError, first_line

log = logging.getLogger("wfcore")


def cmd_prune(args: argparse.Namespace) -> int:
    from wfcore import api, config, distributed
    from wfcore.run import pipeline

    if args.resume:
        cfg = pipeline.resume_config(args.resume, args.config, args.overrides)
    elif args.config is None:
        raise WfcoreError("prune needs a config file (or --resume RUN_DIR)")
    else:
        cfg = config.load(args.config, args.overrides)
    result = api.run_config(cfg, force=args.force, resume=bool(args.resume))
    if distributed.env_rank() > 0:  # rank 0 prints the result of a torchrun run
        return 0
    print(result.table())
    print(f"\nrun directory: {result.run_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from wfcore import config
    from wfcore.run import pipeline

    cfg = config.load(args.config, args.overrides)
    if args.nproc_per_node < 1:
        raise WfcoreError(f"--nproc-per-node: {args.nproc_per_node} is less than 1")
    plan = pipeline.plan_config(cfg, nproc=args.nproc_per_node)
    for line in plan.lines():
        print(line)
    plan.check()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from wfcore import config, manager

    modules, base_dir = list(args.plugin or []), None
    if args.config:
        cfg = config.load(args.config, [])
        modules, base_dir = modules + list(cfg.plugins), cfg.base_dir
    plugins = manager.build(modules, strict=False, base_dir=base_dir)
    width = max(len(name) for name in plugins.info) + 2
    for info in plugins.info.values():
        version = f" {info.version}" if info.version and info.source != "built-in" else ""
        print(f"{info.name:<{width}}{info.source}{version}")
        for kind, names in info.registers.items():
            print(f"{'':<{width}}  {kind}: {', '.join(names)}")
        if info.hooks:
            print(f"{'':<{width}}  implements: {', '.join(info.hooks)}")
        for function in info.unmarked:
            print(f"{'':<{width}}  ignored: {function} (no @wfcore.hookimpl)")
    off = manager.disabled_names()
    if off:
        print(f"disabled: {', '.join(sorted(off))}")
    for clash in plugins.clashes:
        print(f"clash: {clash}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from wfcore import config, manager
    from wfcore.run import pipeline

    cfg = config.load(args.config, args.overrides)
    plugins = manager.build(cfg.plugins, base_dir=cfg.base_dir)
    print(config.to_yaml(pipeline.resolved_config(cfg, plugins)), end="")
    return 0


def cmd_options(args: argparse.Namespace) -> int:
    from wfcore import config, manager

    plugins = manager.build()
    kind = args.kind if args.kind.endswith("s") else f"{args.kind}s"
    if kind not in manager.KINDS:
        raise WfcoreError(f"options: unknown kind '{args.kind}'"
                          f"{manager.did_you_mean(kind, manager.KINDS)}; one of "
                          f"{', '.join(manager.SINGULAR[k] for k in manager.KINDS)}")
    entry, _ = plugins.registry(kind).lookup(args.name, f"{manager.SINGULAR[kind]} name")
    rows = config.describe_options(entry.options_class)
    print(f"{manager.SINGULAR[kind]} '{entry.name}' (plugin '{entry.plugin}')")
    if not rows:
        print("  no options")
    for name, type_name, default, comment in rows:
        print(f"  {name}: {type_name} = {default}" + (f"  # {comment}" if comment else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from wfcore.run.saved import export_run

    result = export_run(args.run_dir, step=args.step, output=args.output,
                        sparsity=args.sparsity, quantize=args.quantize, opset=args.opset,
                        overrides=args.overrides)
    for kind in ("sparse", "dense"):
        if kind in result:
            r = result[kind]
            print(f"{kind:<6} {r['path']}: opset {r.get('opset')}, sparsity "
                  f"{r['sparsity']:.4f}, zeros kept "
                  f"{r['zeros']['kept_zeros']}/{r['zeros']['torch_zeros']}, ONNX Runtime max "
                  f"|diff| {r['parity']['max_abs_diff']:.2g}")
            q = r.get("quantized")
            if q:
                print(f"{'':<6} {q['path']}: INT8 for {q['layout']} ({q['calibration_samples']} "
                      f"training samples calibrate), integer zeros kept "
                      f"{q['zeros']['kept_zeros']}/{q['zeros']['torch_zeros']}, top-1 "
                      f"{q['top1']:.2%} (float {r['top1']:.2%}, ONNX Runtime, test set)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from wfcore import files
    from wfcore.export.bench import bench, format_table, summary

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.json:
        files.check_writable(args.json, "--json")  # before the timings, not after
    timings = bench(list(args.model), dense=args.dense, batch_size=args.batch_size,
                    engines=engines,
                    warmup=args.warmup, runs=args.runs, threads=args.threads,
                    min_seconds=args.min_seconds)
    print(format_table(timings))
    if args.dense and summary(timings, args.dense):
        print(summary(timings, args.dense))
    if args.json:
        files.write_json(args.json, [t.as_dict() for t in timings])
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from wfcore.tools.sweep import run_sweep, table

    result = run_sweep(args.config, args.overrides, force=args.force)
    print(table(result))
    print(f"\n{result.count('done')} ran, {result.count('skipped')} finished before, "
          f"{result.count('failed')} failed, in {result.seconds:.1f} s")
    for run in result.runs:
        if run.status == "failed":
            print(f"failed: {run.run_dir} ({run.error})")
    print(f"sweep directory: {result.root} (results.csv, results.md, "
          "accuracy_vs_sparsity.png, layer_sparsity.png)")
    return 1 if result.count("failed") else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from wfcore import config
    from wfcore.tools.analyze import analyze

    result = analyze(config.load(args.config, args.overrides), force=args.force)
    print(f"analysis directory: {result['run_dir']} (analysis.json, analysis.md, "
          f"{', '.join(result['plots'])})")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prune": cmd_prune,
    "plan": cmd_plan,
    "sweep": cmd_sweep,
    "plugins": cmd_plugins,
    "config": cmd_config,
    "options": cmd_options,
    "export": cmd_export,
    "bench": cmd_bench,
    "analyze": cmd_analyze,
}


DESCRIPTION = """\
Second-order pruning for PyTorch (WoodFisher and the usual baselines): prune a model as
a config says, compare methods, export the sparse model to checked ONNX and time it on
the CPU."""

ENVIRONMENT = """\
environment:
  WFCORE_DISABLE=a,b     plugins (names `wfcore plugins` shows, or distributions) not to
                         load, as --disable
  WFCORE_CACHE=DIR       where trained dense models are cached when the config sets no
                         cache_dir (default ~/.cache/wfcore)
  TQDM_DISABLE=1         no progress bars (-q sets it)
  NM_DISABLE_ANALYTICS=1 DeepSparse sends no usage analytics (bench sets it unless given)
  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
                         set by torchrun: a distributed run (rank 0 writes and prints)"""

EXAMPLES = """\
examples:
  wfcore prune configs/mnist_mlpnet.yaml estimator.name=magnitude output=runs/mag
  wfcore prune --resume runs/mag
  wfcore plan configs/resnet50_imagenet_gradual.yaml --nproc-per-node 4
  wfcore sweep configs/mnist_cnn.yaml estimator.name=woodfisher,kfac,magnitude
  wfcore export runs/mag --sparsity 0.9 --quantize int8
  wfcore bench runs/mag/model_step1.onnx --dense runs/mag/dense.onnx --batch-size 16
  wfcore config configs/mnist_cnn.yaml estimator.name=kfac
  wfcore analyze configs/mnist_mlpnet.yaml
  wfcore plugins
  wfcore options estimator woodfisher"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wfcore", description=DESCRIPTION,
                                epilog=f"{ENVIRONMENT}\n\n{EXAMPLES}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"wfcore {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (e.g. the ONNX sparsity table of an export)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars (sets $TQDM_DISABLE=1)")
    p.add_argument("--disable", action="append", metavar="NAME", default=[],
                   help="do not load this plugin (a name `wfcore plugins` shows, or a "
                   "distribution); repeatable; also $WFCORE_DISABLE=a,b")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (`wfcore COMMAND --help` for each one's arguments)")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand whose one-line summary is its entry in `wfcore --help` and the
        description of its own --help."""
        return sub.add_parser(name, help=summary, description=summary)

    prune = command("prune", "prune a model as a config says")
    prune.add_argument("config", nargs="?",
                       help="YAML config (see configs/); optional with --resume")
    prune.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")
    prune.add_argument("--force", action="store_true",
                       help="overwrite a finished run in the output directory")
    prune.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the interrupted run in RUN_DIR from its last checkpoint "
                       "(its config.yaml is used unless a config is given)")

    plan = command("plan", "memory, disk and time of a run's first pruning step, "
                   "before anything heavy (exit 2 if it cannot fit)")
    plan.add_argument("config", help="YAML config (see configs/)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")
    plan.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                      help="also show each rank's share for a torchrun run of N processes")

    sweep = command("sweep", "run every combination of key=a,b,c overrides; "
                    "one CSV table and accuracy-vs-sparsity plots")
    sweep.add_argument("config", help="YAML config (see configs/)")
    sweep.add_argument("overrides", nargs="*",
                       help="key=value (every run) or key=a,b,c (swept); output=DIR is the "
                       "sweep directory (default runs/sweep-<name>)")
    sweep.add_argument("--force", action="store_true",
                       help="run finished runs again instead of skipping them")

    show = command("config", "print the resolved config: the file, the overrides "
                   "and every component's options with their defaults")
    show.add_argument("config", help="YAML config (see configs/)")
    show.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")

    options = command("options", "a component's options, defaults and comments")
    options.add_argument("kind", help="estimator, scorer, allocator, scheduler, exporter, "
                         "model, dataset or hook (an event hook's options, hooks.<name>)")
    options.add_argument("name", help="its registered name, e.g. woodfisher")

    plugins = command("plugins", "list plugins: where from, version, what they "
                      "register and which hooks they implement; clashes too")
    plugins.add_argument("config", nargs="?", help="also load the config's plugins: modules")
    plugins.add_argument("--plugin", action="append", help="an extra plugin module to import")

    export = command("export", "export a run's pruned model (and its dense one) to "
                     "ONNX, with the zero and parity checks")
    export.add_argument("run_dir", help="a run directory (holds config.yaml, model_step<N>.pt)")
    export.add_argument("overrides", nargs="*", help="export.KEY=VALUE in place of the run's "
                        "export options (OmegaConf dot-list), e.g. export.opset=17 "
                        "export.quantize=int8 export.calibration_samples=256")
    export.add_argument("--step", type=int, help="the step to export (default: the last)")
    export.add_argument("--sparsity", type=float,
                        help="or the last step with this target sparsity (e.g. 0.9)")
    export.add_argument("-o", "--output", help="the ONNX file (default: RUN_DIR/"
                        "model_step<N>.onnx); dense.onnx is written beside it")
    export.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="int8: also write <name>.int8.onnx beside each model, statically "
                        "quantized on training samples with the zeros kept (default: the "
                        "run's export.quantize)")
    export.add_argument("--opset", type=int,
                        help="the ONNX opset (default: the run's export.opset, else the "
                        "lowest from 13 up that exports the model)")

    analyze = command("analyze", "compare each estimator's curvature with the "
                      "exact Hessian and Fishers (the config's analyze section)")
    analyze.add_argument("config", help="YAML config (see configs/)")
    analyze.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")
    analyze.add_argument("--force", action="store_true",
                         help="replace an earlier analysis in the output directory")

    bench = command("bench", "time an ONNX model on DeepSparse, ONNX Runtime "
                    "and PyTorch")
    bench.add_argument("model", nargs="+", help="the (sparse) ONNX models, e.g. a float "
                       "and an INT8 export, timed in one run")
    bench.add_argument("--dense", help="the dense ONNX model: speed-ups are against it on "
                       "ONNX Runtime")
    bench.add_argument("--batch-size", type=int, default=1, help="items per batch (default: 1)")
    bench.add_argument("--engines", default=",".join(ENGINES),
                       help=f"comma-separated: {', '.join(ENGINES)} (default: all three)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed batches first (default: 5)")
    bench.add_argument("--runs", type=int, default=20, help="timed rounds, at least; each round "
                       "runs every model on every engine once (default: 20)")
    bench.add_argument("--min-seconds", type=float, default=2.0,
                       help="and time rounds for at least this long (default: 2)")
    bench.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    bench.add_argument("--json", help="also write the timings to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from wfcore import distributed

    args = parser().parse_args(argv)
    if args.disable:  # one place every manager.build() reads, sweeps and sub-runs included
        from wfcore.manager import DISABLE_ENV

        os.environ[DISABLE_ENV] = ",".join(
            [n for n in os.environ.get(DISABLE_ENV, "").split(",") if n] + args.disable)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's own switch; explicit sites check it too
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if distributed.env_rank() > 0:  # under torchrun rank 0 speaks for the run
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    finished = False
    try:
        with logging_redirect_tqdm():
            code = COMMANDS[args.command](args)
        finished = True
        return code
    except WfcoreError as exc:
        # every rank reads the same config and arguments: an error in them, met before the
        # process group exists, is every rank's too
        agreed = isinstance(exc, distributed.AgreedError) or (
            isinstance(exc, ConfigError) and not distributed.initialized())
        _error(exc, agreed=agreed)
        return 2
    except OSError as exc:  # the machine's, not the code's: a file that cannot be read
        _error(exc)
        return 2
    except KeyboardInterrupt as exc:  # the pipeline says how to resume, where it can
        if distributed.env_rank() == 0:
            print(f"wfcore: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(barrier=finished)


def _error(exc: BaseException, agreed: bool = False) -> None:
    """One line on stderr: once for an error every rank raised, else with the rank's number
    when it is not rank 0's."""
    from wfcore import distributed

    rank = distributed.env_rank()
    if rank > 0 and agreed:
        return
    where = f"rank {rank}: " if rank > 0 else ""
    print(f"wfcore: error: {where}{first_line(exc)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
