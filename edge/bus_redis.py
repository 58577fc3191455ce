"""The Redis implementation of the edge's bus: XRANGE/XREVRANGE per partition stream, and
one pub/sub connection subscribed to every partition's live channel (invariant 7)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import cast

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from shared.contract import (
    ContractError,
    Meta,
    PartitionState,
    RedisKeys,
    parse_meta,
    parse_state,
    partition_slot,
)
from shared.redis_nodes import Nodes, SingleNode

from .bus import (
    TICK,
    BadInputs,
    BusDisconnected,
    BusUnavailable,
    Entry,
    LiveItem,
    Subscribed,
    read_live_payload,
    read_stream_rows,
)

log = logging.getLogger(__name__)

__all__ = ["RedisBus"]

SUBSCRIBE_TIMEOUT_S = 5.0

Rows = list[tuple[bytes, dict[bytes, bytes]]]


class RedisBus:
    def __init__(
        self,
        redis: Nodes | Redis,
        pubsub_redis: Redis | None,
        keys: RedisKeys,
        ping_interval_s: float,
    ) -> None:
        # A bare client (tests, tools) is one server holding every slot.
        self._nodes: Nodes = SingleNode(redis) if isinstance(redis, Redis) else redis
        self._pubsub_redis = pubsub_redis
        self._keys = keys
        self._meta_slot = key_slot(keys.meta.encode())
        self._ping_interval_s = ping_interval_s
        self.bad_inputs = BadInputs()

    async def meta(self) -> Meta | None:
        try:
            raw = await self._nodes.call(
                self._meta_slot,
                lambda r: r.hgetall(self._keys.meta),
            )
        except RedisError as exc:
            raise BusUnavailable(str(exc)) from exc
        try:
            return parse_meta(cast(dict[bytes, bytes], raw))
        except ContractError as exc:
            # Written by ingest alone; a broken one is treated as absent (no change).
            log.warning("unreadable meta hash", extra={"detail": exc.detail})
            return None

    async def state(self, partition: int) -> PartitionState | None:
        try:
            key = self._keys.state(partition)
            raw = await self._nodes.call(
                partition_slot(partition),
                lambda r: r.hgetall(key),
            )
        except RedisError as exc:
            raise BusUnavailable(str(exc)) from exc
        try:
            return parse_state(cast(dict[bytes, bytes], raw))
        except ContractError as exc:
            log.warning(
                "unreadable partition state", extra={"partition": partition, "detail": exc.detail}
            )
            return None

    async def read_after(
        self, partition: int, position: int, count: int, until: int | None = None
    ) -> list[Entry]:
        key = self._keys.stream(partition)
        slot = partition_slot(partition)
        out: list[Entry] = []
        low = b"(%d-0" % position
        high = b"%d-0" % until if until is not None else b"+"
        while True:
            want = count - len(out)
            try:
                raw = await self._range(slot, key, low, high, want, reverse=False)
            except RedisError as exc:
                raise BusUnavailable(str(exc)) from exc
            rows = cast(Rows, raw)
            out += read_stream_rows(rows, partition, key, self.bad_inputs)
            # Fewer rows than asked: the end of the range. Otherwise a malformed entry was
            # skipped, and reading on keeps "fewer than count" meaning the end (callers
            # page on that).
            if len(rows) < want or len(out) >= count:
                return out
            low = b"(" + rows[-1][0]

    async def read_before(self, partition: int, before: int | None, count: int) -> list[Entry]:
        key = self._keys.stream(partition)
        slot = partition_slot(partition)
        out: list[Entry] = []
        high = b"(%d-0" % before if before is not None else b"+"
        while True:
            want = count - len(out)
            try:
                raw = await self._range(slot, key, b"-", high, want, reverse=True)
            except RedisError as exc:
                raise BusUnavailable(str(exc)) from exc
            rows = cast(Rows, raw)
            out += read_stream_rows(rows, partition, key, self.bad_inputs)
            if len(rows) < want or len(out) >= count:
                return out
            high = b"(" + rows[-1][0]

    async def _range(
        self, slot: int, key: str, low: bytes, high: bytes, count: int, *, reverse: bool
    ) -> object:
        if reverse:
            return await self._nodes.call(
                slot, lambda r: r.xrevrange(key, max=high, min=low, count=count)
            )
        return await self._nodes.call(slot, lambda r: r.xrange(key, min=low, max=high, count=count))

    async def ping(self) -> bool:
        return await self._nodes.ping(timeout_s=1.0)

    async def live(self, partitions: int) -> AsyncGenerator[LiveItem, None]:
        if self._pubsub_redis is None:
            raise TypeError("a RedisBus without a pub/sub client cannot subscribe")
        pubsub = self._pubsub_redis.pubsub()
        interval = self._ping_interval_s
        keys = self._keys
        channels = [keys.live(p) for p in range(partitions)]
        by_channel = {name.encode(): p for p, name in enumerate(channels)}
        try:
            try:
                if channels:
                    await asyncio.wait_for(pubsub.subscribe(*channels), timeout=SUBSCRIBE_TIMEOUT_S)
                else:
                    # No partition known yet (ingest never ran): keep a connection to ping, so
                    # that a dead Redis still shows, and tick until the caller learns more.
                    await asyncio.wait_for(pubsub.ping(), timeout=SUBSCRIBE_TIMEOUT_S)
                idle = 0.0
                while True:
                    if not channels:
                        await asyncio.sleep(interval)
                        yield TICK
                        continue
                    message = await pubsub.get_message(timeout=interval)
                    if message is None:
                        idle += interval
                        # A paused or half-open Redis sends nothing; our own pings must
                        # come back, or the subscription is declared lost.
                        if idle > 3 * interval:
                            raise BusDisconnected("no answer to pings on the subscription")
                        await pubsub.ping()
                        yield TICK
                        continue
                    idle = 0.0
                    kind = message["type"]
                    channel = message.get("channel")
                    partition = by_channel.get(channel) if isinstance(channel, bytes) else None
                    if partition is None:
                        continue  # a pong, or a channel we did not ask for
                    if kind == "message":
                        for item in read_live_payload(
                            message["data"], partition, channels[partition], self.bad_inputs
                        ):
                            yield item
                    elif kind == "subscribe":
                        # Also seen after redis-py reconnects by itself: anything published
                        # in between was missed, so the caller repairs that partition.
                        yield Subscribed(partition)
            except (RedisError, OSError, TimeoutError) as exc:
                raise BusDisconnected(repr(exc)) from exc
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(pubsub.aclose(), timeout=1.0)  # type: ignore[no-untyped-call]
