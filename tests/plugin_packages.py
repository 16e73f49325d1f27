"""The plugin packages of tests/fixtures, installed with pip the way a user installs one,
and the ``wfcore`` command run where they are importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def pip_install(name: str, workdir: Path) -> Path:
    """Install the package ``tests/fixtures/<name>`` into ``workdir/site`` and return that
    directory: offline, without dependencies, with the build backend of this environment."""
    source = shutil.copytree(FIXTURES / name, workdir / "src" / name)
    site = workdir / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True)
    return site


def wfcore_subprocess(site: Path, *args: str) -> subprocess.CompletedProcess:
    """``wfcore ARGS`` in a new process that finds the packages installed in ``site``."""
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "wfcore.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)
