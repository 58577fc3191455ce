"""Building Redis clients from settings (one place for timeouts, retries, TLS and Sentinel)."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

from .settings import ClusterTarget, RedisSettings, SentinelTarget

# What redis-py gives a client built from a URL (10 retries, 10 ms doubling to 1 s, with
# jitter); a Sentinel pool gets no retry unless given one, so it is spelled out to keep both
# modes alike. During a failover these retries also re-ask the Sentinels for the primary.
_RETRY_COUNT = 10
_RETRY_BASE_S = 0.01
_RETRY_CAP_S = 1.0


class SentinelRedis(Redis):
    """A client of the service's current primary that also owns the Sentinel clients it asks
    (redis-py leaves those open when the client closes)."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.owned_sentinel is not None:
                await self.owned_sentinel.aclose()

    def __repr__(self) -> str:
        pool = self.connection_pool
        where = getattr(pool, "service_name", "?")
        return f"<SentinelRedis service={where} primary={getattr(pool, 'master_address', None)}>"


def client_options(settings: RedisSettings, client_name: str, for_pubsub: bool) -> dict[str, Any]:
    """Options every client of ours gets, whatever the mode."""
    # Pub/sub waits indefinitely for messages, so its socket has no read timeout; the
    # edge's subscriber pings on its own schedule instead.
    return {
        "socket_timeout": None if for_pubsub else settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
        "socket_keepalive": True,
        "decode_responses": False,
        # Named connections show up in CLIENT LIST, and can be killed one edge at a time.
        "client_name": client_name,
    }


def make_redis(settings: RedisSettings, client_name: str, *, for_pubsub: bool = False) -> Redis:
    """A client for ``settings``; with a ``redis+sentinel://`` URL it is bound to the service's
    current primary and follows a failover (each new connection asks the Sentinels). A
    ``redis+cluster://`` URL has no one client: see ``shared.redis_nodes.make_nodes``."""
    if settings.cluster is not None:
        raise ValueError("a redis+cluster:// URL needs shared.redis_nodes.make_nodes")
    options = client_options(settings, client_name, for_pubsub)
    target = settings.sentinel
    if target is not None:
        return _sentinel_client(settings, target, options)
    tls: dict[str, Any] = {}
    if settings.url.startswith("rediss://"):
        tls = _tls_options(settings)
    if settings.tls.password is not None:
        tls["password"] = settings.tls.password
    return Redis.from_url(settings.url, **tls, **options)


def node_tls_options(settings: RedisSettings, target: ClusterTarget) -> dict[str, Any]:
    """Login and TLS options of a client of one Redis Cluster node."""
    options: dict[str, Any] = {
        "username": target.username,
        # As with a direct URL, the password file wins over a password in the URL.
        "password": settings.tls.password or target.password,
    }
    if target.tls:
        options.update(ssl=True, **_tls_options(settings))
    return options


def _tls_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "ssl_ca_certs": settings.tls.ca_file,
        "ssl_certfile": settings.tls.cert_file,
        "ssl_keyfile": settings.tls.key_file,
    }


def sentinel_options(settings: RedisSettings, target: SentinelTarget) -> dict[str, Any]:
    """Connection options of the Sentinel clients themselves (never the pub/sub variant:
    a Sentinel query is always short, so it always has a read timeout)."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
        "socket_keepalive": True,
        "username": settings.tls.sentinel_username,
        "password": settings.tls.sentinel_password,
    }
    if target.tls:
        options.update(ssl=True, **_tls_options(settings))
    return options


def primary_options(
    settings: RedisSettings, target: SentinelTarget, options: dict[str, Any]
) -> dict[str, Any]:
    """Connection options of the clients of the primary found through the Sentinels."""
    merged: dict[str, Any] = {
        **options,
        "db": target.db,
        "username": target.username,
        # As with a direct URL, the password file wins over a password in the URL.
        "password": settings.tls.password or target.password,
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S), _RETRY_COUNT
        ),
    }
    if target.tls:
        merged.update(ssl=True, **_tls_options(settings))
    return merged


def _sentinel_client(
    settings: RedisSettings, target: SentinelTarget, options: dict[str, Any]
) -> Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_options(settings, target)
    )
    client = cast(
        SentinelRedis,
        sentinel.master_for(
            target.service,
            redis_class=SentinelRedis,
            **primary_options(settings, target, options),
        ),
    )
    client.owned_sentinel = sentinel
    return client
