"""Input from Redis never stops an edge (issue 11, item 1): a malformed live line or stream
entry is skipped, reported once and counted; a background task that ends anyway makes
/readyz 503 naming it, and it is restarted.

Over the in-memory bus, which parses raw bytes exactly as the Redis bus does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.bus_memory import MemoryBus
from shared.contract import encode_live_line, encode_live_payload
from shared.ids import ZERO
from shared.settings import EdgeSettings, RedisSettings
from shared.tasks import Supervisor
from tests.sse_client import Collector
from tests.waiting import eventually

TS = 1_700_000_000_000


def envelope(seq: int) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": "ContactCreated", "event": {"Seq": seq}}, separators=(",", ":"))
    return b"ContactCreated", TS, data.encode()


def fields(seq: int) -> dict[bytes, bytes]:
    type_, ts, data = envelope(seq)
    return {b"t": type_, b"ts": b"%d" % ts, b"m": b"-", b"d": data}


def seqs(collector: Collector) -> list[int]:
    return [f.json()["event"]["Seq"] for f in collector.data_frames]


class Gate:
    """The supervisor's restart delay, held until the test opens it."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0

    async def __call__(self, _delay: float) -> None:
        self.waiting += 1
        try:
            await self.opened.wait()
        finally:
            self.waiting -= 1


class Edge:
    def __init__(
        self, server: TestServer, bus: MemoryBus, registry: CollectorRegistry, gate: Gate
    ) -> None:
        self.server = server
        self.bus = bus
        self.registry = registry
        self.gate = gate

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def bad(self, reason: str) -> float:
        return self.metric("crm_events_bad_messages_total", {"reason": reason})

    async def readyz(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, object]]:
        async with session.get(self.url("/readyz")) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    bus = MemoryBus()
    registry = CollectorRegistry()
    gate = Gate()
    settings = EdgeSettings(
        redis=RedisSettings(), node_id="edge-test", ping_interval_s=0.2, backoff_max_s=0.05
    )
    app = create_app(settings, registry=registry, bus=bus, tasks=Supervisor(registry, sleep=gate))
    server = TestServer(app)
    await server.start_server()
    try:
        yield Edge(server, bus, registry, gate)
    finally:
        gate.opened.set()
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def listening(edge: Edge, session: aiohttp.ClientSession) -> Collector:
    client = Collector(edge.url("/crm-events")).start(session)
    await eventually(
        lambda: edge.metric("crm_events_sse_clients") >= 1, 5, "the client to be attached"
    )
    return client


async def test_a_four_field_live_line_is_skipped_and_later_events_flow(
    edge: Edge, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    client = await listening(edge, session)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    # The line ARCHITECTURE.md used to document: no match field.
    four = b"1700000000999-0 ContactCreated 1700000000000 " + envelope(99)[2]
    with caplog.at_level(logging.WARNING, logger="edge.bus"):
        edge.bus.publish_raw(four)
        edge.bus.publish([envelope(1)])
        edge.bus.publish([envelope(2)])
        await client.wait_for(lambda c: len(c.data_frames) == 3, 5, "events 1 and 2")
    assert seqs(client) == [0, 1, 2]
    assert edge.bad("bad_live_line") == 1
    assert edge.bad("bad_entry") == 0
    (record,) = [
        r for r in caplog.records if r.getMessage() == "skipped malformed input from redis"
    ]
    assert record.__dict__["reason"] == "bad_live_line"
    assert record.__dict__["where"] == "channel memory:live line 1"
    assert "4 space-separated fields" in record.__dict__["detail"]
    assert record.__dict__["excerpt"].startswith("1700000000999-0 ContactCreated")
    status, body = await edge.readyz(session)
    assert status == 200 and body["subscribed"] is True and body["failed_tasks"] == []
    await client.stop()


async def test_a_bad_line_loses_no_good_event_of_its_batch(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    """Good lines around a bad one are delivered, and the event the bad line stood for is
    read from the stream (the truth) before anything after it."""
    client = await listening(edge, session)
    ids = [edge.bus.add_raw(fields(seq)) for seq in range(4)]
    lines = [
        encode_live_line(sid.encode(), b"ContactCreated", TS, b"-", envelope(seq)[2])
        for seq, sid in enumerate(ids)
    ]
    lines[1] = lines[1].replace(b" - ", b" ", 1)  # event 1's line lost its match field
    lines.insert(3, b"garbage")  # and a foreign line before event 3
    edge.bus.publish_raw(encode_live_payload(lines))
    edge.bus.publish([envelope(4)])
    await client.wait_for(lambda c: len(c.data_frames) >= 5, 5, "events 0..4")
    assert seqs(client) == [0, 1, 2, 3, 4]
    assert edge.bad("bad_live_line") == 2
    await client.stop()


async def test_a_long_bad_line_is_quoted_short(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    await eventually(lambda: edge.bus._feeds, 5, "the subscription")
    with caplog.at_level(logging.WARNING, logger="edge.bus"):
        edge.bus.publish_raw(b"x" * 100_000)
        await eventually(lambda: edge.bad("bad_live_line") == 1, 5, "the bad line counted")
    (record,) = [
        r for r in caplog.records if r.getMessage() == "skipped malformed input from redis"
    ]
    assert len(record.__dict__["excerpt"]) <= 130


async def test_a_foreign_stream_entry_does_not_stop_the_repair(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = await listening(edge, session)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    edge.bus.drop_subscriptions()
    # Written while the subscription is down, so the repair reads them from the stream.
    edge.bus.add_raw({b"foo": b"bar"})
    edge.bus.add_raw(fields(1))
    await client.wait_for(lambda c: len(c.data_frames) == 2, 5, "event 1, repaired")
    edge.bus.publish([envelope(2)])
    await client.wait_for(lambda c: len(c.data_frames) == 3, 5, "event 2, live")
    assert seqs(client) == [0, 1, 2]
    assert edge.bad("bad_entry") == 1

    # Reads skip it and still fill their page, and it is reported once, not per read.
    for _ in range(3):
        newest = await edge.bus.read_before(None, 2)
        assert [json.loads(e.data)["event"]["Seq"] for e in newest] == [2, 1]
        oldest = await edge.bus.read_after(ZERO, 3)
        assert [json.loads(e.data)["event"]["Seq"] for e in oldest] == [0, 1, 2]
    assert edge.bad("bad_entry") == 1
    status, body = await edge.readyz(session)
    assert status == 200 and body["subscribed"] is True
    await client.stop()


async def test_a_crashed_subscription_is_not_ready_then_restarted(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = await listening(edge, session)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    status, _ = await edge.readyz(session)
    assert status == 200

    edge.bus.fail_live(RuntimeError("a bug nobody foresaw"))
    await eventually(lambda: edge.gate.waiting, 5, "the supervisor to wait before restarting")
    status, body = await edge.readyz(session)
    assert status == 503
    assert body["failed_tasks"] == ["edge-subscription"]
    edge.bus.publish([envelope(1)])  # published while the task is down

    edge.gate.opened.set()

    async def ready_again() -> bool:
        return (await edge.readyz(session))[0] == 200

    await eventually(ready_again, 5, "/readyz 200 after the restart")
    edge.bus.publish([envelope(2)])
    await client.wait_for(lambda c: len(c.data_frames) == 3, 5, "events 1 and 2")
    assert seqs(client) == [0, 1, 2]
    assert edge.metric("crm_events_task_restarts_total", {"task": "edge-subscription"}) == 1
    with contextlib.suppress(Exception):
        await client.stop()
