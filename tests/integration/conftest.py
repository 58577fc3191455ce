"""Fixtures over the real services: Kafka and Redis (see tests/harness/backends.py), plus
private ingest/edge/nginx processes per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backends, provide
from tests.harness.cluster import Cluster

# test_rebalance.py runs only on request (`make rebalance`): it once hung while an in-process
# worker stopped mid-rebalance, and a hang must not block the whole suite.
collect_ignore = [] if os.environ.get("CRM_EVENTS_REBALANCE_TEST") == "1" else ["test_rebalance.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    with provide() as found:
        yield found


@pytest.fixture(scope="module")
def cluster(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Ingest, two edges and nginx with default settings."""
    with Cluster(Path(tmp_path_factory.mktemp("cluster")), backends).running() as c:
        yield c


@pytest.fixture(scope="module")
def small_cluster(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A deployment with a short replay stream and a small event size limit."""
    small = Cluster(
        Path(tmp_path_factory.mktemp("small")),
        backends,
        env={
            "CRM_EVENTS_STREAM_MAXLEN": "100",
            "CRM_EVENTS_EVENT_MAX_BYTES": "4096",
            "CRM_EVENTS_CLIENT_BUFFER_BYTES": "65536",
            # Fewer events in the edges' memory than in the stream, so that positions
            # before the retained window take the Redis path (trim detection, reset).
            "CRM_EVENTS_REPLAY_RING_BYTES": "40000",
        },
    )
    with small.running() as c:
        yield c
