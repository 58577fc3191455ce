"""The Redis implementation of the edge's bus: XRANGE/XREVRANGE for history and one
pub/sub subscription for the live path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.events import NO_MATCH
from shared.ids import ZERO, StreamId, parse_id_bytes
from shared.keys import RedisKeys

from .bus import SUBSCRIBED, BusDisconnected, BusUnavailable, Entry, StreamInfo, _Subscribed

log = logging.getLogger(__name__)


def parse_live_payload(payload: bytes) -> list[Entry]:
    """Decode one published batch: lines of ``<id> <type> <ts> <match> <envelope>``."""
    entries = []
    for line in payload.split(b"\n"):
        id_b, type_b, ts_b, match, data = line.split(b" ", 4)
        entries.append(Entry.build(id_b, type_b, int(ts_b), data, parse_id_bytes(id_b), match))
    return entries


def _entry(id_b: bytes, fields: dict[bytes, bytes]) -> Entry:
    return Entry.build(
        id_b,
        fields[b"t"],
        int(fields[b"ts"]),
        fields[b"d"],
        parse_id_bytes(id_b),
        fields.get(b"m", NO_MATCH),
    )


class RedisBus:
    def __init__(
        self, redis: Redis, pubsub_redis: Redis, keys: RedisKeys, ping_interval_s: float
    ) -> None:
        self._redis = redis
        self._pubsub_redis = pubsub_redis
        self._keys = keys
        self._ping_interval_s = ping_interval_s

    async def info(self) -> StreamInfo:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("XINFO", "STREAM", self._keys.stream)
                pipe.get(self._keys.genesis)
                raw_info, genesis = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise BusUnavailable(str(exc)) from exc
        genesis_id = parse_id_bytes(genesis) if genesis else None
        if isinstance(raw_info, ResponseError):
            if "no such key" in str(raw_info).lower():
                return StreamInfo(False, 0, None, ZERO, ZERO, 0, genesis_id)
            raise BusUnavailable(str(raw_info))
        if isinstance(raw_info, Exception):
            raise BusUnavailable(str(raw_info))
        fields = _pairs(raw_info)
        first = fields.get(b"first-entry")
        first_id = parse_id_bytes(first[0]) if first else None
        length = int(fields[b"length"])
        return StreamInfo(
            exists=True,
            length=length,
            first_id=first_id,
            last_id=parse_id_bytes(fields[b"last-generated-id"]),
            max_deleted_id=parse_id_bytes(fields.get(b"max-deleted-entry-id", b"0-0")),
            # Before Redis 7.0 there is no count of added entries: assume trimming happened.
            entries_added=int(fields.get(b"entries-added", length + 1)),
            genesis=genesis_id,
        )

    async def read_after(
        self, after: StreamId, count: int, until: StreamId | None = None
    ) -> list[Entry]:
        try:
            rows = await self._redis.xrange(
                self._keys.stream,
                min=b"(" + after.encode(),
                max=until.encode() if until is not None else b"+",
                count=count,
            )
        except RedisError as exc:
            raise BusUnavailable(str(exc)) from exc
        return [_entry(id_b, fields) for id_b, fields in cast(list[Any], rows)]

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        try:
            rows = await self._redis.xrevrange(
                self._keys.stream,
                max=b"(" + before.encode() if before is not None else b"+",
                min=b"-",
                count=count,
            )
        except RedisError as exc:
            raise BusUnavailable(str(exc)) from exc
        return [_entry(id_b, fields) for id_b, fields in cast(list[Any], rows)]

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), timeout=1.0))
        except (RedisError, OSError, TimeoutError):
            return False

    async def live(self) -> AsyncIterator[list[Entry] | _Subscribed]:
        pubsub = self._pubsub_redis.pubsub()
        interval = self._ping_interval_s
        try:
            try:
                await asyncio.wait_for(pubsub.subscribe(self._keys.live), timeout=5.0)
                idle = 0.0
                while True:
                    message = await pubsub.get_message(timeout=interval)
                    if message is None:
                        idle += interval
                        # A paused or half-open Redis sends nothing; our own pings must
                        # come back, or the subscription is declared lost.
                        if idle > 3 * interval:
                            raise BusDisconnected("no answer to pings on the subscription")
                        await pubsub.ping()
                        continue
                    idle = 0.0
                    kind = message["type"]
                    if kind == "message":
                        yield parse_live_payload(message["data"])
                    elif kind == "subscribe":
                        # Also seen after redis-py reconnects by itself: anything published
                        # in between was missed, so the caller must repair.
                        yield SUBSCRIBED
            except (RedisError, OSError, TimeoutError) as exc:
                raise BusDisconnected(repr(exc)) from exc
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(pubsub.aclose(), timeout=1.0)  # type: ignore[no-untyped-call]


def _pairs(raw: Any) -> dict[bytes, Any]:
    """XINFO STREAM's flat reply ``[name, value, ...]`` as a dict."""
    if isinstance(raw, dict):
        return cast(dict[bytes, Any], raw)
    it = iter(raw)
    return dict(zip(it, it, strict=True))
