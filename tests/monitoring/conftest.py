"""Fixtures of the monitoring tests: the promtool/amtool/prometheus/alertmanager binaries
(a test that needs one is skipped, with the reason, only when it is not installed; `make
install` installs them, so under CI=true that skip fails the run: see tests/conftest.py), and
for the live test the real Kafka and Redis (see tests/harness/backends.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.backends import Backends, provide

from .support import binary

INSTALL_HINT = "install it with: apt-get install -y prometheus prometheus-alertmanager"


def _need(name: str) -> str:
    path = binary(name)
    if path is None:
        pytest.skip(f"{name} is not installed; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _need("promtool")


@pytest.fixture(scope="session")
def amtool() -> str:
    return _need("amtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _need("prometheus")


@pytest.fixture(scope="session")
def alertmanager_bin() -> str:
    return _need("prometheus-alertmanager")


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    """Kafka and Redis for the live test (the same resolution as tests/integration)."""
    with provide() as found:
        yield found
