"""Suite-wide settings: tests that disrupt the shared stack (killing replicas) run last, and
tests that replace its app with another profile's (``redeploys``) run after those."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("redeploys") is not None:
            return 2
        return 1 if item.get_closest_marker("disruptive") is not None else 0

    items.sort(key=order)
