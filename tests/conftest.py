"""Suite-wide settings: nothing a test does is written outside its temporary folders."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _decoder_cache(tmp_path_factory):
    """Fitted matching decoders (``decoder_fit: auto``) go to a temporary cache, never ``~/.cache``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HMKD_CACHE", str(tmp_path_factory.mktemp("hmkd_cache")))
    yield
    mp.undo()
