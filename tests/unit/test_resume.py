"""edge.resume and edge.replay: the per-partition decision (exact, ahead, or reset and why),
and replays that re-check on every page: a trim between two replay pages, and a ring that
falls behind mid-replay, give a reset or the exact events, never a silent gap."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from edge.bus import Entry
from edge.bus_memory import MemoryBus
from edge.hub import Client, Hub
from edge.lru import ByteLru
from edge.metrics import EdgeMetrics
from edge.params import LegacyId
from edge.replay import Resumer
from edge.resume import (
    NOT_RETAINED,
    TRIMMED,
    Exact,
    Reset,
    decide,
    overall_reason,
    reset_payload,
)
from edge.ring import entry_bytes
from shared.contract import PartitionState
from shared.cursor import Cursor
from tests.sse_client import Frame, _parse_block, assert_cursors_never_go_back


def entry(position: int, prev: int) -> Entry:
    return Entry.build(0, position - 1, prev, b"A", 0, b"{}")


STATE = PartitionState(applied=99, last=100, base=10)
"""A partition refilled from position 10, holding events up to 100."""


@pytest.mark.parametrize(
    ("requested", "first", "state", "expected"),
    [
        # the next entry links back to the reader or before: nothing missed
        pytest.param(20, entry(21, 20), STATE, Exact(0, 20), id="next-links-to-reader"),
        pytest.param(20, entry(25, 18), STATE, Exact(0, 20), id="markers-between"),
        pytest.param(10, entry(12, 10), STATE, Exact(0, 10), id="at-base"),
        # the next entry links past the reader: lost in between
        pytest.param(20, entry(51, 50), STATE, Reset(0, 20, 50, TRIMMED), id="trimmed"),
        pytest.param(3, entry(12, 10), STATE, Reset(0, 3, 10, NOT_RETAINED), id="before-base"),
        pytest.param(3, entry(51, 50), STATE, Reset(0, 3, 50, TRIMMED), id="before-base-trimmed"),
        pytest.param(3, entry(51, 50), None, Reset(0, 3, 50, TRIMMED), id="no-state"),
        # nothing after the reader
        pytest.param(100, None, STATE, Exact(0, 100), id="at-last"),
        pytest.param(101, None, STATE, Exact(0, 101, ahead=True), id="after-last-applied"),
        pytest.param(150, None, STATE, Exact(0, 150, ahead=True), id="ahead-of-redis"),
        pytest.param(150, None, None, Exact(0, 150, ahead=True), id="redis-lost-it-all"),
        pytest.param(0, None, None, Exact(0, 0), id="nothing-anywhere"),
        pytest.param(
            3,
            None,
            PartitionState(applied=99, last=60, base=10),
            Reset(0, 3, 60, NOT_RETAINED),
            id="before-base-stream-emptied",
        ),
    ],
)
def test_decide(
    requested: int, first: Entry | None, state: PartitionState | None, expected: object
) -> None:
    assert decide(0, requested, first, state) == expected


@pytest.mark.parametrize("requested", range(0, 120, 3))
def test_a_reset_never_repeats_from_its_own_position(requested: int) -> None:
    stream = [entry(p, p - 1 if p > 51 else 50) for p in range(51, 101)]  # trimmed at 50

    def first_after(c: int) -> Entry | None:
        return next((e for e in stream if e.position > c), None)

    decision = decide(0, requested, first_after(requested), STATE)
    if isinstance(decision, Reset):
        assert decision.oldest_available is not None
        again = decide(0, decision.oldest_available, first_after(decision.oldest_available), STATE)
        assert again == Exact(0, decision.oldest_available)


def test_reset_payload_names_each_partition() -> None:
    resets = [Reset(2, 5, 30, TRIMMED), Reset(0, None, 7, NOT_RETAINED)]
    payload = reset_payload(resets)
    assert payload["reason"] == "trimmed"
    assert payload["partitions"] == [
        {"partition": 0, "requested": None, "oldest_available": 7, "reason": "not_retained"},
        {"partition": 2, "requested": 5, "oldest_available": 30, "reason": "trimmed"},
    ]
    assert payload["message"]
    assert json.loads(json.dumps(payload)) == payload
    assert overall_reason([Reset(0, 1, 2, NOT_RETAINED)]) == "not_retained"
    assert overall_reason([Reset(0, 1, 2, TRIMMED), Reset(1, 1, 2, "topic_changed")]) == (
        "topic_changed"
    )


# --- replays that re-check every page ---------------------------------------------------------

EPOCH = 1
PAGE = 7


def event(seq: int) -> tuple[bytes, int, bytes]:
    return b"A", seq, b'{"seq":%d}' % seq


class ListWriter:
    """Collects what a replay writes; ``on_write`` runs after each write (between pages)."""

    def __init__(self) -> None:
        self.data = b""
        self.on_write: Callable[[int], None] | None = None
        self.writes = 0

    async def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1
        if self.on_write is not None:
            self.on_write(self.writes)

    def write_shared(self, framed: bytes) -> bool:
        return False

    def frames(self) -> list[Frame]:
        blocks = self.data.split(b"\n\n")
        return [f for b in blocks if b and (f := _parse_block(b.decode(), None)) is not None]


def resumer(bus: MemoryBus, hub: Hub) -> Resumer:
    metrics = EdgeMetrics(CollectorRegistry(), "test")
    return Resumer(bus, hub, metrics, PAGE, ByteLru(1 << 20), refill_wait_s=0.2)


def seqs(frames: list[Frame]) -> list[int]:
    return [f.json()["seq"] for f in frames if f.event == "message"]


async def test_a_trim_between_two_replay_pages_gives_a_reset_not_a_gap() -> None:
    bus = MemoryBus(maxlen=1000)
    bus.publish([event(i) for i in range(1, 101)])  # positions 1..100
    hub = Hub(ring_bytes=0)
    hub.start(EPOCH, [100])
    reads = 0

    def trim_after_the_first_page(partition: int) -> None:
        nonlocal reads
        reads += 1
        if reads == 2:  # the decision read page one; the replay now asks for page two
            bus.trim(0, 50)

    bus.before_read = trim_after_the_first_page
    r = resumer(bus, hub)
    plan = await r.plan(Cursor(EPOCH, (10,)))
    assert plan.resets == []
    client = Client(None, 1 << 20, lambda: None)
    head = hub.attach(client, plan.cursor)
    writer = ListWriter()
    await r.replay(plan, client, head, writer)

    frames = writer.frames()
    assert seqs(frames) == [*range(11, 18), *range(51, 101)]
    (reset,) = [f for f in frames if f.event == "reset"]
    assert reset.json()["partitions"] == [
        {"partition": 0, "requested": 17, "oldest_available": 50, "reason": "trimmed"}
    ]
    assert reset.cursor == Cursor(EPOCH, (50,))
    assert_cursors_never_go_back(frames)


async def test_a_ring_that_falls_behind_mid_replay_falls_back_to_checked_redis_pages() -> None:
    size = entry_bytes(Entry.build(0, 0, 0, *event(10)))
    for redis_kept, expect_reset in ((100, False), (20, True)):
        bus = MemoryBus(maxlen=1000)
        written = bus.publish([event(i) for i in range(1, 31)])
        hub = Hub(ring_bytes=20 * size + 10)
        hub.start(EPOCH, [0])
        hub.dispatch(written)
        assert hub.ring.covers(0, 12) and not hub.ring.covers(0, 9)
        bus.trim(0, redis_kept)  # 20: Redis keeps 11..30 only
        r = resumer(bus, hub)
        plan = await r.plan(Cursor(EPOCH, (12,)))
        assert plan.resets == [] and plan.pages == {}  # decided from memory
        client = Client(None, 1 << 20, lambda: None)
        head = hub.attach(client, plan.cursor)
        writer = ListWriter()

        def more_events(
            writes: int, hub: Hub = hub, bus: MemoryBus = bus, expect_reset: bool = expect_reset
        ) -> None:
            if writes == 1:
                # Live traffic pushes the ring past where the replay stands (19 after one
                # page of 7): the next page comes from Redis, and is checked.
                hub.dispatch(bus.publish([event(i) for i in range(31, 51)], live=False))
                if expect_reset:
                    bus.trim(0, 25)  # Redis keeps 26..50

        writer.on_write = more_events
        await r.replay(plan, client, head, writer)
        frames = writer.frames()
        resets = [f for f in frames if f.event == "reset"]
        if expect_reset:
            assert seqs(frames) == [*range(13, 20), *range(26, 31)]
            assert [f.json()["partitions"][0]["oldest_available"] for f in resets] == [25]
        else:
            assert seqs(frames) == list(range(13, 31))
            assert resets == []
        assert_cursors_never_go_back(frames)


async def test_redis_behind_the_hub_is_waited_for_then_reset() -> None:
    """Redis rolled back below what the hub already dispatched and nothing refills it: after
    the wait, the replay resets rather than skip silently to live."""
    bus = MemoryBus(maxlen=1000)
    written = bus.publish([event(i) for i in range(1, 21)])
    hub = Hub(ring_bytes=0)
    hub.start(EPOCH, [0])
    hub.dispatch(written)
    bus.rollback(0, applied=9)  # Redis now holds 1..10
    r = resumer(bus, hub)
    plan = await r.plan(Cursor(EPOCH, (5,)))
    client = Client(None, 1 << 20, lambda: None)
    writer = ListWriter()
    await r.replay(plan, client, hub.attach(client, plan.cursor), writer)
    frames = writer.frames()
    assert seqs(frames) == list(range(6, 11))
    (reset,) = [f for f in frames if f.event == "reset"]
    assert reset.json()["partitions"][0] == {
        "partition": 0,
        "requested": 10,
        "oldest_available": 20,
        "reason": "not_retained",
    }


async def test_redis_refilling_behind_the_hub_is_waited_for_and_exact() -> None:
    bus = MemoryBus(maxlen=1000)
    written = bus.publish([event(i) for i in range(1, 21)])
    hub = Hub(ring_bytes=0)
    hub.start(EPOCH, [0])
    hub.dispatch(written)
    bus.rollback(0, applied=9)
    r = resumer(bus, hub)
    r.refill_wait_s = 10.0
    plan = await r.plan(Cursor(EPOCH, (5,)))
    client = Client(None, 1 << 20, lambda: None)
    writer = ListWriter()
    refilled = False

    def refill(partition: int) -> None:
        nonlocal refilled
        if not refilled and bus.entries(0)[-1].position == 10:
            reads.append(partition)
            if len(reads) > 2:  # a few reads see Redis behind; then ingest re-applies
                refilled = True
                bus.ingest(0)

    reads: list[int] = []
    bus.before_read = refill
    await r.replay(plan, client, hub.attach(client, plan.cursor), writer)
    frames = writer.frames()
    assert seqs(frames) == list(range(6, 21))
    assert [f for f in frames if f.event == "reset"] == []


async def test_foreign_cursors_reset_every_partition_from_the_oldest() -> None:
    bus = MemoryBus(maxlen=5, partitions=2)
    bus.publish([event(i) for i in range(1, 9)], partition=0)  # keeps 4..8 (pv 3..)
    hub = Hub(ring_bytes=0)
    hub.start(EPOCH, [8, None])
    r = resumer(bus, hub)
    for requested, reason in (
        (LegacyId("17-0"), "old_format"),
        (Cursor(EPOCH + 1, (3,)), "topic_changed"),
        (Cursor(EPOCH, (3, 0, 0)), "topic_changed"),  # more partitions than the topic
    ):
        plan = await r.plan(requested)
        assert [(x.partition, x.oldest_available, x.reason) for x in plan.resets] == [
            (0, 3, reason),
            (1, None, reason),
        ]
        assert plan.cursor == Cursor(EPOCH, (3, None))
