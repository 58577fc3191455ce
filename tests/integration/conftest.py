"""Fixtures over the real services: Kafka and Redis (see tests/harness/backends.py), plus
private ingest/edge/nginx processes per test module."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness.backends import Backends, ClusterGroup, SentinelGroup, provide, redis_mode
from tests.harness.cluster import Cluster
from tests.harness.ha_cluster import HACluster

REDIS_MODES = ("single", "sentinel", "cluster")
"""The Redis modes the shared suites run in (pipeline, resume, history, access, dead letters):
one Redis; a primary with a replica seen through three Sentinels (``redis+sentinel://``); a
Redis Cluster of 3 masters with a replica each. None of them is failed over here: failovers
are in test_sentinel.py, test_failover.py and test_cluster_backend.py."""

# test_rebalance.py runs only on request (`make rebalance`): it once hung while an in-process
# worker stopped mid-rebalance, and a hang must not block the whole suite.
collect_ignore = [] if os.environ.get("CRM_EVENTS_REBALANCE_TEST") == "1" else ["test_rebalance.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for one test (modules with other needs define their own)."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    with provide() as found:
        yield found


@pytest.fixture(scope="session")
def redis_cluster_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    """One Redis Cluster for the whole session, started the first time a suite asks for
    cluster mode; every deployment on it has its own key prefix."""
    with ClusterGroup(Path(tmp_path_factory.mktemp("redis-cluster"))) as group:
        yield group


@pytest.fixture(scope="session")
def redis_sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One Redis primary with a replica and three Sentinels for the whole session, started the
    first time a suite asks for Sentinel mode; every deployment on it has its own key prefix.
    Nothing here fails it over, so a primary slow to answer on a busy machine must not look
    down: a longer ``down-after`` than the failover tests' group."""
    with SentinelGroup(
        Path(tmp_path_factory.mktemp("redis-sentinel")), down_after_ms=10_000
    ) as group:
        yield group


def backends_in_mode(request: pytest.FixtureRequest, backends: Backends, mode: str) -> Backends:
    """The shared Kafka with the Redis of ``mode``."""
    if mode == "single":
        # The environment's Redis (CRM_EVENTS_TEST_REDIS_URL or the stack's): a Sentinel or
        # Cluster URL there would run another mode under the name "single".
        found = redis_mode(backends)
        if found != "single":
            raise ValueError(f"the test Redis URL is a {found} URL; single mode needs one server")
        return backends
    group: SentinelGroup | ClusterGroup
    if mode == "sentinel":
        group = request.getfixturevalue("redis_sentinel_group")
    elif mode == "cluster":
        group = request.getfixturevalue("redis_cluster_group")
    else:
        raise ValueError(f"unknown Redis mode {mode!r}")
    return Backends(backends.kafka_bootstrap, group.url, mode)


@pytest.fixture(scope="module", params=REDIS_MODES)
def redis_backends(request: pytest.FixtureRequest, backends: Backends) -> Backends:
    """Backends in each Redis mode in turn: a module whose deployment uses this runs once per
    mode (pytest groups its tests by mode)."""
    return backends_in_mode(request, backends, request.param)


@pytest.fixture(scope="module")
def cluster(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Ingest, two edges and nginx with default settings."""
    with Cluster(Path(tmp_path_factory.mktemp("cluster")), backends).running() as c:
        yield c


@pytest.fixture(scope="module")
def small_cluster(
    redis_backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A deployment with a short replay stream and a small event size limit (in each Redis
    mode)."""
    small = HACluster(
        Path(tmp_path_factory.mktemp("small")),
        redis_backends,
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
