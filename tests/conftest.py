"""Shared pytest configuration.

Hypothesis runs derandomized under the ``ci`` profile (the default here), so the suite is
reproducible and fast; select another profile with HYPOTHESIS_PROFILE=<name>.
"""

from __future__ import annotations

import os

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
