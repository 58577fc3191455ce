"""The in-memory replay ring, per partition and bounded in bytes: what it covers, what it
returns, and when it forgets."""

from __future__ import annotations

import random
import sys

import pytest

from edge import ring as ring_module
from edge.bus import Entry
from edge.hub import Hub
from edge.ring import PartitionRing, ReplayRing, entry_bytes


def entry(position: int, type_: bytes = b"A", partition: int = 0, pad: int = 0) -> Entry:
    data = b'{"n":%d,"p":"%s"}' % (position, b"x" * pad)
    return Entry.build(partition, position - 1, position - 1, type_, position, data)


SIZE = entry_bytes(entry(1))
"""What one small entry costs (positions below 10 all cost the same)."""


def positions(entries: list[Entry]) -> list[int]:
    return [e.position for e in entries]


def ring_of(events: int) -> PartitionRing:
    """A ring with room for ``events`` small entries."""
    return PartitionRing(events * SIZE)


def test_empty_ring_covers_nothing_until_started() -> None:
    ring = ring_of(10)
    assert not ring.covers(0)
    assert ring.last is None
    ring.extend([entry(1)])  # before a start point nothing is trusted
    assert len(ring) == 0
    ring.reset(5)
    assert ring.covers(5)
    assert not ring.covers(4)
    assert not ring.covers(6)  # ahead of what it has seen


def test_covers_the_held_range_and_returns_what_follows_a_position() -> None:
    ring = ring_of(10)
    ring.reset(0)
    ring.extend([entry(i) for i in range(1, 6)])
    assert ring.covers(0) and ring.covers(3) and ring.covers(5)
    assert not ring.covers(6)
    assert positions(ring.after(2)) == [3, 4, 5]
    assert positions(ring.after(0, until=3)) == [1, 2, 3]
    assert positions(ring.after(0, limit=2)) == [1, 2]
    assert ring.after(5) == []


def test_offsets_that_are_no_events_are_covered_too() -> None:
    """Positions between two entries (transaction markers) are inside the covered range."""
    ring = ring_of(10)
    ring.reset(0)
    ring.extend([entry(2), entry(7)])
    assert ring.covers(4)
    assert positions(ring.after(4)) == [7]


def test_eviction_by_bytes_moves_the_floor_to_the_last_evicted_position() -> None:
    ring = ring_of(3)
    ring.reset(0)
    ring.extend([entry(i) for i in range(1, 6)])
    assert len(ring) == 3
    assert ring.held_bytes == 3 * SIZE
    assert ring.floor == 2
    assert not ring.covers(1)
    assert ring.covers(2)
    assert positions(ring.after(2)) == [3, 4, 5]


def test_large_entries_take_more_room() -> None:
    ring = ring_of(10)
    ring.reset(0)
    big = entry(1, pad=3 * SIZE)  # costs about seven small ones (data and frame)
    ring.extend([big, entry(2), entry(3)])
    assert positions(ring.after(0)) == [1, 2, 3]
    ring.extend([entry(4), entry(5)])
    # The big one went, and with it the room for several small ones.
    assert ring.floor == 1
    assert positions(ring.after(1)) == [2, 3, 4, 5]


def test_an_entry_larger_than_the_budget_leaves_the_ring_empty_but_exact() -> None:
    ring = ring_of(2)
    ring.reset(0)
    ring.extend([entry(1), entry(2, pad=10 * SIZE)])
    assert len(ring) == 0
    assert ring.floor == 2 and ring.covers(2) and not ring.covers(1)


def test_reset_forgets_and_a_zero_budget_ring_never_covers() -> None:
    ring = ring_of(5)
    ring.reset(0)
    ring.extend([entry(i) for i in range(1, 4)])
    ring.reset(100)
    assert len(ring) == 0
    assert not ring.covers(2)
    assert ring.generation == 2  # one per reset: derived caches key on it
    off = PartitionRing(0)
    off.reset(0)
    off.extend([entry(1)])
    assert not off.covers(0) and len(off) == 0


def test_newest_without_a_filter_needs_n_held_entries() -> None:
    ring = ring_of(10)
    ring.reset(0)
    ring.extend([entry(i) for i in range(1, 5)])
    assert ring.newest(5, None, 50) is None  # Redis may hold older ones
    got = ring.newest(3, None, 30)
    assert got is not None and positions(got[0]) == [2, 3, 4]


