"""The ``wfcore`` command: prune, plugins (and the subcommands that plugins of the
project add). User errors print one line and exit 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from wfcore import __version__
from wfcore.errors import WfcoreError

log = logging.getLogger("wfcore")


def cmd_prune(args: argparse.Namespace) -> int:
    from wfcore import config, pipeline
    from wfcore.report import table

    cfg = config.load(args.config, args.overrides)
    report = pipeline.run(cfg, force=args.force)
    print(table(report))
    print(f"\nrun directory: {report['config']['output'] or 'runs/' + report['name']}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from wfcore import config, manager

    modules = list(args.plugin or [])
    if args.config:
        modules += list(config.load(args.config, []).plugins)
    plugins = manager.build(modules)
    width = max(len(name) for name in plugins.info) + 2
    for info in plugins.info.values():
        print(f"{info.name:<{width}}{info.source}")
        for kind, names in info.registers.items():
            print(f"{'':<{width}}  {kind}: {', '.join(names)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prune": cmd_prune,
    "plugins": cmd_plugins,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wfcore", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"wfcore {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model as a config says")
    prune.add_argument("config", help="YAML config (see configs/)")
    prune.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")
    prune.add_argument("--force", action="store_true",
                       help="overwrite a finished run in the output directory")

    plugins = sub.add_parser("plugins", help="list plugins and what they register")
    plugins.add_argument("config", nargs="?", help="also load the config's plugins: modules")
    plugins.add_argument("--plugin", action="append", help="an extra plugin module to import")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():
            return COMMANDS[args.command](args)
    except WfcoreError as exc:
        print(f"wfcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wfcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
