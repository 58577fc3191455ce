"""tests/bench needs the real Kafka and Redis, like tests/integration."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/bench/test_smoke" in str(item.path):
            item.add_marker(pytest.mark.integration)
