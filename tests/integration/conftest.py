"""Markers of the integration suites."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "transformers_slow: the differential cases beyond the first class of each "
        "model family (tests/integration/test_all_architectures.py); CI runs them")
