"""edge.hub: one encode per event (its id the hub's cursor after it) and one join per batch
and filter group, per-partition duplicate drop, bounded per-client buffers, clients ahead of
the hub. Async tests: Client holds an asyncio.Event."""

from __future__ import annotations

import asyncio

import pytest

from edge.bus import Entry
from edge.hub import Client, Hub
from shared.cursor import Cursor

DEADLINE_S = 2.0
EPOCH = 3


def entry(position: int, type_: bytes = b"A", partition: int = 0, prev: int | None = None) -> Entry:
    """The event at offset ``position - 1`` (its pv the position before, by default)."""
    data = b'{"type":"%s","n":%d}' % (type_, position)
    before = position - 1 if prev is None else prev
    return Entry.build(partition, position - 1, before, type_, 1_000_000 + position, data)


def new_hub(partitions: int = 1, ring_bytes: int = 0) -> Hub:
    hub = Hub(ring_bytes=ring_bytes)
    hub.start(EPOCH, [0] * partitions)
    return hub


def frames(*entries: Entry, partitions: int = 1, start: int | list[int] = 0) -> bytes:
    """The frames the hub sends for ``entries`` dispatched from ``start`` (in every
    partition, or per partition) (ids: the hub's cursor after each event)."""
    positions: list[int | None] = list(start) if isinstance(start, list) else [start] * partitions
    out = []
    for e in entries:
        positions[e.partition] = e.position
        cursor = Cursor(EPOCH, tuple(positions)).encode()
        out.append(b"id: " + cursor + e.frame)
    return b"".join(out)


class Abort:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def client(types: set[bytes] | None = None, limit: int = 1 << 20) -> tuple[Client, Abort]:
    abort = Abort()
    return Client(None if types is None else frozenset(types), limit, abort), abort


def attached(hub: Hub, types: set[bytes] | None = None, limit: int = 1 << 20) -> Client:
    c, _ = client(types, limit)
    hub.attach(c)
    return c


async def test_unfiltered_clients_share_the_very_same_bytes() -> None:
    hub = new_hub()
    a, b = attached(hub), attached(hub)
    batch = [entry(1), entry(2, b"B"), entry(3)]

    assert hub.dispatch(batch) == 3

    data_a, _ = a.take()
    data_b, _ = b.take()
    assert data_a == frames(*batch)
    assert data_a is data_b


@pytest.mark.parametrize(
    ("types", "expected_ms"),
    [
        pytest.param(None, [1, 2, 3, 4, 5], id="unfiltered"),
        pytest.param({b"A"}, [1, 4], id="A"),
        pytest.param({b"B"}, [2, 5], id="B"),
        pytest.param({b"A", b"C"}, [1, 3, 4], id="A-and-C"),
        pytest.param({b"Z"}, [], id="no-match"),
    ],
)
async def test_filtered_groups_get_only_their_types_in_order(
    types: set[bytes] | None, expected_ms: list[int]
) -> None:
    hub = new_hub()
    first, second = attached(hub, types), attached(hub, types)
    by_ms = {1: b"A", 2: b"B", 3: b"C", 4: b"A", 5: b"B"}
    batch = [entry(ms, t) for ms, t in by_ms.items()]

    hub.dispatch(batch)

    data, ts = first.take()
    everything = frames(*batch).split(b"id: ")[1:]
    assert data == b"".join(b"id: " + everything[ms - 1] for ms in expected_ms)
    assert ts == (batch[expected_ms[0] - 1].ts_ms if expected_ms else 0)
    other, _ = second.take()
    if expected_ms:
        assert other is data  # one encode per filter group, not per client


async def test_a_group_without_matching_entries_gets_nothing() -> None:
    hub = new_hub()
    only_b = attached(hub, {b"B"})

    hub.dispatch([entry(1), entry(2)])

    assert only_b.buffered_bytes == 0
    assert only_b.take() == (b"", 0)


async def test_entries_at_or_below_the_partition_position_are_dropped() -> None:
    hub = new_hub()
    c = attached(hub)

    assert hub.dispatch([entry(1), entry(2), entry(3)]) == 3
    c.take()
    assert hub.dispatch([entry(2), entry(3), entry(4), entry(5)]) == 2
    assert c.take()[0] == frames(entry(4), entry(5), start=3)
    assert hub.dispatch([entry(5)]) == 0
    assert hub.dispatch([entry(3), entry(4)]) == 0
    assert c.buffered_bytes == 0
    assert hub.positions == [5]


async def test_partitions_are_deduplicated_each_on_its_own() -> None:
    hub = new_hub(partitions=2)
    c = attached(hub)
    hub.dispatch([entry(10, partition=0)])
    c.take()

    # Position 4 of partition 1 is new although partition 0 stands at 10.
    assert hub.dispatch([entry(4, partition=1)]) == 1
    assert hub.dispatch([entry(9, partition=0), entry(10, partition=0)]) == 0
    assert hub.positions == [10, 4]
    data, _ = c.take()
    assert Cursor(EPOCH, (10, 4)).encode() in data


