from __future__ import annotations

import pytest
import torch


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
