"""The edge's answers to a hostile review: a new epoch with clients ahead of the hub,
positions beyond what a cursor holds, an edge that has never read the meta hash, a slow
refill under a resume, the cost of clients ahead of the hub, live lines out of order."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

import edge.subscription as subscription_module
from edge.bus import BadInputs, Resync, read_live_payload, read_stream_rows
from edge.bus_memory import MemoryBus
from edge.hub import Client, Hub
from edge.lru import ByteLru
from edge.metrics import EdgeMetrics
from edge.replay import NotReady, Resumer
from edge.subscription import Subscription
from shared.breaker import BreakerMetrics, CircuitBreaker
from shared.contract import (
    MAX_OFFSET,
    ContractError,
    encode_live_line,
    encode_live_payload,
    entry_id,
    parse_live_line,
    parse_state,
)
from shared.cursor import MAX_POSITION, Cursor
from shared.sse import control_frame
from tests.unit.test_hub import EPOCH, client, entry
from tests.unit.test_resume import PAGE, ListWriter, event, seqs
from tests.waiting import eventually

ENVELOPE = b'{"type":"A"}'


def reset_frame(cursor: Cursor) -> bytes:
    return control_frame("reset", {"reason": "topic_changed"}, cursor.encode())


# --- 1. a new epoch forgets what clients had of the old one -----------------------------------


async def test_a_new_epoch_with_a_client_ahead_resets_everyone_and_then_serves_it() -> None:
    hub = Hub()
    hub.start(EPOCH, [10])
    ahead, _ = client()
    hub.attach(ahead, Cursor(EPOCH, (20,)))  # it came from a faster edge
    other, _ = client()
    hub.attach(other)

    hub.start(EPOCH + 1, [None])  # the topic was recreated
    hub.broadcast_control(reset_frame)
    assert b"event: reset" in ahead.take()[0]
    assert b"event: reset" in other.take()[0]

    # Positions 1..25 of the new incarnation are new to both: none is skipped for the
    # client that was at 20 in the old one, and their ids are the new epoch's.
    hub.dispatch([entry(p, prev=p - 1 if p > 1 else 0) for p in range(1, 6)])
    hub.dispatch([entry(p) for p in range(6, 26)])
    got, _ = ahead.take()
    assert got == other.take()[0]
    assert got.count(b"id: ") == 25
    assert Cursor(EPOCH + 1, (25,)).encode() in got


# --- 2. positions beyond what a cursor holds ---------------------------------------------------


def test_the_largest_offset_a_cursor_holds_is_accepted_and_one_more_refused() -> None:
    good = encode_live_line(MAX_OFFSET, 0, b"A", 1, b"-", ENVELOPE)
    assert parse_live_line(good).position == MAX_POSITION
    for offset in (MAX_OFFSET + 1, 2**64 - 1, 10**20 - 1):
        with pytest.raises(ContractError, match="cursor"):
            parse_live_line(encode_live_line(offset, 0, b"A", 1, b"-", ENVELOPE))


def test_a_state_beyond_what_a_cursor_holds_is_refused() -> None:
    fields = {b"applied": b"%d" % (MAX_OFFSET + 1), b"last": b"1", b"base": b"1"}
    with pytest.raises(ContractError, match="cursor"):
        parse_state(fields)
    fields = {b"applied": b"5", b"last": b"%d" % (MAX_POSITION + 1), b"base": b"1"}
    with pytest.raises(ContractError, match="cursor"):
        parse_state(fields)


def test_a_live_line_beyond_the_cursor_range_is_a_counted_bad_line_not_a_crash() -> None:
    bad_inputs = BadInputs()
    reported = []
    bad_inputs.sink = reported.append
    payload = encode_live_payload(
        [
            encode_live_line(0, 0, b"A", 1, b"-", ENVELOPE),
            encode_live_line(MAX_OFFSET + 1, 1, b"A", 1, b"-", ENVELOPE),
        ]
    )
    items = list(read_live_payload(payload, 0, "ch", bad_inputs))
    assert isinstance(items[-1], Resync) and len(reported) == 1
    hub = Hub()
    hub.start(EPOCH, [0])
    for item in items:
        if isinstance(item, list):
            hub.dispatch(item)  # raised CursorError before: the subscription task died
    assert hub.positions == [1]


def test_a_stream_entry_beyond_the_cursor_range_is_a_counted_bad_entry() -> None:
    bad_inputs = BadInputs()
    reported = []
    bad_inputs.sink = reported.append
    fields = {b"t": b"A", b"ts": b"1", b"m": b"-", b"pv": b"0", b"d": ENVELOPE}
    rows = [(entry_id(0), fields), (entry_id(MAX_OFFSET + 1), {**fields, b"pv": b"1"})]
    entries = read_stream_rows(rows, 0, "s", bad_inputs)
    assert [e.position for e in entries] == [1]
    assert len(reported) == 1


# --- 3. an edge that has never read the meta hash ----------------------------------------------


async def test_an_edge_without_meta_is_not_ready_until_meta_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subscription_module, "META_POLL_EMPTY_S", 0.01)
    bus = MemoryBus(maxlen=1000, epoch=7, tick_s=0.01)
    bus.produce([event(i) for i in range(1, 21)])
    bus.wipe()  # Redis restarted empty; ingest is not back yet
    polls = 0
    meta = bus.meta

    async def counted_meta() -> object:
        nonlocal polls
        polls += 1
        return await meta()

    monkeypatch.setattr(bus, "meta", counted_meta)
    registry = CollectorRegistry()
    hub = Hub()
    sub = Subscription(
        bus,
        hub,
        EdgeMetrics(registry, "t"),
        PAGE,
        CircuitBreaker("redis", BreakerMetrics(registry)),
    )
    task = asyncio.create_task(sub.run())
    try:
        await eventually(lambda: polls >= 5, 5, "the meta hash polled a few times")
        assert not sub.ready.is_set()
        resumer = Resumer(bus, hub, EdgeMetrics(CollectorRegistry(), "r"), PAGE, ByteLru(1 << 20))
        with pytest.raises(NotReady):
            await resumer.plan(Cursor(7, (15,)))
        bus.ingest(0)  # ingest is back: refill and meta
        await asyncio.wait_for(sub.ready.wait(), 5)
        assert hub.epoch == 7 and hub.partitions == 1
        plan = await resumer.plan(Cursor(7, (15,)))
        assert plan.resets == []  # exact: the client gets 16.. and nothing twice
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- 4. a slow refill is waited for while it moves -----------------------------------------------


def gradual_refill(bus: MemoryBus, step: int = 1) -> None:
    """Each stream read, ingest re-applies ``step`` more records of what Redis lost (a
    refill that takes a while but keeps moving)."""
    full = list(bus.kafka[0])

    def advance(_partition: int) -> None:
        state = bus._states[0]
        applied = state.applied if state is not None else -1
        if applied >= full[-1].offset:
            return
        bus.kafka[0] = full[: applied + 1 + step]
        bus.ingest(0, live=False)
        bus.kafka[0] = full

    bus.before_read = advance


async def replay_after_rollback(refill_wait_s: float, refill_max_s: float) -> ListWriter:
    bus = MemoryBus(maxlen=1000)
    written = bus.publish([event(i) for i in range(1, 101)])
    hub = Hub(ring_bytes=0)
    hub.start(1, [0])
    hub.dispatch(written)
    bus.rollback(0, applied=49)  # Redis fails over; the refill stands at position 50
    r = Resumer(
        bus,
        hub,
        EdgeMetrics(CollectorRegistry(), "t"),
        PAGE,
        ByteLru(1 << 20),
        refill_wait_s=refill_wait_s,
        refill_max_s=refill_max_s,
    )
    plan = await r.plan(Cursor(1, (80,)))
    assert plan.resets == []
    gradual_refill(bus)
    c = Client(None, 1 << 20, lambda: None)
    writer = ListWriter()
    await r.replay(plan, c, hub.attach(c, plan.cursor), writer)
    return writer


async def test_a_refill_that_keeps_moving_is_waited_for_past_the_stall_timeout() -> None:
    # One record per poll (every 50 ms): 30+ polls, far longer than the stall timeout,
    # but never a stall.
    frames = (await replay_after_rollback(refill_wait_s=0.5, refill_max_s=60.0)).frames()
    assert [f for f in frames if f.event == "reset"] == []
    assert seqs(frames) == list(range(81, 101))


async def test_a_refill_that_keeps_moving_too_long_is_reset_at_the_overall_bound() -> None:
    frames = (await replay_after_rollback(refill_wait_s=5.0, refill_max_s=0.2)).frames()
    (reset,) = [f for f in frames if f.event == "reset"]
    assert reset.json()["partitions"][0]["reason"] == "not_retained"


# --- 5. clients ahead of the hub cost per batch, not per event ---------------------------------


def test_ahead_clients_with_one_cursor_share_one_chunk_and_skip_batches_they_have() -> None:
    hub = Hub()
    hub.start(EPOCH, [0, 0])
    floor = Cursor(EPOCH, (5, 1))  # ahead in partition 1 (idle), and in 0 up to 5
    clients = [client()[0] for _ in range(3)]
    for c in clients:
        hub.attach(c, floor)
    hub.dispatch([entry(p) for p in range(1, 6)])  # all at or below 5: skipped
    assert all(c.take()[0] == b"" for c in clients)
    hub.dispatch([entry(p) for p in range(6, 9)])
    chunks = [c.take()[0] for c in clients]
    assert chunks[0].count(b"id: ") == 3
    assert Cursor(EPOCH, (8, 1)).encode() in chunks[0]
    # One bytes object for every client of that cursor: built once, not per client.
    assert all(chunk is chunks[0] for chunk in chunks)


def test_an_ahead_client_is_released_when_the_hub_passes_it_in_every_partition() -> None:
    hub = Hub()
    hub.start(EPOCH, [0, 0])
    ahead, _ = client()
    hub.attach(ahead, Cursor(EPOCH, (0, 2)))
    plain, _ = client()
    hub.attach(plain)
    hub.dispatch([entry(p) for p in range(1, 4)])  # partition 0: still ahead in 1
    assert ahead.ahead == {1: 2}
    hub.dispatch([entry(p, partition=1) for p in range(1, 3)])
    assert ahead.ahead is None and ahead.floor is None
    ahead.take(), plain.take()
    hub.dispatch([entry(4)])
    assert ahead.take()[0] is plain.take()[0]  # the shared chunk again


def test_ahead_clients_that_come_and_go_leave_no_index_behind() -> None:
    hub = Hub()
    hub.start(EPOCH, [0, 0])
    for n in range(1000):
        c, _ = client()
        hub.attach(c, Cursor(EPOCH, (0, 1 + n)))
        hub.detach(c)
    assert not hub._ahead and not hub._ahead_at and not hub._ahead_heap


def test_a_reset_moving_the_hub_past_an_ahead_client_releases_it() -> None:
    hub = Hub()
    hub.start(EPOCH, [0])
    ahead, _ = client()
    hub.attach(ahead, Cursor(EPOCH, (5,)))
    hub.move(0, 50)  # the stream lost 1..50: the hub continues after it
    assert ahead.ahead is None


# --- 6. live lines out of order ------------------------------------------------------------------


def test_a_descending_live_line_is_a_bad_line_and_never_moves_the_hub_back() -> None:
    bad_inputs = BadInputs()
    reported = []
    bad_inputs.sink = reported.append

    def line(offset: int) -> bytes:
        return encode_live_line(offset, offset, b"A", 1, b"-", ENVELOPE)

    payload = encode_live_payload([line(5), line(3), line(6), line(4), line(7)])
    items = list(read_live_payload(payload, 0, "ch", bad_inputs))
    batches = [item for item in items if isinstance(item, list)]
    assert [[e.position for e in b] for b in batches] == [[6], [7, 8]]
    assert isinstance(items[1], Resync)
    assert len(reported) == 1 and reported[0].count == 2
    hub = Hub()
    hub.start(EPOCH, [5])
    for b in batches:
        hub.dispatch(b)
    assert hub.positions == [8]
