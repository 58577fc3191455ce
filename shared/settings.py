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
from typing import Literal
from urllib.parse import unquote, urlsplit

from .errors import SettingsError
from .loop import EVENT_LOOPS
from .runtime import DEFAULT_GC_FULL_INTERVAL_S
from .security_settings import (
    AuthSettings,
    BreakerSettings,
    EdgeTls,
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
# The edge's in-memory replay ring, split evenly over the topic's partitions: about 14,000
# events of 1 KB (each held with its frame and ~400 bytes of bookkeeping).
DEFAULT_REPLAY_RING_BYTES = 32 * 1024 * 1024
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
DEFAULT_REDIS_WAIT_REPLICAS = 0
DEFAULT_REDIS_WAIT_TIMEOUT_MS = 200

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
_SERVICE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_PLAIN_HOST_RE = r"[A-Za-z0-9.-]+"
_IPV6_HOST_RE = r"[0-9A-Fa-f:.]+"
_SENTINEL_URL_FORM = "redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_CLUSTER_URL_FORM = "redis+cluster://[user:password@]host:port[,host:port...][/]"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """Where a ``redis+sentinel://`` URL points: the Sentinels to ask, the service (Sentinel's
    "master name") whose current primary the clients use, and how to log in to that primary."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Of the Redis primary and replicas (not of the Sentinels)."""
    tls: bool = False
    """``rediss+sentinel://``: TLS to the Sentinels and to the Redis servers alike."""


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """Where a ``redis+cluster://`` URL points: seed nodes of a Redis Cluster (any of its
    nodes; the rest are found from them) and how to log in to every node."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    """``rediss+cluster://``: TLS to every node."""


def _sentinel_address(
    item: str, what: str = "Sentinel", default_port: int | None = None
) -> tuple[str, int]:
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad {what} address (an unclosed IPv6 bracket)")
        port_text = rest[1:]
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep:
            host, port_text = item, ""
    if not re.fullmatch(_IPV6_HOST_RE if item.startswith("[") else _PLAIN_HOST_RE, host):
        raise ValueError(f"bad {what} host {_shown(host)}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"no port in the {what} address of host {_shown(host)}")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad {what} port for host {_shown(host)} (1-65535)")
    return host, int(port_text)


