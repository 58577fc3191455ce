"""The edge's metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import CommonMetrics

from .bus import BAD_INPUT_REASONS
from .limits import LIMITS
from .resume import RESET_REASONS

# 0.05 and 0.1 are boundaries on purpose: the latency SLO is expressed on them.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

DISCONNECT_REASONS = ("client_closed", "slow", "shutdown", "token_expired", "error")
AUTH_FAILURES = ("unauthorized", "forbidden", "invalid_certificate")


class EdgeMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry, node_id: str) -> None:
        super().__init__(registry, "edge", node_id)
        self.clients = Gauge(
            "crm_events_sse_clients", "SSE clients connected to this edge.", registry=registry
        )
        self.connections = Counter(
            "crm_events_sse_connections", "SSE streams opened on this edge.", registry=registry
        )
        self.disconnects = Counter(
            "crm_events_sse_disconnects",
            "SSE streams ended, by reason (client_closed, slow, shutdown, token_expired, error).",
            ["reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "crm_events_delivery_latency_seconds",
            "Kafka record timestamp to the write of the event to client sockets, for the oldest "
            "event of each batch: observed once per batch written directly to idle clients, and "
            "once per queued write to a client that had a backlog (an upper bound for the rest).",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.resumes = Counter(
            "crm_events_sse_resumes",
            "Streams opened with a Last-Event-ID, by outcome (resumed gap-free, or reset).",
            ["outcome"],
            registry=registry,
        )
        self.resets = Counter(
            "crm_events_sse_resets",
            "In-band reset events sent (stream and history), by overall reason: trimmed, "
            "not_retained, topic_changed, old_format.",
            ["reason"],
            registry=registry,
        )
        self.partition_resets = Counter(
            "crm_events_partition_resets",
            "Partitions named in the reset events sent, by partition and reason (trimmed, "
            "not_retained, topic_changed, old_format).",
            ["partition", "reason"],
            registry=registry,
        )
        self.replayed = Counter(
            "crm_events_sse_replayed_events",
            "Events sent to resuming clients from the replay stream.",
            registry=registry,
        )
        self.ring_reads = Counter(
            "crm_events_replay_ring_reads",
            "Resume positions and history requests looked up in the in-memory replay ring: "
            "hit (served from memory) or miss (read from Redis).",
            ["outcome"],
            registry=registry,
        )
        self.ring_events = Gauge(
            "crm_events_replay_ring_events",
            "Events held in the in-memory replay ring (all partitions).",
            registry=registry,
        )
        self.ring_bytes = Gauge(
            "crm_events_replay_ring_bytes",
            "Approximate bytes held by the in-memory replay ring (all partitions), at most "
            "CRM_EVENTS_REPLAY_RING_BYTES.",
            registry=registry,
        )
        self.bus_reconnects = Counter(
            "crm_events_bus_reconnects",
            "Times the edge's Redis subscription was lost and re-established.",
            registry=registry,
        )
        self.bus_repaired = Counter(
            "crm_events_bus_repaired_events",
            "Events read from the stream to fill a gap after the subscription came back.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "crm_events_auth_failures",
            "Requests refused by authentication (unauthorized: 401; invalid_certificate: 401, "
            "a relayed client certificate that does not decode or has expired) or "
            "authorisation (forbidden: 403).",
            ["reason"],
            registry=registry,
        )
        self.untrusted_cert_headers = Counter(
            "crm_events_untrusted_cert_headers",
            "Requests carrying the client-certificate header (CRM_EVENTS_CLIENT_CERT_HEADER) "
            "from a peer not in CRM_EVENTS_TRUSTED_PROXIES: the header was ignored, as if "
            "absent. Counted where CRM_EVENTS_AUTH_MODE reads certificates; any increase is "
            "a client trying to speak for the load balancer, or a proxy missing from the list.",
            registry=registry,
        )
        self.limit_rejections = Counter(
            "crm_events_limit_rejections",
            "Requests refused by a limit: connections, connections_per_ip, history_rate, "
            "request_line, headers, types.",
            ["limit"],
            registry=registry,
        )
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason=reason)
        for limit in LIMITS:
            self.limit_rejections.labels(limit=limit)
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(reason=reason)
        # Bound once: ``labels()`` costs a lock and a dict lookup on every connection.
        self.ring_hits = self.ring_reads.labels(outcome="hit")
        self.ring_misses = self.ring_reads.labels(outcome="miss")
        self.resumed = self.resumes.labels(outcome="resumed")
        self.resumed_with_reset = self.resumes.labels(outcome="reset")
        for reason in RESET_REASONS:
            self.resets.labels(reason=reason)
        self._partitions_exported = 0
        # Memory that an alert can watch beside RSS: a connection's objects must go with it.
        self.client_objects = Gauge(
            "crm_events_client_objects",
            "Stream client objects alive in this edge process, connected or ended but not yet "
            "released; staying above crm_events_sse_clients means they leak.",
            registry=registry,
        )
        # The scheduled full collections (shared/runtime.py: collect_periodically).
        self.gc_full_seconds = Histogram(
            "crm_events_gc_full_collection_seconds",
            "Duration of the edge's scheduled full garbage collections (the event loop "
            "waits for each).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.gc_unreachable = Counter(
            "crm_events_gc_unreachable_objects",
            "Objects in reference cycles that the scheduled full collections freed "
            "(closed connections' aiohttp cycles, mostly).",
            registry=registry,
        )
        # The byte-bounded caches (edge/context.py binds each child to its cache).
        self.cache_bytes = Gauge(
            "crm_events_cache_bytes",
            "Approximate bytes held by each of the edge's caches (history: history bodies, "
            "replay: joined replay pages), keys and per-entry bookkeeping included.",
            ["cache"],
            registry=registry,
        )
        self.cache_entries = Gauge(
            "crm_events_cache_entries",
            "Entries held by each of the edge's caches (history, replay).",
            ["cache"],
            registry=registry,
        )
        # Input from Redis that breaks the contract (shared/contract.py): skipped, never fatal.
        self.bad_messages = Counter(
            "crm_events_bad_messages",
            "Malformed input read from Redis and skipped, by reason: bad_live_line (a line on "
            "the live channel), bad_entry (a stream entry; counted once per entry).",
            ["reason"],
            registry=registry,
        )
        for reason in BAD_INPUT_REASONS:
            self.bad_messages.labels(reason=reason)

    def export_partitions(self, partitions: int) -> None:
        """Export every partition's reset counters at 0 once the partition is known: a series
        that first appears already at 1 hides its first increase from ``rate()`` and alerts."""
        for p in range(self._partitions_exported, partitions):
            for reason in RESET_REASONS:
                self.partition_resets.labels(partition=str(p), reason=reason)
        self._partitions_exported = max(self._partitions_exported, partitions)


JWKS_FETCH_RESULTS = ("ok", "error")
JWKS_FETCH_REASONS = ("start", "scheduled", "unknown_kid")


class JwksMetrics:
    """The identity provider's keys (edge/jwks.py). Registered only on an edge that fetches
    its keys (CRM_EVENTS_AUTH_JWKS_URL or CRM_EVENTS_AUTH_OIDC_ISSUER): a last-success time
    of 0 on every other edge would look like keys that are decades old."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fetches = Counter(
            "crm_events_jwks_fetches",
            "Fetches of the identity provider's keys (discovery document included), by result "
            "(ok, error) and reason: start (until the first success), scheduled (the periodic "
            "refresh), unknown_kid (a token named a key the edge did not hold).",
            ["result", "reason"],
            registry=registry,
        )
        for result in JWKS_FETCH_RESULTS:
            for reason in JWKS_FETCH_REASONS:
                self.fetches.labels(result=result, reason=reason)
        self.refetches_limited = Counter(
            "crm_events_jwks_refetches_limited",
            "Tokens with an unknown key id refused without a fetch, because the last fetch was "
            "less than CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S ago.",
            registry=registry,
        )
        self.keys = Gauge(
            "crm_events_jwks_keys",
            "Signing keys the edge holds: those of the provider's current document and those "
            "it stopped publishing less than CRM_EVENTS_AUTH_JWKS_GRACE_S ago.",
            registry=registry,
        )
        self.last_success = Gauge(
            "crm_events_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful fetch of the provider's keys (0: none yet).",
            registry=registry,
        )
