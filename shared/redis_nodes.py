"""Which Redis server holds a slot: one client for a single Redis (or Sentinel's primary), or
one client per Redis Cluster master, routed by the cluster's own slot map.

Both processes address Redis by slot: every key of partition N is in ``partition_slot(N)``
and the meta hash in its own. With one server every slot is that server. With a Cluster, the
slot map comes from ``CLUSTER SLOTS`` of any node that answers (the URL's seeds, then every
node seen since), and is read again whenever a server says a slot is elsewhere (``MOVED``,
``ASK``), is migrating (``TRYAGAIN``), the cluster is down, or a connection fails.

Why not redis-py's ``RedisCluster`` (ARCHITECTURE.md, "Redis Cluster"): ingest's scripts and
their ``WAIT`` must travel on one connection to the master that owns the slot, which its
routing of a keyless ``WAIT`` cannot do, and the edge needs one pub/sub connection per master
that it reads as soon as a message arrives and probes while idle, which its ``ClusterPubSub``
(round-robin polling of each node with a timeout) does not give. So both use plain clients
of the masters from here, and the slot map is this module's alone.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_client import client_options, make_redis, node_tls_options
from .settings import ClusterTarget, RedisSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
Address = tuple[str, int]

REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
"""Answers that mean "not here, or not now": read the slot map again and retry."""
RETRYABLE = (*REDIRECTS, RedisConnectionError, RedisTimeoutError, OSError)
CALL_ATTEMPTS = 4
"""Tries of one routed call; between them the slot map is read again. A planned failover or
a migration settles within these; a dead master takes the cluster's node timeout, which the
callers ride out with their own backoff."""
RETRY_PAUSE_S = 0.05
MAX_IDLE_CLIENTS = 16
"""Clients of addresses that no longer serve slots, kept for when they do again."""
NODE_RETRIES = 1
"""redis-py's own retries per command on a node client. Few: ``call`` retries on a fresh
slot map, and a command that waits out redis-py's default 10 retries on a dead master holds
every caller behind it (ingest's whole batch) for seconds."""


class Nodes(Protocol):
    """The Redis servers of a deployment, by slot."""

    @property
    def cluster(self) -> bool:
        """True for a Redis Cluster (sharded pub/sub, one connection per master)."""
        ...

    def client_for(self, slot: int) -> Redis:
        """The client of the server that holds ``slot`` (as last known)."""
        ...

    def address_for(self, slot: int) -> Address | None:
        """Where ``slot`` lives (as last known); None with a single server."""
        ...

    async def refresh(self) -> None:
        """Read the slot map again (nothing to do with a single server)."""
        ...

    async def call(self, slot: int, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """``fn`` with the client of ``slot``'s server, following redirects."""
        ...

    def clients(self) -> list[Redis]:
        """Every server's client (a single one, or each known master's)."""
        ...

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """True when every server answers (a Cluster: every master of the slot map)."""
        ...

    async def aclose(self) -> None: ...


class SingleNode:
    """One Redis (or the primary a Sentinel names): every slot is there."""

    cluster = False

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def client_for(self, slot: int) -> Redis:
        return self.redis

    def address_for(self, slot: int) -> Address | None:
        return None

    async def refresh(self) -> None:
        return None

    async def call(self, slot: int, fn: Callable[[Redis], Awaitable[T]]) -> T:
        return await fn(self.redis)

    def clients(self) -> list[Redis]:
        return [self.redis]

    async def ping(self, timeout_s: float = 1.0) -> bool:
        return await _ping_all([self.redis], timeout_s)

    async def aclose(self) -> None:
        await self.redis.aclose()


class SlotMap:
    """Contiguous slot ranges and their masters, from ``CLUSTER SLOTS``."""

    __slots__ = ("_ends", "_owners", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int, Address]]) -> None:
        ordered = sorted(ranges)
        self._starts = [r[0] for r in ordered]
        self._ends = [r[1] for r in ordered]
        self._owners = [r[2] for r in ordered]

    @classmethod
    def parse(cls, reply: Sequence[Any], asked: str = "") -> SlotMap:
        """``asked``: the host the reply came from, which an empty or unknown endpoint
        (``cluster-preferred-endpoint-type unknown-endpoint``) stands for."""
        ranges = []
        for item in reply:
            start, end, master = int(item[0]), int(item[1]), item[2]
            raw = master[0]
            host = raw.decode() if isinstance(raw, bytes) else ("" if raw is None else str(raw))
            if host in ("", "?"):
                host = asked
            ranges.append((start, end, (host, int(master[1]))))
        return cls(ranges)

    def owner(self, slot: int) -> Address | None:
        i = bisect.bisect_right(self._starts, slot) - 1
        if i >= 0 and slot <= self._ends[i]:
            return self._owners[i]
        return None

    def masters(self) -> set[Address]:
        return set(self._owners)

    def covered(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def ranges_of(self, address: Address) -> list[tuple[int, int]]:
        return [
            (s, e)
            for s, e, o in zip(self._starts, self._ends, self._owners, strict=True)
            if o == address
        ]


class ClusterNodes:
    """The masters of a Redis Cluster, one client (with its own pool) each."""

    cluster = True

    def __init__(
        self,
        settings: RedisSettings,
        target: ClusterTarget,
        client_name: str,
    ) -> None:
        self._settings = settings
        self._target = target
        self._client_name = client_name
        self._known: list[Address] = list(target.seeds)
        self._clients: dict[Address, Redis] = {}
        self._pubsub_clients: dict[Address, Redis] = {}
        self._map = SlotMap([])
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.refreshes = 0
        """How many times the slot map was read (tests, logs)."""

    def client_of(self, address: Address) -> Redis:
        client = self._clients.get(address)
        if client is None:
            client = self._new_client(address, self._client_name, for_pubsub=False)
            self._clients[address] = client
        return client

    def pubsub_client_of(self, address: Address, client_name: str) -> Redis:
        """A client of ``address`` for pub/sub only (no read timeout; see ``make_redis``)."""
        client = self._pubsub_clients.get(address)
        if client is None:
            client = self._new_client(address, client_name, for_pubsub=True)
            self._pubsub_clients[address] = client
        return client

    def _new_client(self, address: Address, client_name: str, *, for_pubsub: bool) -> Redis:
        options = client_options(self._settings, client_name, for_pubsub)
        options.update(node_tls_options(self._settings, self._target))
        if for_pubsub:
            # No retry: a lost connection ends the subscription, and the edge subscribes
            # again from a fresh slot map and repairs. (redis-py still reconnects once before
            # giving up, and resubscribes every shard channel of the connection in one
            # SSUBSCRIBE, which a node refuses across slots; that connection is dropped.)
            options["retry"] = Retry(NoBackoff(), 0)
        else:
            options["retry"] = Retry(
                ExponentialWithJitterBackoff(base=RETRY_PAUSE_S, cap=4 * RETRY_PAUSE_S),
                NODE_RETRIES,
            )
        return Redis(host=address[0], port=address[1], **options)

    def client_for(self, slot: int) -> Redis:
        address = self._map.owner(slot)
        if address is None:
            # Not read yet, or the slot is not served: a seed answers MOVED (or CLUSTERDOWN),
            # and the caller's retry reads the map first.
            address = self._known[0]
        return self.client_of(address)

    def address_for(self, slot: int) -> Address | None:
        return self._map.owner(slot)

    @property
    def slot_map(self) -> SlotMap:
        return self._map

    async def refresh(self, seen: int | None = None) -> None:
        """Read the slot map from the first node that answers: known masters first (they
        see failovers soonest; in random order, so that one stale master is not always the
        one asked), then the seeds and every node seen before. ``seen``: the ``refreshes``
        count when the caller's failure began; if another caller has read the map since,
        that read is taken instead (one read per failure, not one per waiting request)."""
        async with self._lock:
            if seen is not None and self.refreshes != seen:
                return
            masters = list(self._map.masters())
            random.shuffle(masters)
            candidates = list(dict.fromkeys([*masters, *self._known]))
            errors = []
            for address in candidates:
                try:
                    reply = await asyncio.wait_for(
                        self.client_of(address).execute_command("CLUSTER", "SLOTS"),  # type: ignore[no-untyped-call]
                        self._settings.timeout_s,
                    )
                    new = SlotMap.parse(reply, address[0])
                except (RedisError, OSError, TimeoutError, ValueError, IndexError) as exc:
                    errors.append(f"{address[0]}:{address[1]}: {exc!r}")
                    continue
                if new.covered() == 0:
                    errors.append(f"{address[0]}:{address[1]}: no slots assigned")
                    continue
                self._adopt(new)
                return
            raise RedisConnectionError(
                "no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors)
            )

    def _adopt(self, new: SlotMap) -> None:
        old = self._map
        self._map = new
        self.refreshes += 1
        # Known: the seeds and today's masters, no more (addresses come and go with pods).
        # Yesterday's masters are often today's replicas: their clients are kept while
        # the number of addresses stays small, and closed once it does not.
        self._known = list(dict.fromkeys([*self._target.seeds, *new.masters()]))
        if len(self._clients) > MAX_IDLE_CLIENTS + len(self._known):
            for address in [a for a in self._clients if a not in self._known]:
                self._retire(self._clients.pop(address))
        for address in [a for a in self._pubsub_clients if a not in self._known]:
            self._retire(self._pubsub_clients.pop(address))
        if old.masters() != new.masters():
            log.info(
                "redis cluster masters",
                extra={"masters": sorted(f"{h}:{p}" for h, p in new.masters())},
            )

    def _retire(self, client: Redis) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def call(self, slot: int, fn: Callable[[Redis], Awaitable[T]]) -> T:
        if self._map.owner(slot) is None:
            await self.refresh(self.refreshes)
        for attempt in range(CALL_ATTEMPTS):
            seen = self.refreshes
            try:
                return await fn(self.client_for(slot))
            except RETRYABLE:
                if attempt == CALL_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))
                with contextlib.suppress(RedisError, OSError):
                    await self.refresh(seen)
        raise AssertionError("unreachable")

    def clients(self) -> list[Redis]:
        return [self.client_of(a) for a in sorted(self._map.masters())]

    async def ping(self, timeout_s: float = 1.0) -> bool:
        if not self._map.masters():
            try:
                await asyncio.wait_for(self.refresh(self.refreshes), timeout_s)
            except (RedisError, OSError, TimeoutError):
                return False
        return await _ping_all(self.clients(), timeout_s)

    async def aclose(self) -> None:
        clients = [*self._clients.values(), *self._pubsub_clients.values()]
        self._clients, self._pubsub_clients = {}, {}
        for client in clients:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


async def _ping_all(clients: Sequence[Redis], timeout_s: float) -> bool:
    async def one(client: Redis) -> bool:
        try:
            return bool(await asyncio.wait_for(client.ping(), timeout_s))
        except (RedisError, OSError, TimeoutError):
            return False

    return all(await asyncio.gather(*(one(c) for c in clients)))


def make_nodes(settings: RedisSettings, client_name: str) -> Nodes:
    """The deployment's Redis servers: a Cluster's masters for a ``redis+cluster://`` URL,
    otherwise the one server ``make_redis`` connects to."""
    target = settings.cluster
    if target is not None:
        return ClusterNodes(settings, target, client_name)
    return SingleNode(make_redis(settings, client_name))


def raise_redirects(results: Sequence[Any]) -> None:
    """A pipeline run with ``raise_on_error=False`` answers errors in place; a redirect among
    them means the slot map is stale: raise it, so that ``call`` reads the map and retries."""
    for value in results:
        if isinstance(value, REDIRECTS):
            raise value
