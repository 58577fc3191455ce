"""The ingest worker's metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import CommonMetrics

REFILL_REASONS = ("lost", "rolled_back", "assigned")
"""Why a partition was refilled (``crm_events_refills_total{reason}``)."""


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
        self.refills = Counter(
            "crm_events_refills",
            "Partitions whose Redis copy was rebuilt from Kafka, by reason: lost (Redis held no "
            "state for a partition it had), rolled_back (Redis held less than it had "
            "acknowledged: a failover to a lagging replica), assigned (no state when the "
            "partition was assigned: a fresh or wiped Redis).",
            ["partition", "reason"],
            registry=registry,
        )
        self.refilled_records = Counter(
            "crm_events_refilled_records",
            "Kafka records applied again to Redis by refills, per partition.",
            ["partition"],
            registry=registry,
        )
        self.wait_timeouts = Counter(
            "crm_events_redis_wait_timeouts",
            "WAITs answered by fewer replicas than CRM_EVENTS_REDIS_WAIT_REPLICAS: the "
            "batch's offsets are committed only after a later WAIT succeeds.",
            registry=registry,
        )
        self.stream_length = Gauge(
            "crm_events_stream_length",
            "Entries in a partition's replay stream (XLEN), sampled every few seconds by the "
            "ingest worker that owns the partition.",
            ["partition"],
            registry=registry,
        )
        for outcome in ("written", "duplicate", "dead"):
            self.records.labels(outcome=outcome)
        for backend in ("kafka", "redis"):
            self.backend_errors.labels(backend=backend)

    def export_partition(self, partition: int) -> None:
        """Export a newly assigned partition's refill counters at 0 (kept after a revoke):
        a child first created by its increment starts at 1, and ``increase()`` and the
        refill alert would never see that first refill."""
        label = str(partition)
        for reason in REFILL_REASONS:
            self.refills.labels(label, reason)
        self.refilled_records.labels(label)
