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

from shared.contract import RedisKeys
from shared.ids import ZERO, StreamId, parse_id_bytes

from .bus import (
    SUBSCRIBED,
    BadInputs,
    BusDisconnected,
    BusUnavailable,
    Entry,
    StreamInfo,
    _Resync,
    _Subscribed,
    parse_live_payload,
    read_live_payload,
    read_stream_rows,
)

log = logging.getLogger(__name__)

__all__ = ["RedisBus", "parse_live_payload"]


class RedisBus:
    def __init__(
        self, redis: Redis, pubsub_redis: Redis, keys: RedisKeys, ping_interval_s: float
    ) -> None:
        self._redis = redis
        self._pubsub_redis = pubsub_redis
        self._keys = keys
        self._ping_interval_s = ping_interval_s
        self.bad_inputs = BadInputs()

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
        out: list[Entry] = []
        low = b"(" + after.encode()
        high = until.encode() if until is not None else b"+"
        while True:
            want = count - len(out)
            try:
                raw = await self._redis.xrange(self._keys.stream, min=low, max=high, count=want)
            except RedisError as exc:
                raise BusUnavailable(str(exc)) from exc
            rows = cast(list[tuple[bytes, dict[bytes, bytes]]], raw)
            out += read_stream_rows(rows, self._keys.stream, self.bad_inputs)
            # Fewer rows than asked: the end of the range. Otherwise a malformed entry was
            # skipped, and reading on keeps "fewer than count" meaning the end (callers
            # page on that).
            if len(rows) < want or len(out) >= count:
                return out
            low = b"(" + rows[-1][0]

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        out: list[Entry] = []
        high = b"(" + before.encode() if before is not None else b"+"
        while True:
            want = count - len(out)
            try:
                raw = await self._redis.xrevrange(self._keys.stream, max=high, min=b"-", count=want)
            except RedisError as exc:
                raise BusUnavailable(str(exc)) from exc
            rows = cast(list[tuple[bytes, dict[bytes, bytes]]], raw)
            out += read_stream_rows(rows, self._keys.stream, self.bad_inputs)
            if len(rows) < want or len(out) >= count:
                return out
            high = b"(" + rows[-1][0]

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), timeout=1.0))
        except (RedisError, OSError, TimeoutError):
            return False

    async def live(self) -> AsyncIterator[list[Entry] | _Subscribed | _Resync]:
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
                        for item in read_live_payload(
                            message["data"], self._keys.live, self.bad_inputs
                        ):
                            yield item
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
