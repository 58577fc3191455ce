"""Building Redis clients from settings (one place for timeouts and retries)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from .settings import RedisSettings


def make_redis(settings: RedisSettings, client_name: str, *, for_pubsub: bool = False) -> Redis:
    # Pub/sub waits indefinitely for messages, so its socket has no read timeout; the
    # edge's subscriber pings on its own schedule instead.
    tls: dict[str, Any] = {}
    if settings.url.startswith("rediss://"):
        tls = {
            "ssl_ca_certs": settings.tls.ca_file,
            "ssl_certfile": settings.tls.cert_file,
            "ssl_keyfile": settings.tls.key_file,
        }
    if settings.tls.password is not None:
        tls["password"] = settings.tls.password
    return Redis.from_url(
        settings.url,
        **tls,
        socket_timeout=None if for_pubsub else settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
        socket_keepalive=True,
        decode_responses=False,
        # Named connections show up in CLIENT LIST, and can be killed one edge at a time.
        client_name=client_name,
    )
