"""Metric helpers shared by both processes. Each app gets its own ``CollectorRegistry``
(injected), so tests never see another test's numbers."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import version

__all__ = ["CONTENT_TYPE_LATEST", "REQUEST_DURATION_BUCKETS_S", "CommonMetrics", "render"]

# History answered from the replay ring takes well under a millisecond in the handler; one
# that reads Redis a few; the top buckets catch a stalled backend.
REQUEST_DURATION_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class CommonMetrics:
    """Metrics every process exports, under the names the seed's rules already use."""

    def __init__(
        self,
        registry: CollectorRegistry,
        role: str,
        node_id: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.http_requests = Counter(
            "crm_events_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["path", "method", "status"],
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "crm_events_http_request_duration_seconds",
            "Time from a request reaching the application to its handler's answer (writing "
            "the body to the socket excluded), by route template and method; a request "
            "whose client left first is observed too, up to its leaving. Streams (SSE) are "
            "not observed: their duration is the client's visit, not the server's work.",
            ["path", "method"],
            buckets=REQUEST_DURATION_BUCKETS_S,
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
            "Always 1; labels say which role and node this process is, the crm-events version "
            "and the source revision it was built from (CRM_EVENTS_REVISION, else unknown).",
            ["role", "node", "version", "revision"],
            registry=registry,
        )
        self.info.labels(
            role=role,
            node=node_id,
            version=version.version(),
            revision=version.revision(environ),
        ).set(1)
        # process_start_time_seconds and friends: restarts, memory and CPU per process.
        ProcessCollector(registry=registry)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
