from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from plugin_packages import pip_install


@pytest.fixture(autouse=True, scope="session")
def _dense_cache(tmp_path_factory: pytest.TempPathFactory):
    """One dense-model cache for the whole test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WFCORE_CACHE", str(tmp_path_factory.mktemp("wfcore-cache")))
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