async def test_each_frame_carries_the_hub_cursor_right_after_it() -> None:
    hub = new_hub(partitions=3)
    c = attached(hub)
    hub.dispatch([entry(5, partition=1), entry(6, partition=1)])
    hub.dispatch([entry(2, partition=0)])

    data, _ = c.take()
    ids = [line[4:] for line in data.split(b"\n") if line.startswith(b"id: ")]
    assert ids == [
        Cursor(EPOCH, (0, 5, 0)).encode(),
        Cursor(EPOCH, (0, 6, 0)).encode(),
        Cursor(EPOCH, (2, 6, 0)).encode(),
    ]
    assert hub.cursor() == Cursor(EPOCH, (2, 6, 0))


async def test_slow_client_is_closed_once_and_others_keep_receiving() -> None:
    hub = new_hub()
    one = frames(entry(1))
    slow, abort = client(limit=2 * len(one))  # room for exactly two frames
    hub.attach(slow)
    fast = attached(hub)

    hub.dispatch([entry(1)])
    hub.dispatch([entry(2)])
    assert not slow.closed
    assert slow.buffered_bytes == 2 * len(one)

    hub.dispatch([entry(3)])
    assert slow.close_reason == "slow"
    assert abort.calls == 1

    hub.dispatch([entry(4)])
    hub.dispatch([entry(5)])
    assert abort.calls == 1
    assert slow.close_reason == "slow"
    assert fast.take()[0] == frames(*(entry(ms) for ms in range(1, 6)))
    assert not fast.closed
    # The slow client's handler is woken to notice the close.
    await asyncio.wait_for(slow.wait(), DEADLINE_S)


async def test_take_coalesces_pushes_and_reports_the_oldest_timestamp() -> None:
    hub = new_hub()
    c = attached(hub)
    batches = [[entry(1)], [entry(2), entry(3)], [entry(4)]]
    for batch in batches:
        hub.dispatch(batch)
    expected = frames(*(e for batch in batches for e in batch))
    assert c.buffered_bytes == len(expected)

    data, ts = c.take()

    assert data == expected
    assert ts == entry(1).ts_ms
    assert c.buffered_bytes == 0
    assert c.take() == (b"", 0)
    hub.dispatch([entry(9)])
    assert c.take() == (frames(entry(9), start=4), entry(9).ts_ms)


async def test_push_wakes_a_waiting_handler() -> None:
    hub = new_hub()
    c = attached(hub)
    waiter = asyncio.create_task(c.wait())
    await asyncio.sleep(0)  # a scheduler yield, not a timed wait: the waiter now blocks
    assert not waiter.done()

    hub.dispatch([entry(1)])

    await asyncio.wait_for(waiter, DEADLINE_S)


def ids_of(data: bytes) -> list[Cursor]:
    from shared.cursor import decode_cursor

    return [decode_cursor(line[4:]) for line in data.split(b"\n") if line.startswith(b"id: ")]


async def test_a_client_ahead_skips_up_to_its_position_and_its_ids_never_go_back() -> None:
    hub = new_hub(partitions=2)
    hub.dispatch([entry(ms) for ms in range(1, 6)])
    plain = attached(hub)
    resumed, _ = client()
    mine = Cursor(EPOCH, (8, 0))

    assert hub.attach(resumed, mine) == Cursor(EPOCH, (5, 0))
    assert resumed.ahead == {0: 8}

    hub.dispatch([entry(6), entry(7)])
    assert resumed.buffered_bytes == 0
    assert plain.take()[0] == frames(entry(6), entry(7), start=[5, 0])

    hub.dispatch([entry(3, partition=1)])  # another partition: delivered, id merged
    data, _ = resumed.take()
    assert ids_of(data) == [Cursor(EPOCH, (8, 3))]
    plain.take()

    hub.dispatch([entry(8), entry(9)])
    data, ts = resumed.take()
    assert ids_of(data) == [Cursor(EPOCH, (9, 3))]
    assert ts == entry(9).ts_ms
    assert plain.take()[0] == frames(entry(8), entry(9), start=[7, 3])
    assert resumed.ahead is None

    hub.dispatch([entry(10)])
    # Caught up: back on the shared path, same bytes as everyone else.
    assert resumed.take()[0] is plain.take()[0]


async def test_a_client_ahead_applies_its_filter_too() -> None:
    hub = new_hub()
    resumed, _ = client({b"A"})
    hub.attach(resumed, Cursor(EPOCH, (8,)))

    hub.dispatch([entry(6), entry(7, b"B"), entry(8), entry(9), entry(10, b"B")])

    data, _ = resumed.take()
    assert ids_of(data) == [Cursor(EPOCH, (9,))]
    assert resumed.ahead is None


async def test_a_partition_the_hub_has_not_seen_counts_as_behind() -> None:
    hub = Hub()
    hub.start(EPOCH, [None, 4])
    resumed, _ = client()
    hub.attach(resumed, Cursor(EPOCH, (2, 1)))
    assert resumed.ahead == {0: 2}
    hub.dispatch([entry(1), entry(2), entry(3)])
    data, _ = resumed.take()
    assert ids_of(data) == [Cursor(EPOCH, (3, 4))]


