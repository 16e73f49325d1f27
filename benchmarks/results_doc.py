"""Write a benchmark's table into docs/results.md, with the facts that make it checkable.

Every measured table in the documentation is written by the benchmark that measured it,
never typed: ``write_section`` replaces (or appends) the section between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and heads it with the date, the
commit, the machine and the exact command, so a reader can rerun any number.

    from results_doc import write_section     # benchmarks/ is on sys.path for its scripts
    write_section("layerwise", "Layer-wise pruners, one-shot", table_markdown)

The file is written atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
HEADER = (
    "# Measured results\n\n"
    "Every table below is written by the benchmark named in its `command:` line "
    "(`benchmarks/results_doc.py`), with the date, commit and machine it ran on. "
    "Rerun the command to check a number; timings are ratios measured within one run.\n"
)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "wfcore", "plugins", "export"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """One line: CPU model, cores this process may use, memory, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch
        tv = f", torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        tv = ""
    return f"{cpu}, {cores} cores{mem}, Python {platform.python_version()}{tv}"


_this_machine = machine  # write_section's ``machine`` parameter shadows the name


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run, relative to the checkout."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(ROOT))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def write_section(name: str, title: str, body: str, *,
                  command: str | list[str] | None = None, notes: str = "",
                  path: Path = RESULTS, date: str | None = None, commit: str | None = None,
                  machine: str | None = None) -> Path:
    """Replace or append the section ``name`` of ``path`` (docs/results.md).

    ``body`` is the markdown table (or tables); ``notes`` a paragraph printed under it;
    ``command`` one command or several (one ``command:`` line each; default: this
    process's own command line).

    A table measured earlier and carried over without a rerun gives the ``date``, the
    ``commit`` and the ``machine`` of that measurement (all three, or none); its
    stamp then says that it was carried over, not measured by this process.
    """
    if not re.fullmatch(r"[a-z0-9_.-]+", name):
        raise ValueError(f"results section name {name!r}: use lowercase letters, digits, _.-")
    carried = [date, commit, machine]
    if any(v is not None for v in carried) and not all(v for v in carried):
        raise ValueError(f"results section {name!r}: a carried-over table needs date, "
                         "commit and machine together")
    commands = [command] if isinstance(command, str) else list(command or [command_line()])
    if not commands or not all(c and c.strip() for c in commands):
        raise ValueError(f"results section {name!r}: every command must be given")
    if date is None:
        stamp = f"*{_dt.date.today().isoformat()}, commit {_commit()}, {_this_machine()}*  \n"
    else:
        stamp = (f"*{date}, commit {commit}, {machine}; carried over, measured at "
                 f"commit {commit} and not rerun since*  \n")
    stamp += "  \n".join(f"command: `{c}`" for c in commands) + "\n"
    section = (f"<!-- results:{name} -->\n## {title}\n\n{stamp}\n{body.rstrip()}\n"
               + (f"\n{notes.rstrip()}\n" if notes else "") + f"<!-- /results:{name} -->\n")
    text = path.read_text() if path.exists() else HEADER
    tag = re.escape(name)
    pattern = re.compile(rf"<!-- results:{tag} -->\n.*?<!-- /results:{tag} -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
