"""The edge app over the in-memory bus: SSE framing with cursor ids, resume handoff, gap
repair, resets per partition, a wiped Redis refilled from Kafka, history and JSON errors,
without any network service."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import CONTEXT, create_app
from edge.bus import Entry
from edge.bus_memory import MemoryBus
from shared.cursor import Cursor, decode_cursor
from shared.settings import EdgeSettings, RedisSettings
from tests.sse_client import (
    Collector,
    assert_cursors_never_go_back,
    cursor_text,
)
from tests.waiting import eventually

EPOCH = 1


def envelope(seq: int, type_: str = "ContactCreated", ts: int = 0) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": type_, "event": {"Type": type_, "Seq": seq}}, separators=(",", ":"))
    return type_.encode(), 1_700_000_000_000 + ts, data.encode()


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

    @property
    def hub_cursor(self) -> Cursor:
        app = self.server.app
        assert app is not None
        return app[CONTEXT].hub.cursor()

    async def dispatched(self, entries: list[Entry]) -> None:
        """Wait until the hub has dispatched ``entries`` (the last one of each partition)."""
        app = self.server.app
        assert app is not None
        hub = app[CONTEXT].hub
        last = {e.partition: e.position for e in entries}

        def done() -> bool:
            return all(
                p < hub.partitions and (hub.positions[p] or 0) >= pos for p, pos in last.items()
            )

        await eventually(done, 5, "the hub to dispatch the entries")


@contextlib.asynccontextmanager
async def running_edge(
    ring_bytes: int, partitions: int = 1, maxlen: int = 50
) -> AsyncIterator[Edge]:
    bus = MemoryBus(maxlen=maxlen, partitions=partitions, epoch=EPOCH)
    registry = CollectorRegistry()
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-test",
        ping_interval_s=0.2,
        backoff_max_s=0.05,
        history_max_n=20,
        resume_page=7,
        replay_ring_bytes=ring_bytes,
    )
    app = create_app(settings, registry=registry, bus=bus)
    server = TestServer(app)
    await server.start_server()
    try:
        await eventually(app[CONTEXT].subscription.ready.is_set, 5, "the edge to subscribe")
        yield Edge(server, bus, registry)
    finally:
        await server.close()


RING_20_EVENTS = 20 * 700
"""About 20 of this module's events (the ring counts bytes)."""


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    # A ring smaller than the stream, so that old positions exercise the Redis path.
    async with running_edge(ring_bytes=RING_20_EVENTS) as e:
        yield e


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def connected(edge: Edge, n: int) -> None:
    await eventually(lambda: edge.metric("crm_events_sse_clients") >= n, 5, f"{n} clients")


