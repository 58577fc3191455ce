"""The ingest worker's metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import CommonMetrics


class IngestMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry, node_id: str) -> None:
        super().__init__(registry, "ingest", node_id)
        self.records = Counter(
            "crm_events_ingest_records",
            "Kafka records taken by ingest, by outcome: written to the stream, duplicate "
            "(already applied, skipped) or dead (sent to the dead-letter stream).",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "crm_events_dead_letters",
            "Invalid Kafka records stored in the dead-letter stream, by reason.",
            ["reason"],
            registry=registry,
        )
        self.lag = Gauge(
            "crm_events_consumer_lag",
            "Records in Kafka not yet applied to Redis (highwater - position), per partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "crm_events_ingest_batch_duration_seconds",
            "Time of the atomic Redis step for one batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.backend_errors = Counter(
            "crm_events_backend_errors",
            "Failed calls to a backend (kafka or redis) that were retried.",
            ["backend"],
            registry=registry,
        )
        self.last_applied = Gauge(
            "crm_events_ingest_last_applied_timestamp_seconds",
            "Unix time of the last batch applied to Redis.",
            registry=registry,
        )
        for outcome in ("written", "duplicate", "dead"):
            self.records.labels(outcome=outcome)
        for backend in ("kafka", "redis"):
            self.backend_errors.labels(backend=backend)
