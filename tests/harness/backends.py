"""Where the tests find Kafka and Redis.

1. ``CRM_EVENTS_TEST_KAFKA`` / ``CRM_EVENTS_TEST_REDIS_URL`` when set (``make test`` sets them
   to the services the project's own scripts started);
2. otherwise, when a Docker engine answers, throwaway testcontainers;
3. otherwise the local defaults, 127.0.0.1:9092 and redis://127.0.0.1:6379/0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Backends:
    kafka_bootstrap: str
    redis_url: str
    origin: str

    @property
    def redis_host(self) -> str:
        return urlsplit(self.redis_url).hostname or "127.0.0.1"

    @property
    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def provide() -> Iterator[Backends]:
    kafka = os.environ.get("CRM_EVENTS_TEST_KAFKA")
    redis_url = os.environ.get("CRM_EVENTS_TEST_REDIS_URL")
    if kafka and redis_url:
        yield Backends(kafka, redis_url, "environment")
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        with KafkaContainer().with_kraft() as k, RedisContainer() as r:
            host = r.get_container_host_ip()
            port = r.get_exposed_port(6379)
            yield Backends(k.get_bootstrap_server(), f"redis://{host}:{port}/0", "testcontainers")
        return
    yield Backends(
        kafka or "127.0.0.1:9092", redis_url or "redis://127.0.0.1:6379/0", "local defaults"
    )
