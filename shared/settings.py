"""Typed settings, read once from an injected mapping (normally ``os.environ``) in ``main()``.

Every variable is prefixed ``CRM_EVENTS_``. A wrong value raises ``SettingsError`` whose
message starts with the variable's name. Defaults are named constants with units in
their names. The README's configuration table lists the same variables.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import SettingsError
from .loop import EVENT_LOOPS
from .security_settings import (
    AuthSettings,
    BreakerSettings,
    KafkaSecurity,
    LimitSettings,
    RedisTls,
)
from .settings_env import DEFAULT_REDIS_URL, ENV_PREFIX, Env, mask_url

DEFAULT_REDIS_PREFIX = "crm-events"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_KAFKA_TOPIC = "aetherlink.events"
DEFAULT_KAFKA_GROUP = "crm-events-ingest"
DEFAULT_KAFKA_PARTITIONS = 3
DEFAULT_KAFKA_REPLICATION_FACTOR = 1
DEFAULT_INGEST_PORT = 9020
DEFAULT_EDGE_PORT = 9011
DEFAULT_BIND_HOST = "127.0.0.1"
DEFAULT_BATCH_MAX_RECORDS = 1000
DEFAULT_POLL_TIMEOUT_MS = 200
DEFAULT_STREAM_MAXLEN = 100_000
DEFAULT_DEAD_MAXLEN = 10_000
DEFAULT_EVENT_MAX_BYTES = 64 * 1024
DEFAULT_TYPE_FIELDS = ("Type", "type", "eventType")
DEFAULT_MATCH_FIELDS = ("TenantId",)
DEFAULT_PING_INTERVAL_S = 15.0
DEFAULT_RETRY_MS = 2000
DEFAULT_CLIENT_BUFFER_BYTES = 1024 * 1024
DEFAULT_HISTORY_N = 100
DEFAULT_HISTORY_MAX_N = 1000
DEFAULT_RESUME_PAGE = 1000
DEFAULT_REPLAY_RING_EVENTS = 10_000
# The two caches of joined bytes on an edge, sized together under 64 MiB (the rest of that
# is headroom for the entry-size approximation). History bodies get the larger share: their
# keys (n, after, types, match claim) are the most varied, so they need the most room to
# keep a useful hit rate; a replay page only needs to live through a reconnect storm.
DEFAULT_HISTORY_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_REPLAY_CACHE_BYTES = 24 * 1024 * 1024
MAX_CACHE_BYTES = 16 * 1024 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE_S = 3.0
DEFAULT_REDIS_TIMEOUT_S = 5.0
DEFAULT_BACKOFF_MAX_S = 10.0

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    """Redis connection URL (``redis://``, ``rediss://`` for TLS, ``unix://``)."""
    prefix: str = DEFAULT_REDIS_PREFIX
    """Prefix of every key and channel this deployment uses."""
    timeout_s: float = DEFAULT_REDIS_TIMEOUT_S
    """Socket timeout of ordinary Redis commands, in seconds."""
    tls: RedisTls = field(default_factory=RedisTls)
    """CA and client certificate for ``rediss://``, and a password read from a file."""

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={mask_url(self.url)!r}, prefix={self.prefix!r}, "
            f"timeout_s={self.timeout_s})"
        )

    @classmethod
    def from_env(cls, env: Env) -> RedisSettings:
        return cls(
            url=env.redis_url(),
            prefix=env.string("REDIS_PREFIX", DEFAULT_REDIS_PREFIX, _PREFIX_RE),
            timeout_s=env.number("REDIS_TIMEOUT_S", DEFAULT_REDIS_TIMEOUT_S, 0.1, 300.0),
            tls=RedisTls.from_env(env),
        )


def _default_node_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def _event_loop(env: Env) -> str:
    return env.choice("EVENT_LOOP", "UVLOOP", tuple(x.upper() for x in EVENT_LOOPS)).lower()