@pytest.mark.parametrize(
    "mine",
    [pytest.param(Cursor(EPOCH, (3,)), id="older"), pytest.param(Cursor(EPOCH, (5,)), id="equal")],
)
async def test_a_cursor_not_ahead_of_the_hub_changes_nothing(mine: Cursor) -> None:
    hub = new_hub()
    hub.dispatch([entry(5)])
    c, _ = client()

    assert hub.attach(c, mine) == Cursor(EPOCH, (5,))
    assert c.ahead is None
    hub.dispatch([entry(6)])
    assert c.take()[0] == frames(entry(6), start=5)


async def test_broadcast_reaches_every_client_whatever_its_filter() -> None:
    hub = new_hub()
    clients = [attached(hub), attached(hub, {b"A"}), attached(hub, {b"B", b"C"})]
    ahead, _ = client({b"A"})
    hub.attach(ahead, Cursor(EPOCH, (100,)))

    hub.broadcast_control(lambda cursor: b"id: " + cursor.encode() + b"\nevent: reset\n\n")

    frame = b"id: " + Cursor(EPOCH, (0,)).encode() + b"\nevent: reset\n\n"
    for c in clients:
        assert c.take() == (frame, 0)
    # Its id merges the client's own cursor: never backwards.
    assert ahead.take() == (b"id: " + Cursor(EPOCH, (100,)).encode() + b"\nevent: reset\n\n", 0)


async def test_close_all_wakes_every_waiter() -> None:
    hub = new_hub()
    clients = [attached(hub), attached(hub, {b"A"})]
    waiters = [asyncio.create_task(c.wait()) for c in clients]
    await asyncio.sleep(0)  # a scheduler yield, not a timed wait: the waiters now block
    assert not any(w.done() for w in waiters)

    hub.close_all("shutdown")

    await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE_S)
    assert [c.close_reason for c in clients] == ["shutdown", "shutdown"]


async def test_a_closed_client_keeps_its_first_reason_and_gets_nothing_more() -> None:
    hub = new_hub()
    c = attached(hub)
    c.close("slow")

    hub.close_all("shutdown")
    hub.dispatch([entry(1)])
    hub.broadcast(b": ping\n\n")

    assert c.close_reason == "slow"
    assert c.buffered_bytes == 0


async def test_detach_stops_delivery() -> None:
    hub = new_hub()
    kept, gone = attached(hub), attached(hub, {b"A"})
    assert hub.client_count == 2

    hub.detach(gone)
    hub.detach(gone)  # idempotent
    hub.dispatch([entry(1)])

    assert hub.client_count == 1
    assert gone.buffered_bytes == 0
    assert kept.take()[0] == frames(entry(1))


async def test_a_started_hub_stands_where_it_was_started() -> None:
    hub = Hub()
    hub.start(EPOCH, [7, None])

    assert hub.client_count == 0
    assert hub.attach(client()[0]) == Cursor(EPOCH, (7, None))
    hub.grow(3)
    assert hub.cursor() == Cursor(EPOCH, (7, None, None))


async def test_empty_batch_is_zero_new_entries() -> None:
    hub = new_hub()
    c = attached(hub)

    assert hub.dispatch([]) == 0
    assert c.buffered_bytes == 0


async def test_one_oversized_batch_is_not_slow_but_a_backlog_is() -> None:
    hub = new_hub()
    big = [entry(i) for i in range(1, 50)]
    size = len(frames(*big))
    c, abort = client(limit=size // 4)
    hub.attach(c)
    hub.dispatch(big)
    assert not c.closed, "a client that has kept up may receive one batch above its limit"
    data, _ = c.take()
    assert len(data) == size
    hub.dispatch([entry(100)])
    hub.dispatch([entry(i) for i in range(101, 150)])
    assert c.close_reason == "slow", "a backlog above the limit is slow"
    assert abort.calls == 1


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False


async def test_idle_clients_get_the_framed_batch_written_directly_in_order() -> None:
    hub = new_hub()
    observed: list[int] = []
    hub.on_direct_write = observed.append
    c, _ = client()
    transport = FakeTransport()
    c.transport = transport  # type: ignore[assignment]
    hub.attach(c)
    batch = [entry(1), entry(2)]
    body = frames(*batch)

    hub.dispatch(batch)  # the handler is not idle yet: queued
    assert transport.written == [] and c.buffered_bytes == len(body)

    c.take()
    c.direct = True  # the handler now waits with an empty buffer
    hub.dispatch([entry(3)])
    chunk = frames(entry(3), start=2)
    assert transport.written == [b"%x\r\n" % len(chunk) + chunk + b"\r\n"]
    assert observed == [1_000_003]

    transport.buffered = 10  # the socket is backed up: back to the queue and the handler
    hub.dispatch([entry(4)])
    assert len(transport.written) == 1 and c.buffered_bytes == len(frames(entry(4), start=3))
    transport.buffered = 0
    hub.dispatch([entry(5)])  # still queued: what waits must go first
    assert len(transport.written) == 1
    data, _ = c.take()
    assert data == frames(entry(4), entry(5), start=3)
