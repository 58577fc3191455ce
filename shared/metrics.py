"""Metric helpers shared by both processes. Each app gets its own ``CollectorRegistry``
(injected), so tests never see another test's numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "CommonMetrics", "render"]


class CommonMetrics:
    """Metrics every process exports, under the names the seed's rules already use."""

    def __init__(self, registry: CollectorRegistry, role: str, node_id: str) -> None:
        self.http_requests = Counter(
            "crm_events_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["path", "method", "status"],
            registry=registry,
        )
        self.messages = Counter(
            "crm_events_messages",
            "Events handled by this process: on ingest, written to the replay stream; "
            "on an edge, received from Redis for fan-out.",
            registry=registry,
        )
        self.ready = Gauge(
            "crm_events_ready",
            "1 while this process can do its job (see /readyz), else 0.",
            registry=registry,
        )
        self.info = Gauge(
            "crm_events_build_info",
            "Always 1; labels say which role and node this process is.",
            ["role", "node"],
            registry=registry,
        )
        self.info.labels(role=role, node=node_id).set(1)
        # process_start_time_seconds and friends: restarts, memory and CPU per process.
        ProcessCollector(registry=registry)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