@dataclass(frozen=True, slots=True)
class IngestSettings:
    redis: RedisSettings
    node_id: str
    log_level: str = "INFO"
    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    """Comma-separated ``host:port`` list of Kafka brokers."""
    kafka_topic: str = DEFAULT_KAFKA_TOPIC
    kafka_group: str = DEFAULT_KAFKA_GROUP
    kafka_partitions: int = DEFAULT_KAFKA_PARTITIONS
    """Partitions of the topic when ingest has to create it."""
    kafka_replication_factor: int = DEFAULT_KAFKA_REPLICATION_FACTOR
    host: str = DEFAULT_BIND_HOST
    port: int = DEFAULT_INGEST_PORT
    """Port of the ingest's own /healthz, /readyz and /metrics."""
    batch_max_records: int = DEFAULT_BATCH_MAX_RECORDS
    """Most records taken from Kafka per batch (one Redis round trip per batch)."""
    poll_timeout_ms: int = DEFAULT_POLL_TIMEOUT_MS
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN
    """Approximate cap of the replay stream, in entries."""
    dead_maxlen: int = DEFAULT_DEAD_MAXLEN
    event_max_bytes: int = DEFAULT_EVENT_MAX_BYTES
    """Records whose value is larger are dead letters (reason ``too_large``)."""
    type_fields: tuple[str, ...] = DEFAULT_TYPE_FIELDS
    """Fields of the event object tried in order for its type."""
    match_fields: tuple[str, ...] = DEFAULT_MATCH_FIELDS
    """Top-level event fields copied beside each event so that edges can enforce a token's
    field-equality claims (e.g. a tenant) without parsing events per client."""
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    event_loop: str = "uvloop"
    """``uvloop`` or ``asyncio``."""
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)

    @classmethod
    def from_env(cls, source: Mapping[str, str]) -> IngestSettings:
        env = Env(source)
        bootstrap = env.string("KAFKA_BOOTSTRAP", DEFAULT_KAFKA_BOOTSTRAP)
        if not all(_HOSTPORT_RE.fullmatch(part.strip()) for part in bootstrap.split(",")):
            raise SettingsError(
                ENV_PREFIX + "KAFKA_BOOTSTRAP", f"expected host:port[,host:port], got {bootstrap!r}"
            )
        return cls(
            redis=RedisSettings.from_env(env),
            node_id=env.string("NODE_ID", _default_node_id("ingest"), _PREFIX_RE),
            log_level=env.choice("LOG_LEVEL", "INFO", _LOG_LEVELS),
            kafka_bootstrap=bootstrap,
            kafka_topic=env.string("KAFKA_TOPIC", DEFAULT_KAFKA_TOPIC, _TOPIC_RE),
            kafka_group=env.string("KAFKA_GROUP", DEFAULT_KAFKA_GROUP, _TOPIC_RE),
            kafka_partitions=env.integer("KAFKA_PARTITIONS", DEFAULT_KAFKA_PARTITIONS, 1, 10_000),
            kafka_replication_factor=env.integer(
                "KAFKA_REPLICATION_FACTOR", DEFAULT_KAFKA_REPLICATION_FACTOR, 1, 100
            ),
            host=env.string("INGEST_HOST", DEFAULT_BIND_HOST),
            port=env.integer("INGEST_PORT", DEFAULT_INGEST_PORT, 0, 65535),
            batch_max_records=env.integer(
                "INGEST_BATCH_MAX_RECORDS", DEFAULT_BATCH_MAX_RECORDS, 1, 100_000
            ),
            poll_timeout_ms=env.integer(
                "INGEST_POLL_TIMEOUT_MS", DEFAULT_POLL_TIMEOUT_MS, 1, 60_000
            ),
            stream_maxlen=env.integer("STREAM_MAXLEN", DEFAULT_STREAM_MAXLEN, 10, 100_000_000),
            dead_maxlen=env.integer("DEAD_MAXLEN", DEFAULT_DEAD_MAXLEN, 10, 100_000_000),
            event_max_bytes=env.integer("EVENT_MAX_BYTES", DEFAULT_EVENT_MAX_BYTES, 64, 16 << 20),
            type_fields=env.names("EVENT_TYPE_FIELDS", DEFAULT_TYPE_FIELDS, _FIELD_RE),
            match_fields=env.names("EVENT_MATCH_FIELDS", DEFAULT_MATCH_FIELDS, _FIELD_RE),
            backoff_max_s=env.number("BACKOFF_MAX_S", DEFAULT_BACKOFF_MAX_S, 0.1, 600.0),
            event_loop=_event_loop(env),
            kafka_security=KafkaSecurity.from_env(env),
            breaker=BreakerSettings.from_env(env),
        )


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    redis: RedisSettings
    node_id: str
    log_level: str = "INFO"
    host: str = DEFAULT_BIND_HOST
    port: int = DEFAULT_EDGE_PORT
    ping_interval_s: float = DEFAULT_PING_INTERVAL_S
    """Seconds between SSE keepalive comments; keep below every proxy's idle timeout."""
    retry_ms: int = DEFAULT_RETRY_MS
    """Reconnect delay hinted to EventSource clients (``retry:``), in milliseconds."""
    client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER_BYTES
    """Most bytes queued for one client; past it the client is disconnected as slow."""
    history_default_n: int = DEFAULT_HISTORY_N
    history_max_n: int = DEFAULT_HISTORY_MAX_N
    resume_page: int = DEFAULT_RESUME_PAGE
    """Entries read from the stream per round trip while a client catches up."""
    event_loop: str = "uvloop"
    """``uvloop`` or ``asyncio``."""
    replay_ring_events: int = DEFAULT_REPLAY_RING_EVENTS
    """Newest events kept in memory for resumes and history (0: always read Redis)."""
    history_cache_bytes: int = DEFAULT_HISTORY_CACHE_BYTES
    """Most bytes of history bodies (served from the ring) kept for repeated queries,
    keys included (0: no cache)."""
    replay_cache_bytes: int = DEFAULT_REPLAY_CACHE_BYTES
    """Most bytes of joined replay pages kept for clients resuming from the same place,
    keys included (0: no cache)."""
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    """Seconds to let streams close on SIGTERM before the process exits."""
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    auth: AuthSettings = field(default_factory=AuthSettings)
    """Built directly (tests), auth is off; from the environment it defaults to jwt."""
    limits: LimitSettings = field(default_factory=LimitSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)

    @classmethod
    def from_env(cls, source: Mapping[str, str]) -> EdgeSettings:
        env = Env(source)
        max_n = env.integer("HISTORY_MAX_N", DEFAULT_HISTORY_MAX_N, 1, 100_000)
        default_n = env.integer("HISTORY_DEFAULT_N", min(DEFAULT_HISTORY_N, max_n), 1, 100_000)
        if default_n > max_n:
            raise SettingsError(
                ENV_PREFIX + "HISTORY_DEFAULT_N",
                f"{default_n} is larger than CRM_EVENTS_HISTORY_MAX_N ({max_n})",
            )
        return cls(
            redis=RedisSettings.from_env(env),
            node_id=env.string("NODE_ID", _default_node_id("edge"), _PREFIX_RE),
            log_level=env.choice("LOG_LEVEL", "INFO", _LOG_LEVELS),
            host=env.string("EDGE_HOST", DEFAULT_BIND_HOST),
            port=env.integer("EDGE_PORT", DEFAULT_EDGE_PORT, 0, 65535),
            ping_interval_s=env.number("SSE_PING_INTERVAL_S", DEFAULT_PING_INTERVAL_S, 0.05, 300.0),
            retry_ms=env.integer("SSE_RETRY_MS", DEFAULT_RETRY_MS, 0, 600_000),
            client_buffer_bytes=env.integer(
                "CLIENT_BUFFER_BYTES", DEFAULT_CLIENT_BUFFER_BYTES, 1024, 1 << 30
            ),
            history_default_n=default_n,
            history_max_n=max_n,
            resume_page=env.integer("RESUME_PAGE", DEFAULT_RESUME_PAGE, 1, 100_000),
            event_loop=_event_loop(env),
            replay_ring_events=env.integer(
                "REPLAY_RING_EVENTS", DEFAULT_REPLAY_RING_EVENTS, 0, 1_000_000
            ),
            history_cache_bytes=env.integer(
                "HISTORY_CACHE_BYTES", DEFAULT_HISTORY_CACHE_BYTES, 0, MAX_CACHE_BYTES
            ),
            replay_cache_bytes=env.integer(
                "REPLAY_CACHE_BYTES", DEFAULT_REPLAY_CACHE_BYTES, 0, MAX_CACHE_BYTES
            ),
            shutdown_grace_s=env.number("SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S, 0.0, 600.0),
            backoff_max_s=env.number("BACKOFF_MAX_S", DEFAULT_BACKOFF_MAX_S, 0.1, 600.0),
            auth=AuthSettings.from_env(env),
            limits=LimitSettings.from_env(env),
            breaker=BreakerSettings.from_env(env),
        )
