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
from edge.bus import MAX_BAD_LINES_CHECKED, BadInput, BadInputs, Entry, Resync, read_live_payload
from edge.bus_memory import MemoryBus
from shared.contract import encode_live_line, encode_live_payload
from shared.settings import EdgeSettings, RedisSettings
from shared.tasks import Supervisor
from tests.sse_client import Collector
from tests.waiting import eventually

TS = 1_700_000_000_000


def envelope(seq: int) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": "ContactCreated", "event": {"Seq": seq}}, separators=(",", ":"))
    return b"ContactCreated", TS, data.encode()


def fields(seq: int, prev: int) -> dict[bytes, bytes]:
    type_, ts, data = envelope(seq)
    return {b"t": type_, b"ts": b"%d" % ts, b"m": b"-", b"pv": b"%d" % prev, b"d": data}


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


async def test_a_five_field_live_line_is_skipped_and_later_events_flow(
    edge: Edge, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    client = await listening(edge, session)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    # The line the single-stream layout published: no pv field.
    five = b"1700000000999-0 ContactCreated 1700000000000 - " + envelope(99)[2]
    with caplog.at_level(logging.WARNING, logger="edge.bus"):
        edge.bus.publish_raw(five)
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
    assert record.__dict__["where"] == "channel memory:{p0}:live line 1"
    assert "5 space-separated fields" in record.__dict__["detail"]
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
    entries = edge.bus.publish([envelope(seq) for seq in range(4)], live=False)
    lines = [
        encode_live_line(e.offset, e.prev, b"ContactCreated", TS, b"-", e.data) for e in entries
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
    (first,) = edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    edge.bus.drop_subscriptions()
    # Written while the subscription is down, so the repair reads them from the stream: a
    # foreign entry, then a good one whose pv links it to event 0 (nothing missed).
    edge.bus.add_raw({b"foo": b"bar"})
    edge.bus.add_raw(fields(1, first.position))
    await client.wait_for(lambda c: len(c.data_frames) == 2, 5, "event 1, repaired")
    edge.bus.publish([envelope(2)])
    await client.wait_for(lambda c: len(c.data_frames) == 3, 5, "event 2, live")
    assert seqs(client) == [0, 1, 2]
    assert edge.bad("bad_entry") == 1
    assert client.resets == []

    # Reads skip it and still fill their page, and it is reported once, not per read.
    for _ in range(3):
        newest = await edge.bus.read_before(0, None, 2)
        assert [json.loads(e.data)["event"]["Seq"] for e in newest] == [2, 1]
        oldest = await edge.bus.read_after(0, 0, 3)
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


# --- a large malformed message costs bounded work (one report, lines after a cap unchecked) ---


def test_a_message_of_many_bad_lines_is_reported_once_after_bounded_work(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """100 KB of newlines used to log and count 100,001 bad lines, one by one (seconds of a
    blocked event loop); now one report stands for all of them."""
    import edge.bus as bus_module

    parsed = 0
    real = bus_module.live_entry

    def counting(partition: int, line: bytes) -> Entry:
        nonlocal parsed
        parsed += 1
        return real(partition, line)

    monkeypatch.setattr(bus_module, "live_entry", counting)
    reports: list[BadInput] = []
    bad_inputs = BadInputs()
    bad_inputs.sink = reports.append
    with caplog.at_level(logging.WARNING, logger="edge.bus"):
        out = list(read_live_payload(b"\n" * 100_000, 0, "memory:{p0}:live", bad_inputs))
    assert out == [Resync(0)]
    (report,) = reports
    assert report.count == 100_001
    assert report.where == "channel memory:{p0}:live line 1"
    assert "15 more bad lines" in report.detail and "99985 lines after them" in report.detail
    assert parsed == MAX_BAD_LINES_CHECKED
    assert len([r for r in caplog.records if r.name == "edge.bus"]) == 1


async def test_good_lines_after_the_unchecked_rest_come_from_the_stream(
    edge: Edge, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines after the cap are not looked at; the Resync repair reads the stream, which holds
    every event the message carried, so none of them is lost."""
    client = await listening(edge, session)
    entries = edge.bus.publish([envelope(seq) for seq in range(4)], live=False)
    lines = [
        encode_live_line(e.offset, e.prev, b"ContactCreated", TS, b"-", e.data) for e in entries
    ]
    garbage = [b"garbage %d" % i for i in range(MAX_BAD_LINES_CHECKED + 4)]
    with caplog.at_level(logging.WARNING, logger="edge.bus"):
        edge.bus.publish_raw(encode_live_payload([lines[0], *garbage, *lines[1:]]))
        edge.bus.publish([envelope(4)])
        await client.wait_for(lambda c: len(c.data_frames) >= 5, 5, "events 0..4")
    assert seqs(client) == [0, 1, 2, 3, 4]
    assert client.resets == []
    (record,) = [
        r for r in caplog.records if r.getMessage() == "skipped malformed input from redis"
    ]
    # 16 bad lines checked, then 4 more garbage lines and the 3 good ones skipped unchecked.
    assert record.__dict__["count"] == MAX_BAD_LINES_CHECKED + 7
    assert record.__dict__["where"] == "channel memory:{p0}:live line 2"
    assert edge.bad("bad_live_line") == MAX_BAD_LINES_CHECKED + 7  # once, by the count
    await client.stop()


# --- a foreign entry's envelope never makes a history body invalid JSON --------------------


async def test_history_stays_json_whatever_a_foreign_entry_holds(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = await listening(edge, session)
    (first,) = edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    # Neither is published, so only stream reads see them (the ring holds event 0 alone,
    # and a history of 10 takes the Redis path).
    empty = edge.bus.add_raw({**fields(0, first.position), b"d": b"{ }"})
    edge.bus.add_raw({**fields(0, empty), b"d": b"{not json}"})
    for _ in range(2):
        async with session.get(edge.url("/crm-events/history?n=10")) as resp:
            assert resp.status == 200
            body = json.loads(await resp.read())  # raised on the old splice: {"cursor":"…",}
        items = body["items"]
        assert len(items) == 2
        assert items[0]["event"]["Seq"] == 0
        assert set(items[1]) == {"cursor"}  # the empty object, with its cursor spliced in
    assert edge.bad("bad_entry") == 1  # "{not json}", once however often it is read
    await client.stop()


async def test_history_from_the_ring_leaves_out_a_live_envelope_that_is_not_json(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    """Live lines are not parsed as JSON (about 1 µs an event on the hot path; a bad one
    spoils one SSE frame), but the ring keeps them for history, whose body must stay JSON."""
    client = await listening(edge, session)
    (first,) = edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    forged = encode_live_line(first.position, first.position, b"A", TS, b"-", b"{not json}")
    edge.bus.publish_raw(forged)
    await client.wait_for(lambda c: len(c.data_frames) == 2, 5, "the forged frame")
    for n in (1, 2):  # two queries: both answered from the ring, neither cached for the other
        async with session.get(edge.url(f"/crm-events/history?n={n}")) as resp:
            assert resp.status == 200
            body = json.loads(await resp.read())
        assert [i["event"]["Seq"] for i in body["items"]] == ([] if n == 1 else [0])
    assert edge.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"}) >= 2
    assert edge.bad("bad_live_line") == 1
    await client.stop()
