"""The edge app over the in-memory bus: SSE framing, resume handoff, gap repair, resets,
history and JSON errors, without any network service."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.bus_memory import MemoryBus
from shared.settings import EdgeSettings, RedisSettings
from tests.sse_client import Collector


def envelope(seq: int, type_: str = "ContactCreated") -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": type_, "event": {"Type": type_, "Seq": seq}}, separators=(",", ":"))
    return type_.encode(), 1_700_000_000_000, data.encode()


def seqs(collector: Collector) -> list[int]:
    return [f.json()["event"]["Seq"] for f in collector.data_frames]


class Edge:
    def __init__(self, server: TestServer, bus: MemoryBus, registry: CollectorRegistry) -> None:
        self.server = server
        self.bus = bus
        self.registry = registry

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_edge(ring: int) -> AsyncIterator[Edge]:
    bus = MemoryBus(maxlen=50)
    registry = CollectorRegistry()
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-test",
        ping_interval_s=0.2,
        backoff_max_s=0.05,
        history_max_n=20,
        resume_page=7,
        replay_ring_events=ring,
    )
    app = create_app(settings, registry=registry, bus=bus)
    server = TestServer(app)
    await server.start_server()
    try:
        yield Edge(server, bus, registry)
    finally:
        await server.close()


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    # A ring smaller than the stream, so that old positions exercise the Redis path.
    async with running_edge(ring=20) as e:
        yield e


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def connected(edge: Edge, n: int) -> None:
    async def check() -> None:
        while edge.metric("crm_events_sse_clients") < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(check(), timeout=5)


async def test_live_frames_are_exact_and_unnamed(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    async with session.get(edge.url("/crm-events")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert await resp.content.readuntil(b"\n\n") == b"retry: 2000\n\n"
        assert await resp.content.readuntil(b"\n\n") == b": node edge-test\n\n"
        (entry,) = edge.bus.publish([envelope(1)])
        frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
        assert frame == b"id: " + entry.id_bytes + b"\ndata: " + entry.data + b"\n\n"


async def test_keepalive_comment_arrives_when_idle(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    async with session.get(edge.url("/crm-events")) as resp:
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        ping = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
        assert ping.startswith(b":")


async def test_type_filter_live(edge: Edge, session: aiohttp.ClientSession) -> None:
    deals = Collector(edge.url("/crm-events?types=DealWon,DealLost")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(i, "DealWon" if i % 3 == 0 else "ContactCreated") for i in range(9)])
    await deals.wait_for(lambda c: len(c.data_frames) >= 3, 5, "three DealWon events")
    assert seqs(deals) == [0, 3, 6]
    await deals.stop()


async def test_resume_handoff_while_events_flow(edge: Edge, session: aiohttp.ClientSession) -> None:
    """A client resuming mid-stream gets every later event exactly once, in order, while
    events keep being published during its catch-up."""
    edge.bus.maxlen = 10_000
    first = edge.bus.publish([envelope(i) for i in range(40)])
    resume_from = first[9]  # the client saw events 0..9
    stop = asyncio.Event()

    async def produce() -> None:
        seq = 40
        while not stop.is_set() and seq < 400:
            edge.bus.publish([envelope(seq), envelope(seq + 1)])
            seq += 2
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    client = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": resume_from.id_bytes.decode()}
    ).start(session)
    await producer
    await client.wait_for(lambda c: len(c.data_frames) >= 390, 10, "all events after 9")
    assert seqs(client) == list(range(10, 400))
    ids = [f.id for f in client.data_frames]
    assert len(set(ids)) == len(ids)
    assert edge.metric("crm_events_sse_resumes_total", {"outcome": "resumed"}) == 1
    await client.stop()


async def test_query_last_event_id_and_header_precedence(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    entries = edge.bus.publish([envelope(i) for i in range(5)])
    query = Collector(edge.url(f"/crm-events?last_event_id={entries[1].id}")).start(session)
    both = Collector(
        edge.url(f"/crm-events?last_event_id={entries[0].id}"),
        headers={"Last-Event-ID": str(entries[3].id)},
    ).start(session)
    await query.wait_for(lambda c: len(c.data_frames) >= 3, 5, "events 2..4")
    await both.wait_for(lambda c: len(c.data_frames) >= 1, 5, "event 4")
    assert seqs(query) == [2, 3, 4]
    assert seqs(both) == [4]
    await query.stop()
    await both.stop()


async def test_trimmed_position_gets_reset_first(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    entries = edge.bus.publish([envelope(i) for i in range(80)])  # maxlen 50 trims 0..29
    client = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": str(entries[5].id)}
    ).start(session)
    await client.wait_for(lambda c: len(c.data_frames) >= 50, 5, "the retained 50 events")
    assert client.received[0].event == "reset"
    reset = client.received[0].json()
    assert reset["reason"] == "trimmed"
    assert reset["requested"] == str(entries[5].id)
    assert reset["oldest_available"] == str(entries[30].id)
    assert client.received[0].id == reset["resume_from"]
    assert seqs(client) == list(range(30, 80))
    await client.stop()
    # Reconnecting with the reset's own id resumes without another reset.
    again = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": reset["resume_from"]}
    ).start(session)
    await again.wait_for(lambda c: len(c.data_frames) >= 50, 5, "the retained events again")
    assert all(f.event == "message" for f in again.received)
    await again.stop()


async def test_subscription_drop_is_repaired_from_the_stream(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    edge.bus.drop_subscriptions()
    edge.bus.publish([envelope(1), envelope(2)])  # published while unsubscribed
    edge.bus.publish([envelope(3)])
    await client.wait_for(lambda c: len(c.data_frames) >= 4, 5, "events 1..3 after repair")
    edge.bus.publish([envelope(4)])
    await client.wait_for(lambda c: len(c.data_frames) >= 5, 5, "event 4 live")
    assert seqs(client) == [0, 1, 2, 3, 4]
    assert edge.metric("crm_events_bus_reconnects_total") >= 1
    await client.stop()


async def test_lost_stream_resets_connected_clients(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events?types=DealWon")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(0, "DealWon")])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    edge.bus.drop_subscriptions()
    edge.bus.wipe()
    edge.bus.publish([envelope(1, "DealWon")])
    await client.wait_for(lambda c: len(c.data_frames) >= 2, 5, "event after the wipe")
    events = [f.event for f in client.received]
    assert events == ["message", "reset", "message"]
    assert client.received[1].json()["reason"] == "stream_lost"
    await client.stop()


async def test_history_latest_and_paging(edge: Edge, session: aiohttp.ClientSession) -> None:
    edge.bus.publish([envelope(i, "DealWon" if i % 2 else "ContactCreated") for i in range(30)])
    async with session.get(edge.url("/crm-events/history?n=10")) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert [item["event"]["Seq"] for item in body["items"]] == list(range(20, 30))
    assert body["count"] == 10
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        query = "n=4&types=DealWon" + (f"&after={cursor}" if cursor else "&after=0-0")
        async with session.get(edge.url(f"/crm-events/history?{query}")) as resp:
            page = await resp.json()
        seen += [item["event"]["Seq"] for item in page["items"]]
        if not page["items"]:
            break
        cursor = page["next_after"]
    assert seen == list(range(1, 30, 2))


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/crm-events/history?n=abc", 400, "invalid_n"),
        ("/crm-events/history?n=0", 400, "invalid_n"),
        ("/crm-events/history?n=1000000000", 400, "invalid_n"),
        ("/crm-events/history?after=nope", 400, "invalid_id"),
        ("/crm-events/history?types=A,,B", 400, "invalid_types"),
        ("/crm-events?types=bad%20type", 400, "invalid_types"),
        ("/crm-events?last_event_id=12", 400, "invalid_id"),
        ("/no/such/path", 404, "not_found"),
    ],
)
async def test_errors_are_json(
    edge: Edge, session: aiohttp.ClientSession, path: str, status: int, code: str
) -> None:
    async with session.get(edge.url(path)) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == code
    assert body["message"]


async def test_method_not_allowed_is_json(edge: Edge, session: aiohttp.ClientSession) -> None:
    async with session.post(edge.url("/crm-events/history")) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"


async def test_readyz_reflects_bus_health(edge: Edge, session: aiohttp.ClientSession) -> None:
    async with session.get(edge.url("/readyz")) as resp:
        assert resp.status == 200
    edge.bus.healthy = False
    async with session.get(edge.url("/readyz")) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "not_ready"


async def test_resume_is_served_from_memory_while_redis_reads_fail(
    session: aiohttp.ClientSession,
) -> None:
    async with running_edge(ring=100) as edge:
        client = Collector(edge.url("/crm-events")).start(session)
        await connected(edge, 1)
        entries = edge.bus.publish([envelope(i) for i in range(80)])  # the stream keeps 30..79
        await client.wait_for(lambda c: len(c.data_frames) >= 80, 5, "80 live events")
        await client.stop()
        edge.bus.reads_fail = True
        resumed = Collector(
            edge.url("/crm-events"), headers={"Last-Event-ID": str(entries[5].id)}
        ).start(session)
        await resumed.wait_for(lambda c: len(c.data_frames) >= 74, 5, "events 6..79")
        # Gap-free from memory although Redis has trimmed them and cannot be read.
        assert [f.event for f in resumed.received] == ["message"] * 74
        assert seqs(resumed) == list(range(6, 80))
        assert edge.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"}) == 1
        assert edge.metric("crm_events_replay_ring_events") == 80
        await resumed.stop()


async def test_position_before_a_lost_stream_is_not_served_from_memory(
    session: aiohttp.ClientSession,
) -> None:
    async with running_edge(ring=100) as edge:
        live = Collector(edge.url("/crm-events")).start(session)
        await connected(edge, 1)
        old = edge.bus.publish([envelope(i) for i in range(5)])
        await live.wait_for(lambda c: len(c.data_frames) >= 5, 5, "5 live events")
        edge.bus.drop_subscriptions()
        edge.bus.wipe()
        edge.bus.publish([envelope(100)])
        await live.wait_for(lambda c: len(c.data_frames) >= 6, 5, "the event after the wipe")
        await live.stop()
        client = Collector(
            edge.url("/crm-events"), headers={"Last-Event-ID": str(old[2].id)}
        ).start(session)
        await client.wait_for(lambda c: len(c.data_frames) >= 1, 5, "the new stream's event")
        assert client.received[0].event == "reset"
        assert seqs(client) == [100]
        await client.stop()


async def test_history_from_memory_answers_exactly_as_redis_does(
    session: aiohttp.ClientSession,
) -> None:
    types = ["ContactCreated", "DealWon", "DealWon", "TicketOpened", "DealLost"]
    events = [envelope(i, types[i % 5] if i % 13 else "Rare") for i in range(45)]
    async with running_edge(ring=0) as redis_only, running_edge(ring=1000) as memory:
        watchers = []
        for edge in (redis_only, memory):
            watchers.append(Collector(edge.url("/crm-events")).start(session))
            await connected(edge, 1)
            edge.bus.publish(events[:20])
            edge.bus.publish(events[20:])
        for watcher in watchers:
            await watcher.wait_for(lambda c: len(c.data_frames) >= 45, 5, "45 live events")
            await watcher.stop()
        ids = [str(e.id) for e in redis_only.bus._entries]
        queries = ["", "n=1", "n=20", "n=3&types=Rare", "n=2&types=DealWon,DealLost"]
        queries += [f"n=4&after={ids[k]}" for k in (0, 10, 40, 44)]
        queries += [f"n=3&types=Rare&after={ids[k]}" for k in (1, 30)]
        for query in queries:
            bodies = []
            for edge in (redis_only, memory):
                async with session.get(edge.url(f"/crm-events/history?{query}")) as resp:
                    assert resp.status == 200, query
                    bodies.append(await resp.read())
            assert bodies[0] == bodies[1], query
            # Only a cursor at the newest event has nothing after it.
            assert (json.loads(bodies[0])["count"] == 0) == query.endswith(ids[-1]), query
        hits = memory.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"})
        # All but the default n (100): the ring holds 45, and only Redis knows if more exist.
        assert hits == len(queries) - 1
        assert redis_only.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"}) == 0
