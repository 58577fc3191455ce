"""edge.hub: one encode per batch and filter group, bounded per-client buffers, resume
hand-off from history to live. Async tests: Client holds an asyncio.Event."""

from __future__ import annotations

import asyncio

import pytest

from edge.bus import Entry
from edge.hub import Client, Hub
from shared.ids import ZERO, StreamId, parse_id_bytes

DEADLINE_S = 2.0


def entry(ms: int, type_: bytes = b"A", seq: int = 0) -> Entry:
    id_bytes = b"%d-%d" % (ms, seq)
    data = b'{"type":"%s","n":%d}' % (type_, ms)
    return Entry.build(id_bytes, type_, 1_000_000 + ms, data, parse_id_bytes(id_bytes))


def frames(*entries: Entry) -> bytes:
    return b"".join(e.frame for e in entries)


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
    hub = Hub()
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
    hub = Hub()
    first, second = attached(hub, types), attached(hub, types)
    by_ms = {1: b"A", 2: b"B", 3: b"C", 4: b"A", 5: b"B"}
    batch = [entry(ms, t) for ms, t in by_ms.items()]

    hub.dispatch(batch)

    data, ts = first.take()
    assert data == frames(*(e for e in batch if e.id.ms in expected_ms))
    assert ts == (batch[expected_ms[0] - 1].ts_ms if expected_ms else 0)
    other, _ = second.take()
    if expected_ms:
        assert other is data  # one encode per filter group, not per client


async def test_a_group_without_matching_entries_gets_nothing() -> None:
    hub = Hub()
    only_b = attached(hub, {b"B"})

    hub.dispatch([entry(1), entry(2)])

    assert only_b.buffered_bytes == 0
    assert only_b.take() == (b"", 0)


async def test_entries_at_or_below_last_id_are_dropped() -> None:
    hub = Hub()
    c = attached(hub)

    assert hub.dispatch([entry(1), entry(2), entry(3)]) == 3
    c.take()
    assert hub.dispatch([entry(2), entry(3), entry(4), entry(5)]) == 2
    assert c.take()[0] == frames(entry(4), entry(5))
    assert hub.dispatch([entry(5)]) == 0
    assert hub.dispatch([entry(3), entry(4)]) == 0
    assert c.buffered_bytes == 0
    assert hub.last_id == StreamId(5, 0)


async def test_seq_matters_in_repeat_detection() -> None:
    hub = Hub()
    c = attached(hub)
    hub.dispatch([entry(7, seq=0)])
    c.take()

    assert hub.dispatch([entry(7, seq=0), entry(7, seq=1)]) == 1
    assert c.take()[0] == entry(7, seq=1).frame


async def test_slow_client_is_closed_once_and_others_keep_receiving() -> None:
    hub = Hub()
    one = entry(1).frame
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
    hub = Hub()
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
    assert c.take() == (entry(9).frame, entry(9).ts_ms)


async def test_push_wakes_a_waiting_handler() -> None:
    hub = Hub()
    c = attached(hub)
    waiter = asyncio.create_task(c.wait())
    await asyncio.sleep(0)  # a scheduler yield, not a timed wait: the waiter now blocks
    assert not waiter.done()

    hub.dispatch([entry(1)])

    await asyncio.wait_for(waiter, DEADLINE_S)


async def test_resume_after_skips_live_entries_up_to_it_then_clears() -> None:
    hub = Hub()
    hub.dispatch([entry(ms) for ms in range(1, 6)])
    plain = attached(hub)
    resumed, _ = client()

    assert hub.attach(resumed, resume_after=StreamId(8, 0)) == StreamId(5, 0)
    assert resumed.min_id == StreamId(8, 0)

    hub.dispatch([entry(6), entry(7)])
    assert resumed.buffered_bytes == 0
    assert plain.take()[0] == frames(entry(6), entry(7))

    hub.dispatch([entry(8), entry(9)])
    assert resumed.take() == (entry(9).frame, entry(9).ts_ms)
    assert plain.take()[0] == frames(entry(8), entry(9))
    assert resumed.min_id is None

    hub.dispatch([entry(10)])
    # Caught up: back on the shared path, same bytes as everyone else.
    assert resumed.take()[0] is plain.take()[0]


