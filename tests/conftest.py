from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _dense_cache(tmp_path_factory: pytest.TempPathFactory):
    """One dense-model cache for the whole test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WFCORE_CACHE", str(tmp_path_factory.mktemp("wfcore-cache")))
    mp.setenv("NM_DISABLE_ANALYTICS", "1")
    yield
    mp.undo()
