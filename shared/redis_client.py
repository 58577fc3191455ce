"""Building Redis clients from settings (one place for timeouts and retries)."""

from __future__ import annotations

from redis.asyncio import Redis

from .settings import RedisSettings


def make_redis(settings: RedisSettings, client_name: str, *, for_pubsub: bool = False) -> Redis:
    # Pub/sub waits indefinitely for messages, so its socket has no read timeout; the
    # edge's subscriber pings on its own schedule instead.
    return Redis.from_url(
        settings.url,
        socket_timeout=None if for_pubsub else settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
        socket_keepalive=True,
        decode_responses=False,
        # Named connections show up in CLIENT LIST, and can be killed one edge at a time.
        client_name=client_name,
    )