async def test_resume_after_applies_with_a_filter_too() -> None:
    hub = Hub()
    resumed, _ = client({b"A"})
    hub.attach(resumed, resume_after=StreamId(8, 0))

    hub.dispatch([entry(6), entry(7, b"B"), entry(8), entry(9), entry(10, b"B")])

    assert resumed.take()[0] == entry(9).frame
    assert resumed.min_id is None


@pytest.mark.parametrize(
    "resume_after",
    [pytest.param(StreamId(3, 0), id="older"), pytest.param(StreamId(5, 0), id="equal")],
)
async def test_resume_after_not_ahead_of_the_hub_changes_nothing(resume_after: StreamId) -> None:
    hub = Hub()
    hub.dispatch([entry(5)])
    c, _ = client()

    assert hub.attach(c, resume_after=resume_after) == StreamId(5, 0)
    assert c.min_id is None
    hub.dispatch([entry(6)])
    assert c.take()[0] == entry(6).frame


async def test_broadcast_reaches_every_client_whatever_its_filter() -> None:
    hub = Hub()
    clients = [attached(hub), attached(hub, {b"A"}), attached(hub, {b"B", b"C"})]
    behind, _ = client({b"A"})
    hub.attach(behind, resume_after=StreamId(100, 0))
    frame = b'id: 9-0\nevent: reset\ndata: {"reason":"trimmed"}\n\n'

    hub.broadcast(frame)

    for c in [*clients, behind]:
        assert c.take() == (frame, 0)


async def test_close_all_wakes_every_waiter() -> None:
    hub = Hub()
    clients = [attached(hub), attached(hub, {b"A"})]
    waiters = [asyncio.create_task(c.wait()) for c in clients]
    await asyncio.sleep(0)  # a scheduler yield, not a timed wait: the waiters now block
    assert not any(w.done() for w in waiters)

    hub.close_all("shutdown")

    await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE_S)
    assert [c.close_reason for c in clients] == ["shutdown", "shutdown"]


async def test_a_closed_client_keeps_its_first_reason_and_gets_nothing_more() -> None:
    hub = Hub()
    c = attached(hub)
    c.close("slow")

    hub.close_all("shutdown")
    hub.dispatch([entry(1)])
    hub.broadcast(b": ping\n\n")

    assert c.close_reason == "slow"
    assert c.buffered_bytes == 0


async def test_detach_stops_delivery() -> None:
    hub = Hub()
    kept, gone = attached(hub), attached(hub, {b"A"})
    assert hub.client_count == 2

    hub.detach(gone)
    hub.detach(gone)  # idempotent
    hub.dispatch([entry(1)])

    assert hub.client_count == 1
    assert gone.buffered_bytes == 0
    assert kept.take()[0] == entry(1).frame


async def test_new_hub_starts_at_zero() -> None:
    hub = Hub()

    assert hub.last_id == ZERO
    assert hub.client_count == 0
    assert hub.attach(client()[0]) == ZERO


async def test_empty_batch_is_zero_new_entries() -> None:
    hub = Hub()
    c = attached(hub)

    assert hub.dispatch([]) == 0
    assert c.buffered_bytes == 0


async def test_one_oversized_batch_is_not_slow_but_a_backlog_is() -> None:
    hub = Hub()
    big = [entry(i) for i in range(1, 50)]
    size = len(b"".join(e.frame for e in big))
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
    hub = Hub()
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
    chunk = frames(entry(3))
    assert transport.written == [b"%x\r\n" % len(chunk) + chunk + b"\r\n"]
    assert observed == [1_000_003]

    transport.buffered = 10  # the socket is backed up: back to the queue and the handler
    hub.dispatch([entry(4)])
    assert len(transport.written) == 1 and c.buffered_bytes == len(frames(entry(4)))
    transport.buffered = 0
    hub.dispatch([entry(5)])  # still queued: what waits must go first
    assert len(transport.written) == 1
    data, _ = c.take()
    assert data == frames(entry(4), entry(5))