async def test_live_frames_carry_the_hub_cursor_and_no_event_name(
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
        cursor = Cursor(EPOCH, (entry.position,)).encode()
        assert frame == b"id: " + cursor + b"\ndata: " + entry.data + b"\n\n"
        assert decode_cursor(cursor).position(0) == entry.offset + 1


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
    # A filtered client's cursor covers the events it did not want: a resume filters again.
    assert deals.data_frames[-1].cursor.position(0) == 7
    await deals.stop()


async def test_resume_handoff_while_events_flow(edge: Edge, session: aiohttp.ClientSession) -> None:
    """A client resuming mid-stream gets every later event exactly once, in order, while
    events keep being published during its catch-up, and its ids never go back."""
    edge.bus.maxlen = 10_000
    first = edge.bus.publish([envelope(i) for i in range(40)])
    resume_from = cursor_text(EPOCH, first[9].position)  # the client saw events 0..9
    stop = asyncio.Event()

    async def produce() -> None:
        seq = 40
        while not stop.is_set() and seq < 400:
            edge.bus.publish([envelope(seq), envelope(seq + 1)])
            seq += 2
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    client = Collector(edge.url("/crm-events"), headers={"Last-Event-ID": resume_from}).start(
        session
    )
    await producer
    await client.wait_for(lambda c: len(c.data_frames) >= 390, 10, "all events after 9")
    assert seqs(client) == list(range(10, 400))
    positions = [f.cursor.position(0) for f in client.data_frames]
    assert positions == list(range(11, 401))
    assert edge.metric("crm_events_sse_resumes_total", {"outcome": "resumed"}) == 1
    await client.stop()


async def test_query_last_event_id_and_header_precedence(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    entries = edge.bus.publish([envelope(i) for i in range(5)])
    at = [cursor_text(EPOCH, e.position) for e in entries]
    query = Collector(edge.url(f"/crm-events?last_event_id={at[1]}")).start(session)
    both = Collector(
        edge.url(f"/crm-events?last_event_id={at[0]}"), headers={"Last-Event-ID": at[3]}
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
    await edge.dispatched(entries)
    requested = entries[5].position
    client = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": cursor_text(EPOCH, requested)}
    ).start(session)
    await client.wait_for(lambda c: len(c.data_frames) >= 50, 5, "the retained 50 events")
    first = client.received[0]
    assert first.event == "reset"
    reset = first.json()
    assert reset["reason"] == "trimmed"
    assert reset["partitions"] == [
        {
            "partition": 0,
            "requested": requested,
            "oldest_available": entries[30].prev,
            "reason": "trimmed",
        }
    ]
    assert reset["message"]
    assert first.cursor == Cursor(EPOCH, (entries[30].prev,))
    assert seqs(client) == list(range(30, 80))
    assert_cursors_never_go_back(client.received)
    assert edge.metric("crm_events_sse_resets_total", {"reason": "trimmed"}) == 1
    assert (
        edge.metric("crm_events_partition_resets_total", {"partition": "0", "reason": "trimmed"})
        == 1
    )
    await client.stop()
    # Reconnecting with the reset's own id resumes without another reset.
    again = Collector(edge.url("/crm-events"), headers={"Last-Event-ID": first.id or ""}).start(
        session
    )
    await again.wait_for(lambda c: len(c.data_frames) >= 50, 5, "the retained events again")
    assert all(f.event == "message" for f in again.received)
    await again.stop()


async def test_offsets_that_are_no_events_are_not_a_gap(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    """Transaction markers and dead letters take offsets without entries: a cursor just
    before such a hole resumes exactly (the pv links say nothing is missing)."""
    edge.bus.maxlen = 10_000
    before = edge.bus.publish([envelope(0)])
    edge.bus.skip_offsets(5)
    after = edge.bus.publish([envelope(1), envelope(2)])
    await edge.dispatched(after)
    assert after[0].offset == before[0].offset + 6
    # Out of the ring's reach: the Redis path decides.
    edge.bus.publish([envelope(100 + i) for i in range(40)])
    client = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": cursor_text(EPOCH, before[0].position)}
    ).start(session)
    await client.wait_for(lambda c: len(c.data_frames) >= 42, 5, "all events after 0")
    assert [f.event for f in client.received] == ["message"] * 42
    assert seqs(client)[:2] == [1, 2]
    await client.stop()


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


async def test_a_lost_live_message_is_repaired_from_the_pv_link(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(0)])
    edge.bus.publish([envelope(1)], live=False)  # written, but its message never arrives
    edge.bus.publish([envelope(2)])
    await client.wait_for(lambda c: len(c.data_frames) >= 3, 5, "events 0..2")
    assert seqs(client) == [0, 1, 2]
    await client.stop()


async def test_a_wiped_redis_is_refilled_and_connected_clients_see_each_event_once(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events?types=DealWon")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(i, "DealWon") for i in range(3)])
    await client.wait_for(lambda c: len(c.data_frames) == 3, 5, "events 0..2")
    edge.bus.drop_subscriptions()
    edge.bus.wipe()
    # Ingest's next step finds the partition lost and refills it from Kafka (same ids).
    edge.bus.publish([envelope(3, "DealWon")])
    await client.wait_for(lambda c: len(c.data_frames) >= 4, 5, "the event after the wipe")
    edge.bus.publish([envelope(4, "DealWon")])
    await client.wait_for(lambda c: len(c.data_frames) >= 5, 5, "one more")
    assert edge.bus.refills == 2  # the first fill, and the refill after the wipe
    assert [f.event for f in client.received] == ["message"] * 5
    assert seqs(client) == [0, 1, 2, 3, 4]
    await client.stop()


async def test_a_refill_that_starts_after_the_hub_resets_connected_clients(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events")).start(session)
    await connected(edge, 1)
    edge.bus.publish([envelope(0)])
    await client.wait_for(lambda c: len(c.data_frames) == 1, 5, "event 0")
    edge.bus.drop_subscriptions()
    edge.bus.wipe()
    edge.bus.produce([envelope(i) for i in range(1, 5)])
    edge.bus.retain_kafka(0, 3)  # Kafka no longer has offsets 1 and 2
    edge.bus.publish([envelope(5)])
    await client.wait_for(lambda c: len(c.data_frames) >= 4, 5, "events 3..5")
    assert [f.event for f in client.received] == [
        "message",
        "reset",
        "message",
        "message",
        "message",
    ]
    reset = client.received[1].json()
    assert reset["partitions"] == [
        {"partition": 0, "requested": 1, "oldest_available": 3, "reason": "not_retained"}
    ]
    assert seqs(client) == [0, 3, 4, 5]
    assert_cursors_never_go_back(client.received)
    await client.stop()


async def test_history_latest_and_paging(edge: Edge, session: aiohttp.ClientSession) -> None:
    edge.bus.publish([envelope(i, "DealWon" if i % 2 else "ContactCreated") for i in range(30)])
    async with session.get(edge.url("/crm-events/history?n=10")) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert [item["event"]["Seq"] for item in body["items"]] == list(range(20, 30))
    assert body["count"] == 10
    assert [decode_cursor(i["cursor"]).position(0) for i in body["items"]] == list(range(21, 31))
    assert body["next_after"] == body["items"][-1]["cursor"]
    seen: list[int] = []
    cursor = cursor_text(EPOCH, None)  # from the oldest retained entry
    for _ in range(10):
        async with session.get(
            edge.url("/crm-events/history"),
            params={"n": "4", "types": "DealWon", "after": cursor},
        ) as resp:
            page = await resp.json()
        assert page["reset"] is None
        seen += [item["event"]["Seq"] for item in page["items"]]
        if not page["items"]:
            break
        cursor = page["next_after"]
    assert seen == list(range(1, 30, 2))


async def test_history_after_a_trimmed_cursor_says_reset(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    entries = edge.bus.publish([envelope(i) for i in range(80)])
    async with session.get(
        edge.url("/crm-events/history"),
        params={"n": "3", "after": cursor_text(EPOCH, entries[2].position)},
    ) as resp:
        body = await resp.json()
    assert body["reset"]["reason"] == "trimmed"
    assert body["reset"]["partitions"][0]["oldest_available"] == entries[30].prev
    assert [i["event"]["Seq"] for i in body["items"]] == [30, 31, 32]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/crm-events/history?n=abc", 400, "invalid_n"),
        ("/crm-events/history?n=0", 400, "invalid_n"),
        ("/crm-events/history?n=1000000000", 400, "invalid_n"),
        ("/crm-events/history?after=nope", 400, "invalid_cursor"),
        ("/crm-events/history?after=1.", 400, "invalid_cursor"),
        ("/crm-events/history?types=A,,B", 400, "invalid_types"),
        ("/crm-events?types=bad%20type", 400, "invalid_types"),
        ("/crm-events?last_event_id=12", 400, "invalid_cursor"),
        ("/crm-events?last_event_id=2.AAAAAQA", 400, "invalid_cursor"),
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
    async with running_edge(ring_bytes=1 << 20) as edge:
        client = Collector(edge.url("/crm-events")).start(session)
        await connected(edge, 1)
        entries = edge.bus.publish([envelope(i) for i in range(80)])  # the stream keeps 30..79
        await client.wait_for(lambda c: len(c.data_frames) >= 80, 5, "80 live events")
        await client.stop()
        edge.bus.reads_fail = True
        resumed = Collector(
            edge.url("/crm-events"),
            headers={"Last-Event-ID": cursor_text(EPOCH, entries[5].position)},
        ).start(session)
        await resumed.wait_for(lambda c: len(c.data_frames) >= 74, 5, "events 6..79")
        # Gap-free from memory although Redis has trimmed them and cannot be read.
        assert [f.event for f in resumed.received] == ["message"] * 74
        assert seqs(resumed) == list(range(6, 80))
        assert edge.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"}) == 1
        assert edge.metric("crm_events_replay_ring_events") == 80
        assert 0 < edge.metric("crm_events_replay_ring_bytes") <= 1 << 20
        await resumed.stop()


async def test_an_old_cursor_after_a_wipe_gets_exactly_what_it_missed(
    session: aiohttp.ClientSession,
) -> None:
    """Redis wiped and refilled from Kafka: a cursor from before the wipe resumes with the
    events it missed, no reset, even past the edge's ring (the refill has the same ids)."""
    async with running_edge(ring_bytes=0, maxlen=1000) as edge:
        old = edge.bus.publish([envelope(i) for i in range(5)])
        await edge.dispatched(old)
        edge.bus.drop_subscriptions()
        edge.bus.wipe()
        new = edge.bus.publish([envelope(100)])
        await edge.dispatched(new)
        client = Collector(
            edge.url("/crm-events"), headers={"Last-Event-ID": cursor_text(EPOCH, old[2].position)}
        ).start(session)
        await client.wait_for(lambda c: len(c.data_frames) >= 3, 5, "events 3, 4 and 100")
        assert [f.event for f in client.received] == ["message"] * 3
        assert seqs(client) == [3, 4, 100]
        await client.stop()


async def test_an_old_format_id_gets_one_reset_then_everything_retained(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    entries = edge.bus.publish([envelope(i) for i in range(3)])
    await edge.dispatched(entries)
    client = Collector(edge.url("/crm-events"), headers={"Last-Event-ID": "1700000000000-4"}).start(
        session
    )
    await client.wait_for(lambda c: len(c.data_frames) >= 3, 5, "the retained events")
    assert [f.event for f in client.received] == ["reset", "message", "message", "message"]
    reset = client.received[0].json()
    assert reset["reason"] == "old_format"
    assert reset["partitions"] == [
        {"partition": 0, "requested": None, "oldest_available": 0, "reason": "old_format"}
    ]
    assert seqs(client) == [0, 1, 2]
    await client.stop()
    again = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": client.received[0].id or ""}
    ).start(session)
    await again.wait_for(lambda c: len(c.data_frames) >= 3, 5, "the same events, no reset")
    assert [f.event for f in again.received] == ["message"] * 3
    await again.stop()


async def test_a_recreated_topic_resets_connected_and_resuming_clients(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    client = Collector(edge.url("/crm-events")).start(session)
    await connected(edge, 1)
    old = edge.bus.publish([envelope(0), envelope(1)])
    await client.wait_for(lambda c: len(c.data_frames) == 2, 5, "events 0 and 1")
    edge.bus.recreate_topic(epoch=2)
    app = edge.server.app
    assert app is not None
    app[CONTEXT].subscription._next_meta = 0.0  # poll the meta hash now, not in 5 s
    await eventually(lambda: edge.hub_cursor.epoch == 2, 5, "the new epoch")
    edge.bus.publish([envelope(10)])
    await client.wait_for(lambda c: len(c.data_frames) >= 3, 5, "the new topic's event")
    assert [f.event for f in client.received] == ["message", "message", "reset", "message"]
    assert client.received[2].json()["reason"] == "topic_changed"
    assert client.received[3].cursor.epoch == 2
    await client.stop()
    stale = Collector(
        edge.url("/crm-events"), headers={"Last-Event-ID": cursor_text(EPOCH, old[1].position)}
    ).start(session)
    await stale.wait_for(lambda c: len(c.data_frames) >= 1, 5, "the new topic's event")
    assert [f.event for f in stale.received] == ["reset", "message"]
    assert stale.received[0].json()["reason"] == "topic_changed"
    assert seqs(stale) == [10]
    await stale.stop()


async def test_partitions_resume_independently(session: aiohttp.ClientSession) -> None:
    """Three partitions, one trimmed past the cursor: the reset names that partition alone,
    the others continue exactly, and the cursor carries every partition."""
    async with running_edge(ring_bytes=0, partitions=3, maxlen=20) as edge:
        sent = {
            p: edge.bus.publish([envelope(p * 100 + i) for i in range(10)], partition=p)
            for p in range(3)
        }
        await edge.dispatched([e for entries in sent.values() for e in entries])
        cursor = cursor_text(EPOCH, sent[0][3].position, sent[1][4].position, None)
        edge.bus.publish([envelope(i) for i in range(50, 80)], partition=1)  # trims partition 1
        client = Collector(edge.url("/crm-events"), headers={"Last-Event-ID": cursor}).start(
            session
        )
        await client.wait_for(lambda c: len(c.data_frames) >= 6 + 20 + 10, 5, "the replay")
        (reset,) = client.resets
        assert reset.json()["partitions"] == [
            {"partition": 1, "requested": 5, "oldest_available": 20, "reason": "trimmed"}
        ]
        got = seqs(client)
        # Partition 0 after its 4th event, partition 1 from its oldest retained (the last 20
        # of 40), partition 2 from its oldest (no position in the cursor).
        assert [s for s in got if s < 50] == [4, 5, 6, 7, 8, 9]
        assert [s for s in got if 50 <= s < 200] == [*range(110, 110), *range(60, 80)]
        assert [s for s in got if s >= 200] == list(range(200, 210))
        assert client.data_frames[-1].cursor.positions == (10, 40, 10)
        assert_cursors_never_go_back(client.received)
        await client.stop()


async def test_history_from_memory_answers_exactly_as_redis_does(
    session: aiohttp.ClientSession,
) -> None:
    types = ["ContactCreated", "DealWon", "DealWon", "TicketOpened", "DealLost"]
    events = [envelope(i, types[i % 5] if i % 13 else "Rare", ts=i // 2) for i in range(45)]
    async with (
        running_edge(ring_bytes=0, partitions=2) as redis_only,
        running_edge(ring_bytes=1 << 20, partitions=2) as memory,
    ):
        watchers = []
        for edge in (redis_only, memory):
            watchers.append(Collector(edge.url("/crm-events")).start(session))
            await connected(edge, 1)
            edge.bus.publish(events[:20:2], partition=0)
            edge.bus.publish(events[1:20:2], partition=1)
            edge.bus.publish(events[20::2], partition=0)
            edge.bus.publish(events[21::2], partition=1)
        for watcher in watchers:
            await watcher.wait_for(lambda c: len(c.data_frames) >= 45, 5, "45 live events")
            await watcher.stop()
        positions = [e.position for e in redis_only.bus.entries(0)]
        ones = [e.position for e in redis_only.bus.entries(1)]
        queries = ["n=1", "n=20", "n=3&types=Rare", "n=2&types=DealWon,DealLost"]
        for k in (0, 5, 20, 22):
            after = cursor_text(EPOCH, positions[k], ones[min(k, len(ones) - 1)])
            queries += [f"n=4&after={after}", f"n=3&types=Rare&after={after}"]
        for query in queries:
            bodies = []
            for edge in (redis_only, memory):
                async with session.get(edge.url(f"/crm-events/history?{query}")) as resp:
                    assert resp.status == 200, query
                    bodies.append(await resp.read())
            assert bodies[0] == bodies[1], query
        hits = memory.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"})
        # All but the newest 3 Rare: the rings hold fewer than the 30 entries that scan may
        # look at per partition, and only Redis knows whether older ones exist.
        assert hits == len(queries) - 1
        assert redis_only.metric("crm_events_replay_ring_reads_total", {"outcome": "hit"}) == 0
        # Merged by (Kafka timestamp, partition, offset); the newest n across partitions.
        async with session.get(redis_only.url("/crm-events/history?n=6")) as resp:
            body = await resp.json()
        assert [i["event"]["Seq"] for i in body["items"]] == [39, 40, 41, 42, 43, 44]


async def test_every_known_partitions_reset_counters_are_exported_from_zero(edge: Edge) -> None:
    # A counter child created by its first increment starts at 1: rate() and the alerts built
    # on it would miss that first reset. Each partition's children exist once it is known.
    from edge.resume import RESET_REASONS

    partitions = edge.bus.partitions

    def exported() -> bool:
        return all(
            edge.registry.get_sample_value(
                "crm_events_partition_resets_total", {"partition": str(p), "reason": r}
            )
            == 0.0
            for p in range(partitions)
            for r in RESET_REASONS
        )

    await eventually(exported, 5, "every partition's reset counters at 0")


async def test_a_partition_without_position_resumes_from_the_ring_when_it_holds_its_oldest(
    session: aiohttp.ClientSession,
) -> None:
    # A cursor made before partitions 1 and 2 had any event carries no position there, which
    # asks for their oldest retained entries. The ring began with those partitions' first
    # entries, so it holds them: a reconnect storm must not read them from Redis per client.
    async with running_edge(ring_bytes=3 * RING_20_EVENTS, partitions=3) as edge:
        marker = edge.bus.publish([envelope(0)], partition=0)
        await edge.dispatched(marker)
        cursor = edge.hub_cursor
        assert cursor.position(1) is None and cursor.position(2) is None
        later = [
            *edge.bus.publish([envelope(1), envelope(2)], partition=1),
            *edge.bus.publish([envelope(3), envelope(4)], partition=2),
        ]
        await edge.dispatched(later)
        edge.bus.reads_fail = True  # Redis reads would fail: only the ring can answer
        resumed = Collector(
            edge.url("/crm-events"), headers={"Last-Event-ID": cursor.encode().decode()}
        ).start(session)
        await resumed.wait_for(lambda c: len(c.data_frames) >= 4, 5, "the four events")
        assert sorted(seqs(resumed)) == [1, 2, 3, 4]
        assert not [f for f in resumed.received if f.event == "reset"]
        await resumed.stop()
