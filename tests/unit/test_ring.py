"""The in-memory replay ring: what it covers, what it returns, and when it forgets."""

from __future__ import annotations

import random

import pytest

from edge.bus import Entry
from edge.hub import Hub
from edge.ring import ReplayRing
from shared.ids import ZERO, StreamId


def entry(ms: int, seq: int = 0, type_: bytes = b"A") -> Entry:
    sid = StreamId(ms, seq)
    return Entry.build(sid.encode(), type_, ms, b'{"n":%d}' % ms, sid)


def ids(entries: list[Entry]) -> list[int]:
    return [e.id.ms for e in entries]


def test_empty_ring_covers_nothing_until_started() -> None:
    ring = ReplayRing(10)
    assert not ring.covers(ZERO)
    assert ring.last is None
    ring.extend([entry(1)])  # before a start point nothing is trusted
    assert len(ring) == 0
    ring.reset(StreamId(5, 0))
    assert ring.covers(StreamId(5, 0))
    assert not ring.covers(StreamId(4, 0))
    assert not ring.covers(StreamId(6, 0))  # ahead of what it has seen


def test_covers_the_held_range_and_returns_what_follows_a_position() -> None:
    ring = ReplayRing(10)
    ring.reset(ZERO)
    ring.extend([entry(i) for i in range(1, 6)])
    assert ring.covers(ZERO) and ring.covers(StreamId(3, 0)) and ring.covers(StreamId(5, 0))
    assert not ring.covers(StreamId(5, 1))
    assert ids(ring.after(StreamId(2, 0))) == [3, 4, 5]
    # A position between two ids continues with the next one, as XRANGE's "(" would.
    assert ids(ring.after(StreamId(2, 7))) == [3, 4, 5]
    assert ids(ring.after(ZERO, until=StreamId(3, 0))) == [1, 2, 3]
    assert ids(ring.after(ZERO, limit=2)) == [1, 2]
    assert ring.after(StreamId(5, 0)) == []


def test_eviction_moves_the_floor_to_the_last_evicted_id() -> None:
    ring = ReplayRing(3)
    ring.reset(ZERO)
    ring.extend([entry(i) for i in range(1, 6)])
    assert len(ring) == 3
    assert ring.floor == StreamId(2, 0)
    assert not ring.covers(StreamId(1, 0))
    assert ring.covers(StreamId(2, 0))
    assert ids(ring.after(StreamId(2, 0))) == [3, 4, 5]


def test_reset_forgets_and_a_zero_capacity_ring_never_covers() -> None:
    ring = ReplayRing(5)
    ring.reset(ZERO)
    ring.extend([entry(i) for i in range(1, 4)])
    ring.reset(StreamId(100, 0))
    assert len(ring) == 0
    assert not ring.covers(StreamId(2, 0))
    assert ring.generation == 2  # one per reset: derived caches key on it
    off = ReplayRing(0)
    off.reset(ZERO)
    off.extend([entry(1)])
    assert not off.covers(ZERO) and len(off) == 0


def test_newest_without_a_filter_needs_n_held_entries() -> None:
    ring = ReplayRing(10)
    ring.reset(ZERO)
    ring.extend([entry(i) for i in range(1, 5)])
    assert ring.newest(5, None, 50) is None  # Redis may hold older ones
    got = ring.newest(3, None, 30)
    assert got is not None and ids(got) == [2, 3, 4]


def test_newest_with_a_filter_stops_at_its_budget_or_defers_to_redis() -> None:
    ring = ReplayRing(100)
    ring.reset(ZERO)
    ring.extend([entry(i, type_=b"B" if i % 10 == 0 else b"A") for i in range(1, 61)])

    def wants(e: Entry) -> bool:
        return e.type == b"B"

    got = ring.newest(2, wants, 20)
    assert got is not None and ids(got) == [50, 60]
    # Budget exhausted before n matches: a short answer, as the Redis scan gives.
    short = ring.newest(5, wants, 20)
    assert short is not None and ids(short) == [50, 60]
    # The ring runs out before the budget: only Redis can tell what is older.
    assert ring.newest(10, wants, 1000) is None


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_plain_list_model(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(1, 40)
    ring = ReplayRing(capacity)
    ring.reset(ZERO)
    model: list[Entry] = []
    ms = 0
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 9)):
            ms += rng.randint(1, 3)
            batch.append(entry(ms, rng.randint(0, 2)))
        ring.extend(batch)
        model.extend(batch)
        held = model[-capacity:]
        assert len(ring) == len(held)
        assert ring.last == held[-1].id
        floor = model[-capacity - 1].id if len(model) > capacity else ZERO
        assert ring.floor == floor
        probe = StreamId(rng.randint(0, ms + 2), rng.randint(0, 3))
        if ring.covers(probe):
            assert probe >= floor
            assert ring.after(probe) == [e for e in model if e.id > probe]
        else:
            assert probe < floor or probe > held[-1].id


def test_hub_feeds_the_ring_with_new_entries_only() -> None:
    hub = Hub(ring_capacity=10)
    hub.start_at(StreamId(2, 0))
    hub.dispatch([entry(1), entry(2), entry(3)])  # 1 and 2 are repeats of what came before
    hub.dispatch([entry(3), entry(4)])
    assert ids(hub.ring.after(StreamId(2, 0))) == [3, 4]
    assert hub.ring.covers(StreamId(2, 0)) and not hub.ring.covers(StreamId(1, 0))
    hub.start_at(StreamId(50, 0))  # the stream was lost: nothing before is vouched for
    assert not hub.ring.covers(StreamId(3, 0))
