"""Markers of the integration suites."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "transformers_slow: the differential cases beyond the first class of each "
        "model family (tests/integration/test_all_architectures.py); CI runs them")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The differential tests of one architecture class run one after the other (pytest's own
    order is every class for the first test, then every class for the second), so that
    test_all_architectures.py can drop a class's tiny model once both have used it. Only that
    module's items move, among the positions they already hold."""
    where = [i for i, item in enumerate(items)
             if item.nodeid.split("::")[0].endswith("test_all_architectures.py")
             and hasattr(item, "callspec") and "built" in item.callspec.params]
    mine = [items[i] for i in where]
    order = {}
    for item in mine:
        order.setdefault(item.callspec.params["built"], len(order))
    mine.sort(key=lambda item: order[item.callspec.params["built"]])  # stable: test order kept
    for i, item in zip(where, mine, strict=True):
        items[i] = item