def _shown(host: str) -> str:
    """A host named in an error, unless it may hold a password (a URL whose ``user:password``
    lacks its ``@`` reads as ``host:port``)."""
    if re.fullmatch(_PLAIN_HOST_RE, host) or re.fullmatch(_IPV6_HOST_RE, host):
        return repr(host)
    return "(not shown)"


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    return username, password, hosts


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://`` / ``rediss+cluster://``. Raises ValueError with a message
    that never contains the URL's credentials."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"expected {_CLUSTER_URL_FORM}")
    parts = urlsplit("x://" + rest)
    if parts.query or parts.fragment:
        raise ValueError("query parameters and fragments are not supported in a Cluster URL")
    if parts.path not in ("", "/"):
        # A cluster has database 0 only.
        raise ValueError(f"a Cluster URL has no path or database; expected {_CLUSTER_URL_FORM}")
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise ValueError(f"no Cluster node addresses; expected {_CLUSTER_URL_FORM}")
    seeds = tuple(_sentinel_address(item.strip(), "Cluster node") for item in hosts.split(","))
    if len(set(seeds)) != len(seeds):
        raise ValueError("a Cluster node address is listed twice")
    return ClusterTarget(
        seeds=seeds, username=username, password=password, tls=scheme.lower() == "rediss+cluster"
    )


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://`` / ``rediss+sentinel://``. Raises ValueError with a message
    that never contains the URL's credentials."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"expected {_SENTINEL_URL_FORM}")
    # urlsplit would choke on the comma-separated host list; only its path/query split is used.
    parts = urlsplit("x://" + rest)
    if parts.query or parts.fragment:
        raise ValueError("query parameters and fragments are not supported in a Sentinel URL")
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise ValueError(f"no Sentinel addresses; expected {_SENTINEL_URL_FORM}")
    sentinels = tuple(
        _sentinel_address(item.strip(), default_port=DEFAULT_SENTINEL_PORT)
        for item in hosts.split(",")
    )
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("a Sentinel address is listed twice")
    segments = parts.path.split("/")[1:]
    if not 1 <= len(segments) <= 2 or not segments[0]:
        raise ValueError(f"no service name; expected {_SENTINEL_URL_FORM}")
    service = unquote(segments[0])
    if not _SERVICE_RE.fullmatch(service):
        raise ValueError(f"bad service name {service!r}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit() or int(segments[1]) > 1_000_000:
            raise ValueError(f"the database must be a number, got {segments[1]!r}")
        db = int(segments[1])
    return SentinelTarget(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        tls=scheme.lower() == "rediss+sentinel",
    )


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    """Redis connection URL (``redis://``, ``rediss://`` for TLS, ``unix://``,
    ``redis+sentinel://`` / ``rediss+sentinel://`` to follow Sentinel's primary, or
    ``redis+cluster://`` / ``rediss+cluster://`` for a Redis Cluster)."""
    prefix: str = DEFAULT_REDIS_PREFIX
    """Prefix of every key and channel this deployment uses."""
    timeout_s: float = DEFAULT_REDIS_TIMEOUT_S
    """Socket timeout of ordinary Redis commands, in seconds."""
    tls: RedisTls = field(default_factory=RedisTls)
    """CA and client certificate for ``rediss://``, and passwords read from files."""

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={mask_url(self.url)!r}, prefix={self.prefix!r}, "
            f"timeout_s={self.timeout_s})"
        )

    @property
    def sentinel(self) -> SentinelTarget | None:
        """The Sentinel target of a ``redis+sentinel://`` URL; None for a direct URL."""
        if self.url.partition("://")[0].lower() not in SENTINEL_SCHEMES:
            return None
        return parse_sentinel_url(self.url)

    @property
    def cluster(self) -> ClusterTarget | None:
        """The seeds of a ``redis+cluster://`` URL; None for any other URL."""
        if self.url.partition("://")[0].lower() not in CLUSTER_SCHEMES:
            return None
        return parse_cluster_url(self.url)

    @classmethod
    def from_env(cls, env: Env) -> RedisSettings:
        raw = env.raw("REDIS_URL")
        scheme = "" if raw is None else raw.partition("://")[0].lower()
        if raw is not None and scheme in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
            try:
                if scheme in SENTINEL_SCHEMES:
                    parse_sentinel_url(raw)
                else:
                    parse_cluster_url(raw)
            except ValueError as exc:
                raise SettingsError(ENV_PREFIX + "REDIS_URL", str(exc)) from None
            url = raw
        else:
            url = env.redis_url()
        tls = RedisTls.from_env(env)
        sentinel_auth = tls.sentinel_password is not None or tls.sentinel_username is not None
        if sentinel_auth and url.partition("://")[0].lower() not in SENTINEL_SCHEMES:
            raise SettingsError(
                ENV_PREFIX
                + (
                    "REDIS_SENTINEL_PASSWORD_FILE"
                    if tls.sentinel_password is not None
                    else "REDIS_SENTINEL_USERNAME"
                ),
                "set it only with a redis+sentinel:// or rediss+sentinel:// CRM_EVENTS_REDIS_URL",
            )
        return cls(
            url=url,
            prefix=env.string("REDIS_PREFIX", DEFAULT_REDIS_PREFIX, _PREFIX_RE),
            timeout_s=env.number("REDIS_TIMEOUT_S", DEFAULT_REDIS_TIMEOUT_S, 0.1, 300.0),
            tls=tls,
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
    redis_wait_replicas: int = DEFAULT_REDIS_WAIT_REPLICAS
    """Replicas that must acknowledge a batch (Redis ``WAIT``) before its Kafka offsets are
    committed; 0 = do not wait."""
    redis_wait_timeout_ms: int = DEFAULT_REDIS_WAIT_TIMEOUT_MS
    """Longest ``WAIT`` per batch; fewer acknowledgements hold the batch's commit until a
    later ``WAIT`` succeeds."""

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
            redis_wait_replicas=env.integer(
                "REDIS_WAIT_REPLICAS", DEFAULT_REDIS_WAIT_REPLICAS, 0, 100
            ),
            redis_wait_timeout_ms=env.integer(
                "REDIS_WAIT_TIMEOUT_MS", DEFAULT_REDIS_WAIT_TIMEOUT_MS, 1, 60_000
            ),
        )


MemoryDiagnosticsMode = Literal["off", "gc", "tracemalloc"]
MEMORY_DIAGNOSTICS_MODES: tuple[MemoryDiagnosticsMode, ...] = ("off", "gc", "tracemalloc")


def _gc_full_interval(env: Env) -> float:
    value = env.number("GC_FULL_INTERVAL_S", DEFAULT_GC_FULL_INTERVAL_S, 0.0, 3600.0)
    if 0 < value < 1:
        # Shorter would spend a real share of the CPU traversing the same long-lived objects.
        raise SettingsError(ENV_PREFIX + "GC_FULL_INTERVAL_S", f"0 (off) or 1..3600, got {value}")
    return value


def _memory_diagnostics(env: Env) -> MemoryDiagnosticsMode:
    upper = tuple(mode.upper() for mode in MEMORY_DIAGNOSTICS_MODES)
    value = env.choice("MEMORY_DIAGNOSTICS", "OFF", upper)
    return MEMORY_DIAGNOSTICS_MODES[upper.index(value)]


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
    replay_ring_bytes: int = DEFAULT_REPLAY_RING_BYTES
    """Most bytes of the newest events kept in memory for resumes and history, split over
    the partitions (0: always read Redis)."""
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
    tls: EdgeTls = field(default_factory=EdgeTls)
    """HTTPS (and mutual TLS) on the edge's port; off by default."""
    gc_full_interval_s: float = DEFAULT_GC_FULL_INTERVAL_S
    """Seconds between scheduled full garbage collections (0: CPython's thresholds alone)."""
    memory_diagnostics: MemoryDiagnosticsMode = "off"
    """``off``, ``gc`` or ``tracemalloc``: ``GET /debug/memory`` for soaks (edge/memory.py)."""

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
            replay_ring_bytes=env.integer(
                "REPLAY_RING_BYTES", DEFAULT_REPLAY_RING_BYTES, 0, MAX_CACHE_BYTES
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
            tls=EdgeTls.from_env(env),
            gc_full_interval_s=_gc_full_interval(env),
            memory_diagnostics=_memory_diagnostics(env),
        )
