"""The edge's bus on a Redis Cluster: reads routed by slot (as ``RedisBus``), and sharded
pub/sub with one connection per master, never one per partition.

Each master's connection ``SSUBSCRIBE``s the live channels of the partitions whose slots it
owns (one command per channel: a batch across slots is refused with ``CROSSSLOT``), and is
read as soon as a message arrives. While it is idle it is probed with ``PING``: a connection
that stops answering is declared lost, so an edge never sits silently on a dead or paused
node with a green health check (centrifugo#1189). The subscription starts over on a fresh
slot map, which also repairs every partition from its stream (``Subscribed``), when:

- a node's connection fails or stops answering its probes (``BusDisconnected``);
- the server drops a channel by itself (``sunsubscribe``: its slot moved) or refuses one
  (``MOVED``), or the slot map read every ``TOPOLOGY_CHECK_S`` puts one of the partitions on
  another master (``BusMoved``: no failure, the edge stays ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Final

from redis.asyncio.client import PubSub
from redis.exceptions import MovedError, RedisError

from shared.contract import RedisKeys, partition_slot
from shared.redis_nodes import Address, ClusterNodes

from .bus import TICK, BusDisconnected, BusMoved, LiveItem, Subscribed, read_live_payload
from .bus_redis import SUBSCRIBE_TIMEOUT_S, RedisBus

log = logging.getLogger(__name__)

__all__ = ["TOPOLOGY_CHECK_S", "ClusterBus"]

FEED_ITEMS: Final = 10_000
"""Live items (a message's entries of one partition, or a marker) waiting for the hub. A node
connection whose items do not fit ends the subscription (the edge resubscribes and repairs
from the streams), as Redis's ``client-output-buffer-limit pubsub`` ends a slow subscriber
in single mode; the feed never grows with the rate times a stall."""
STOP_WAIT_S: Final = 1.0
"""How long a (re)subscription waits for the old one's node feeds to end."""
TOPOLOGY_CHECK_S: Final = 5.0
"""How often the slot map is read while subscribed, to notice a failover or migration that
no connection reported."""

_Feed = asyncio.Queue[LiveItem | BaseException]


class ClusterBus(RedisBus):
    def __init__(
        self,
        nodes: ClusterNodes,
        keys: RedisKeys,
        ping_interval_s: float,
        client_name: str,
        topology_check_s: float = TOPOLOGY_CHECK_S,
    ) -> None:
        super().__init__(nodes, None, keys, ping_interval_s)
        self._cluster = nodes
        self._client_name = client_name
        self._topology_check_s = topology_check_s

    def _owners(self, partitions: int) -> dict[int, Address]:
        owners = {}
        for p in range(partitions):
            address = self._cluster.address_for(partition_slot(p))
            if address is None:
                raise BusDisconnected(f"no master serves partition {p}'s slot")
            owners[p] = address
        return owners

    async def live(self, partitions: int) -> AsyncGenerator[LiveItem, None]:
        interval = self._ping_interval_s
        try:
            await self._cluster.refresh()
        except (RedisError, OSError) as exc:
            raise BusDisconnected(f"reading the slot map failed: {exc}") from exc
        owners = self._owners(partitions)
        by_node: dict[Address, list[int]] = {}
        for p, address in owners.items():
            by_node.setdefault(address, []).append(p)
        log.info(
            "subscribing on the masters",
            extra={"masters": {f"{h}:{p}": parts for (h, p), parts in sorted(by_node.items())}},
        )
        feed: _Feed = asyncio.Queue(maxsize=FEED_ITEMS)
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(self._node(address, parts, feed, stop), name=f"live {address}")
            for address, parts in sorted(by_node.items())
        ]
        next_check = time.monotonic() + self._topology_check_s
        try:
            while True:
                if not tasks:
                    # No partition known yet (ingest never ran): tick until the caller
                    # learns more, and still notice a cluster that went away.
                    await asyncio.sleep(interval)
                    if not await self._cluster.ping(timeout_s=1.0):
                        raise BusDisconnected("no Redis Cluster master answers")
                    yield TICK
                    continue
                try:
                    item = await asyncio.wait_for(feed.get(), timeout=interval)
                except TimeoutError:
                    item = TICK
                if isinstance(item, BaseException):
                    raise item
                yield item
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self._topology_check_s
                    await self._check_topology(owners)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            # Not awaited without a bound: on Python 3.11 a cancel that lands while redis-py
            # reads under ``asyncio.timeout`` can be taken for that timeout and swallowed, and
            # the task reads on. ``stop`` ends it at its next message or probe instead.
            _, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT_S) if tasks else ((), ())
            for task in stuck:
                log.info(
                    "a node's live feed ends at its next read", extra={"task": task.get_name()}
                )

    async def _check_topology(self, owners: dict[int, Address]) -> None:
        try:
            await self._cluster.refresh()
        except (RedisError, OSError) as exc:
            raise BusDisconnected(f"reading the slot map failed: {exc}") from exc
        moved = sorted(
            p for p, a in owners.items() if self._cluster.address_for(partition_slot(p)) != a
        )
        if moved:
            raise BusMoved(f"partitions {moved} are served by another master now")

    async def _node(
        self, address: Address, partitions: list[int], feed: _Feed, stop: asyncio.Event
    ) -> None:
        """One master's connection: subscribe its partitions' channels, then feed what
        arrives; any end of it is put on the feed as an exception."""
        keys = self._keys
        channels = {keys.live(p).encode(): p for p in partitions}
        where = f"{address[0]}:{address[1]}"
        client = self._cluster.pubsub_client_of(address, f"{self._client_name}:subscription")
        pubsub: PubSub = client.pubsub()
        interval = self._ping_interval_s
        try:
            for channel in channels:
                await asyncio.wait_for(pubsub.ssubscribe(channel), timeout=SUBSCRIBE_TIMEOUT_S)
            idle = 0.0
            while not stop.is_set():
                message = await pubsub.get_message(timeout=interval)
                if message is None:
                    idle += interval
                    if idle > 3 * interval:
                        raise BusDisconnected(f"no answer to pings from {where}")
                    await pubsub.ping()
                    continue
                idle = 0.0
                kind = message["type"]
                channel = message.get("channel")
                partition = channels.get(channel) if isinstance(channel, bytes) else None
                if partition is None:
                    continue  # a pong
                if kind == "smessage":
                    for item in read_live_payload(
                        message["data"], partition, keys.live(partition), self.bad_inputs
                    ):
                        _put(feed, item, where)
                elif kind == "ssubscribe":
                    _put(feed, Subscribed(partition), where)
                elif kind == "sunsubscribe":
                    # Never asked for: the server dropped the channel because its slot left.
                    raise BusMoved(f"{where} dropped partition {partition}'s channel")
        except asyncio.CancelledError:
            raise
        except MovedError as exc:
            _fail(feed, BusMoved(f"{where} refused a channel: {exc}"))
        except (BusMoved, BusDisconnected) as exc:
            _fail(feed, exc)
        except (RedisError, OSError, TimeoutError) as exc:
            _fail(feed, BusDisconnected(f"{where}: {exc!r}"))
        except Exception as exc:
            # A bug: logged with its traceback; the subscription ends and starts over.
            log.exception("live feed failed", extra={"node": where})
            _fail(feed, BusDisconnected(f"{where}: {exc!r}"))
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(pubsub.aclose(), timeout=1.0)  # type: ignore[no-untyped-call]


def _put(feed: _Feed, item: LiveItem, where: str) -> None:
    try:
        feed.put_nowait(item)
    except asyncio.QueueFull:
        raise BusDisconnected(f"the live feed from {where} fell {FEED_ITEMS} behind") from None


def _fail(feed: _Feed, exc: BaseException) -> None:
    """Put the end of a node's feed where the consumer sees it next, even on a full feed:
    what is queued is dropped (the resubscription repairs every partition anyway)."""
    while True:
        try:
            feed.put_nowait(exc)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                feed.get_nowait()
