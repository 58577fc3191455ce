"""SIGTERM's drain ends every stream, including those still being set up when it starts.

A request that passed the ``shutting_down`` check but was not yet attached to the hub
(waiting for readiness, or for Redis to locate its resume position) used to miss
``close_all`` and stream on until the server cancelled it, or answer 503 after the ready
wait, which an EventSource never retries. Each stream open at shutdown must instead end
cleanly (a complete chunked body after the ``retry:`` preface), so that its client
reconnects to another edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import CONTEXT, create_app
from edge.bus import Entry
from edge.bus_memory import MemoryBus
from shared.settings import EdgeSettings, RedisSettings
from tests.sse_client import cursor_text

DEADLINE_S = 10.0
"""Far below the runner's 60 s shutdown timeout, after which aiohttp cancels handlers."""


class HeldReadBus(MemoryBus):
    """The in-memory bus whose stream reads can be held, as a slow Redis would hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held = 0
        self._release = asyncio.Event()

    async def read_after(
        self, partition: int, position: int, count: int, until: int | None = None
    ) -> list[Entry]:
        if self.hold:
            self.held += 1
            await self._release.wait()
        return await super().read_after(partition, position, count, until)


def envelope(seq: int) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": "A", "event": {"Type": "A", "Seq": seq}}, separators=(",", ":"))
    return b"A", 1_700_000_000_000, data.encode()


async def eventually(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not check():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def edge(bus: MemoryBus) -> AsyncIterator[tuple[TestServer, CollectorRegistry]]:
    registry = CollectorRegistry()
    settings = EdgeSettings(redis=RedisSettings(), node_id="edge-drain", ping_interval_s=0.2)
    server = TestServer(create_app(settings, registry=registry, bus=bus))
    await server.start_server()
    try:
        yield server, registry
    finally:
        await server.close()


async def read_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Status and the whole body; raises if the body does not end cleanly."""
    async with session.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.read()


def shutdowns(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("crm_events_sse_disconnects_total", {"reason": "shutdown"})
    return value or 0.0


async def test_streams_waiting_for_their_resume_position_end_on_shutdown() -> None:
    bus = HeldReadBus()
    # Published before the edge starts, so they precede its replay ring: resuming from the
    # first one takes the Redis path, which reads the stream.
    first = bus.publish([envelope(i) for i in range(5)])[0]
    async with aiohttp.ClientSession() as session, edge(bus) as (server, registry):
        app = server.app
        assert app is not None
        await eventually(app[CONTEXT].subscription.ready.is_set, "subscribed")
        url = str(server.make_url("/crm-events"))
        attached = asyncio.create_task(read_stream(session, url))
        await eventually(lambda: app[CONTEXT].hub.client_count == 1, "a stream attached")
        bus.hold = True
        setting_up = [
            asyncio.create_task(
                read_stream(session, url, {"Last-Event-ID": cursor_text(1, first.position)})
            )
            for _ in range(3)
        ]
        await eventually(lambda: bus.held == 3, "three streams waiting on Redis")

        closing = asyncio.create_task(server.close())
        async with asyncio.timeout(DEADLINE_S):
            results = await asyncio.gather(attached, *setting_up)
        for status, body in results:
            assert status == 200
            assert body.startswith(b"retry:"), body[:80]
            assert b"data:" not in body  # nothing was published after they opened
        assert shutdowns(registry) == 4
        await closing


async def test_streams_waiting_for_readiness_end_on_shutdown() -> None:
    bus = MemoryBus()
    bus.reads_fail = True  # the subscription cannot repair, so it never becomes ready
    async with aiohttp.ClientSession() as session, edge(bus) as (server, registry):
        app = server.app
        assert app is not None
        url = str(server.make_url("/crm-events"))
        waiting = [asyncio.create_task(read_stream(session, url)) for _ in range(3)]
        await eventually(lambda: app[CONTEXT].connections.held == 3, "three streams waiting")
        assert not app[CONTEXT].subscription.ready.is_set()

        closing = asyncio.create_task(server.close())
        async with asyncio.timeout(DEADLINE_S):
            results = await asyncio.gather(*waiting)
        # Not 503 (an EventSource gives up for good on it): a stream that ends, so that
        # the client reconnects through the load balancer to another edge.
        assert [status for status, _ in results] == [200, 200, 200]
        assert all(body.startswith(b"retry:") for _, body in results)
        assert shutdowns(registry) == 3
        assert app[CONTEXT].connections.held == 0
        await closing


class HeldAfterBus(HeldReadBus):
    """Holds every stream read after the first ``allowed`` once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: int | None = None

    async def read_after(
        self, partition: int, position: int, count: int, until: int | None = None
    ) -> list[Entry]:
        if self.allowed is not None:
            if self.allowed == 0:
                self.hold = True
            self.allowed -= 1
        return await super().read_after(partition, position, count, until)


async def test_a_stream_replaying_from_redis_ends_cleanly_on_shutdown() -> None:
    """The replay's later page reads are held (a slow Redis): SIGTERM stops the replay at
    once and ends the stream cleanly, rather than leaving it to be cancelled at the grace
    deadline (aiohttp's shutdown timeout, 60 s here)."""
    bus = HeldAfterBus()
    first = bus.publish([envelope(i) for i in range(6)])[0]
    registry = CollectorRegistry()
    settings = EdgeSettings(
        redis=RedisSettings(), node_id="edge-drain", ping_interval_s=0.2, resume_page=2
    )
    server = TestServer(create_app(settings, registry=registry, bus=bus))
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        app = server.app
        assert app is not None
        await eventually(app[CONTEXT].subscription.ready.is_set, "subscribed")
        url = str(server.make_url("/crm-events"))
        bus.allowed = 1  # the plan's first page; the replay's next page is held
        resuming = asyncio.create_task(
            read_stream(session, url, {"Last-Event-ID": cursor_text(1, first.position)})
        )
        await eventually(lambda: bus.held == 1, "the replay waiting on Redis")

        closing = asyncio.create_task(server.close())
        async with asyncio.timeout(DEADLINE_S):
            status, body = await resuming
        assert status == 200
        assert body.startswith(b"retry:")
        assert body.count(b"data:") == 2  # the first page (events 1 and 2), then the end
        assert shutdowns(registry) == 1
        await closing
