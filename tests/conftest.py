from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from plugin_packages import pip_install

ROOT = Path(__file__).parents[1]
# What decides the weights of a dense model besides its cache key (the model's and data's
# names and options, the train section, the seed, the plugin versions, a data fingerprint):
# the code that builds and seeds a model, of the training loop, and of the built-in and test
# models and data sets (a file moved falls back to every source file; name the new one here).
DENSE_CODE = ("wfcore/run/prepare.py", "wfcore/run/training.py", "plugins/models.py",
              "plugins/architectures.py", "plugins/datasets.py", "tests/user_models.py")


def code_fingerprint() -> str:
    """A hash of torch's version and the code in DENSE_CODE; of every source file under
    wfcore/ and plugins/ when one of those files has moved."""
    paths = [ROOT / name for name in DENSE_CODE]
    if not all(p.is_file() for p in paths):
        paths = sorted([*(ROOT / "wfcore").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
    h = hashlib.sha256(torch.__version__.encode())
    for path in [*paths, *sorted((ROOT / "tests" / "fixtures").rglob("*.py"))]:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def dense_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests' dense models are cached: trained once per machine and code, kept
    between test runs and shared by test processes that run at once (each file is written
    to a temporary name and renamed into place, ``wfcore.files``).

    ``$WFCORE_TEST_CACHE/<fingerprint>``, by default under ``$XDG_CACHE_HOME`` (else
    ~/.cache) ``/wfcore/test-dense``; ``WFCORE_TEST_CACHE=tmp``: a fresh cache for this
    session only (every dense model trained again). Never the user's own ``WFCORE_CACHE``.
    """
    setting = os.environ.get("WFCORE_TEST_CACHE", "")
    if setting == "tmp":
        return tmp_path_factory.mktemp("wfcore-cache")
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(setting or Path(base) / "wfcore" / "test-dense").expanduser()
    path = root / code_fingerprint()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a session's own cache after all
        return tmp_path_factory.mktemp("wfcore-cache")
    return path


@pytest.fixture(autouse=True, scope="session")
def _dense_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tests' dense-model cache (``dense_cache``), never the user's. A test of caching
    itself gives its run its own ``cache_dir``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WFCORE_CACHE", str(dense_cache(tmp_path_factory)))
    mp.setenv("NM_DISABLE_ANALYTICS", "1")
    yield
    mp.undo()


@pytest.fixture
def one_thread():
    """One intra-op thread: faster for small models on a busy machine, and as exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``plugin_site(name)``: the directory where the fixture package ``name`` is installed
    with pip (once a session)."""
    sites: dict[str, Path] = {}

    def site(name: str) -> Path:
        if name not in sites:
            sites[name] = pip_install(name, tmp_path_factory.mktemp(name))
        return sites[name]

    return site
