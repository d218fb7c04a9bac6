"""Shared pytest configuration.

Hypothesis runs derandomized under the ``ci`` profile (the default here), so the suite is
reproducible and fast; select another profile with HYPOTHESIS_PROFILE=<name>.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,  # derandomized runs replay nothing; and the DB's settings lookups hit a
    # RecursionError after ~850 parametrized cases in one process
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite keeps parser tables and ASTs (convlens.cache) in a folder of its own, not in
    the user's ~/.cache, unless CONVLENS_CACHE_DIR says where."""
    if "CONVLENS_CACHE_DIR" in os.environ:
        yield
        return
    patch = pytest.MonkeyPatch()
    patch.setenv("CONVLENS_CACHE_DIR", str(tmp_path_factory.mktemp("convlens-cache")))
    try:
        yield
    finally:
        patch.undo()