def test_newest_with_a_filter_stops_at_its_budget_or_defers_to_redis() -> None:
    ring = ring_of(100)
    ring.reset(0)
    ring.extend([entry(i, type_=b"B" if i % 10 == 0 else b"A") for i in range(1, 61)])

    def wants(e: Entry) -> bool:
        return e.type == b"B"

    got = ring.newest(2, wants, 20)
    assert got is not None and positions(got[0]) == [50, 60]
    # Budget exhausted before n matches: a short answer, as the Redis scan gives.
    short = ring.newest(5, wants, 20)
    assert short is not None and positions(short[0]) == [50, 60]
    # The ring runs out before the budget: only Redis can tell what is older.
    assert ring.newest(10, wants, 1000) is None


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_plain_list_model(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(1, 40)
    ring = ring_of(capacity)
    ring.reset(0)
    model: list[Entry] = []
    position = 0
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 9)):
            position += rng.randint(1, 3)  # offsets are not contiguous
            batch.append(entry(position))
        ring.extend(batch)
        model.extend(batch)
        held_bytes = 0
        held: list[Entry] = []
        for e in reversed(model):
            if held_bytes + entry_bytes(e) > capacity * SIZE:
                break
            held_bytes += entry_bytes(e)
            held.insert(0, e)
        assert positions(ring.after(ring.floor or 0)) == positions(held)
        assert ring.last == model[-1].position
        floor = model[-len(held) - 1].position if len(held) < len(model) else 0
        assert ring.floor == floor
        probe = rng.randint(0, position + 2)
        if ring.covers(probe):
            assert probe >= floor
            assert ring.after(probe) == [e for e in model if e.position > probe]
        else:
            assert probe < floor or probe > model[-1].position


def test_the_budget_is_split_over_the_partitions() -> None:
    rings = ReplayRing(12 * SIZE, partitions=3)
    assert [rings[p].budget_bytes for p in range(3)] == [4 * SIZE] * 3
    rings.resize(4)
    assert [rings[p].budget_bytes for p in range(4)] == [3 * SIZE] * 4
    for p in range(4):
        rings.reset(p, 0)
        rings.extend(p, [entry(i, partition=p) for i in range(1, 10)])
    assert len(rings) == 12
    assert rings.held_bytes == 12 * SIZE
    assert rings.covers(2, 6) and not rings.covers(2, 5)


def test_every_change_to_any_partition_moves_the_version() -> None:
    """History bodies are cached under the ring's version: a reset that leaves a partition
    at the same last position, or a resize, must still change it."""
    rings = ReplayRing(12 * SIZE, partitions=2)
    seen = {rings.version}

    def changed() -> bool:
        new = rings.version not in seen
        seen.add(rings.version)
        return new

    rings.reset(0, 0)
    assert changed()
    rings.extend(1, [])  # nothing held yet: no entry, but still no stale body risk
    changed()
    rings.extend(0, [entry(1), entry(2)])
    assert changed()
    last = rings[0].last
    rings.reset(0, last)  # same last position, nothing held any more
    assert rings[0].last == last and changed()
    rings.reset_all([5, 5])
    assert changed()
    rings.resize(3)
    assert changed()
    assert rings.version == max(seen)


def test_hub_feeds_each_partition_ring_with_new_entries_only() -> None:
    hub = Hub(ring_bytes=20 * SIZE)
    hub.start(1, [2, 0])
    hub.dispatch([entry(1), entry(2), entry(3)])  # 1 and 2 are repeats of what came before
    hub.dispatch([entry(3), entry(4)])
    hub.dispatch([entry(1, partition=1)])
    assert positions(hub.ring[0].after(2)) == [3, 4]
    assert positions(hub.ring[1].after(0)) == [1]
    assert hub.ring.covers(0, 2) and not hub.ring.covers(0, 1)
    hub.move(0, 50)  # partition 0 lost what lay before 50: nothing before is vouched for
    assert not hub.ring.covers(0, 3)
    assert hub.ring.covers(1, 0)


def test_a_partition_started_without_position_is_covered_from_its_first_entry() -> None:
    hub = Hub(ring_bytes=20 * SIZE)
    hub.start(1, [None])
    assert not hub.ring.covers(0, 0)
    hub.dispatch([Entry.build(0, 9, 7, b"A", 1, b"{}"), Entry.build(0, 10, 10, b"A", 1, b"{}")])
    assert hub.ring.covers(0, 7) and not hub.ring.covers(0, 6)


def test_evicted_entries_are_let_go_at_once_not_at_the_next_compaction() -> None:
    """The ring held up to twice its budget: evicted entries stayed in its lists until half
    of them were evicted (issue 18's soak: 49,000 Entry objects alive for 30,000 held)."""
    ring = ring_of(3000)
    ring.reset(0)
    made = [entry(p) for p in range(1, 6001)]
    for start in range(0, 6000, 100):
        ring.extend(made[start : start + 100])
        held = {id(e) for e in ring.after(ring.floor or 0)}
        # Every entry the ring's lists still reference is one it holds.
        referenced = {id(e) for e in ring._entries if e is not ring_module._EVICTED}
        assert referenced == held
        assert len(held) == len(ring) <= 3000
    kept = positions(ring.after(ring.floor or 0))
    assert kept == list(range(kept[0], 6001)) and len(kept) > 2500
    # The ring's list refers to each held entry once more than to an evicted one (the
    # other references are this test's: its lists, the loop variable, the argument).
    evicted, held_now = made[: kept[0] - 1], made[kept[0] - 1 :]
    (baseline,) = {sys.getrefcount(e) for e in evicted}
    assert {sys.getrefcount(e) for e in held_now} == {baseline + 1}
