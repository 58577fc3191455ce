"""The newest entries this edge handed out, per partition, kept in memory for resumes and
history.

Every entry the hub dispatches for a partition arrives in order with no gap (the
subscription repairs each partition from its stream after every (re)subscription and every
break in the ``pv`` chain), so a partition's ring holds *exactly* that partition's entries in
``(floor, last]``: a position inside that range has a gap-free continuation without asking
Redis, even if Redis has trimmed, lost or rolled back since. A reconnect storm is then served
from memory.

The rings share one budget in bytes (clients' event sizes vary, so a count of entries bounds
nothing), split evenly over the partitions. A partition's ring forgets everything when the
hub resets that partition, and is empty until the hub starts it; a position it does not
cover falls back to Redis, where every page is checked again (``pv``)."""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections.abc import Callable, Sequence

from .bus import Entry

Wants = Callable[[Entry], bool] | None

_BYTES_HEADER = sys.getsizeof(b"")
_EVICTED = Entry(-1, -1, 0, 0, b"", 0, b"", b"")
"""Stands in the lists' evicted slots (before ``_start``) until they are compacted away."""
ENTRY_OVERHEAD_BYTES = 300
"""The Entry object (9 slots), its ints, its match set and the ring's list slots."""


def entry_bytes(entry: Entry) -> int:
    """What holding ``entry`` costs, approximately (its data and frame are separate)."""
    return len(entry.data) + len(entry.frame) + 2 * _BYTES_HEADER + ENTRY_OVERHEAD_BYTES


class PartitionRing:
    __slots__ = (
        "_entries",
        "_positions",
        "_sizes",
        "_start",
        "budget_bytes",
        "floor",
        "from_oldest",
        "generation",
        "held_bytes",
    )

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        """Most bytes held (``entry_bytes``); 0 turns the ring off."""
        self.floor: int | None = None
        """Every entry with ``floor < position <= last`` is held; None: nothing is."""
        self.from_oldest = False
        """True while the ring also holds the partition's oldest entry it started from (it
        began with the first entries read from the partition's oldest and evicted nothing):
        a cursor without a position in this partition, which asks for the oldest retained
        entries, is then served from memory."""
        # Parallel lists with a moving start: appends and evictions are O(1) amortised and
        # the positions stay bisectable (a deque is O(n) to index in the middle).
        self._entries: list[Entry] = []
        self._positions: list[int] = []
        self._sizes: list[int] = []
        self._start = 0
        self.held_bytes = 0
        self.generation = 0
        """Bumped by every reset: keys of anything derived from the ring (cached pages and
        bodies) include it, so nothing from before a reset is served after it."""

    def __len__(self) -> int:
        return len(self._positions) - self._start

    @property
    def last(self) -> int | None:
        if len(self._positions) > self._start:
            return self._positions[-1]
        return self.floor

    def reset(self, floor: int | None, from_oldest: bool = False) -> None:
        """Forget every entry; the next ones continue the partition right after ``floor``
        (``from_oldest``: they are its oldest retained entries)."""
        self._entries = []
        self._positions = []
        self._sizes = []
        self._start = 0
        self.held_bytes = 0
        self.floor = floor if self.budget_bytes > 0 else None
        self.from_oldest = from_oldest and self.floor is not None
        self.generation += 1

    def extend(self, entries: Sequence[Entry]) -> None:
        """Append dispatched entries (new, in order, continuing from ``last``)."""
        if self.floor is None or not entries:
            return
        sizes = [entry_bytes(e) for e in entries]
        self._entries.extend(entries)
        self._positions.extend([e.position for e in entries])
        self._sizes.extend(sizes)
        self.held_bytes += sum(sizes)
        self._evict()

    def resize(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        if budget_bytes <= 0:
            self.reset(None)
        else:
            self._evict()

    def _evict(self) -> None:
        if self.held_bytes <= self.budget_bytes:
            return
        start = self._start
        end = len(self._positions)
        entries = self._entries
        while self.held_bytes > self.budget_bytes and start < end:
            self.held_bytes -= self._sizes[start]
            # Let the evicted entry go now, not at the next compaction: until then the
            # list still referenced it, and the ring held up to twice its budget (issue 18).
            entries[start] = _EVICTED
            start += 1
        self.floor = self._positions[start - 1]
        self.from_oldest = False
        self._start = start
        if start > 1024 and start * 2 >= end:
            del self._entries[:start]
            del self._positions[:start]
            del self._sizes[:start]
            self._start = 0

    def covers(self, position: int) -> bool:
        """True when every entry after ``position`` (up to ``last``) is held."""
        floor = self.floor
        if floor is None or position < floor:
            return False
        last = self.last
        return last is not None and position <= last

    def after(
        self, position: int, until: int | None = None, limit: int | None = None
    ) -> list[Entry]:
        """Up to ``limit`` held entries with ``position < entry.position (<= until)``, oldest
        first; only meaningful when ``covers(position)``."""
        lo = bisect_right(self._positions, position, self._start)
        hi = len(self._positions) if until is None else bisect_right(self._positions, until, lo)
        if limit is not None:
            hi = min(hi, lo + limit)
        return self._entries[lo:hi]

    def newest(self, n: int, wants: Wants, budget: int) -> tuple[list[Entry], int] | None:
        """The newest ``n`` entries ``wants`` accepts, oldest first, looking at no more than
        ``budget`` entries, and how many it looked at. None when the ring cannot tell: it
        holds fewer entries than that and Redis may have older ones."""
        held = len(self._positions) - self._start
        if wants is None:
            if held < n:
                return None
            return self._entries[len(self._entries) - n :], n
        picked: list[Entry] = []
        scanned = 0
        for i in range(len(self._entries) - 1, self._start - 1, -1):
            entry = self._entries[i]
            scanned += 1
            if wants(entry):
                picked.append(entry)
                if len(picked) == n:
                    break
            if scanned >= budget:
                break
        if len(picked) < n and scanned < budget:
            return None
        picked.reverse()
        return picked, scanned


class ReplayRing:
    """One ``PartitionRing`` per partition under one byte budget."""

    __slots__ = ("_rings", "budget_bytes", "version")

    def __init__(self, budget_bytes: int, partitions: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self._rings: list[PartitionRing] = []
        self.version = 0
        """Bumped by every change to any partition's ring (extend, reset, resize): one int
        that keys what is derived from the whole ring (history bodies), instead of a tuple of
        every partition's head and generation built per request."""
        self.resize(partitions)

    def __len__(self) -> int:
        return sum(len(r) for r in self._rings)

    @property
    def partitions(self) -> int:
        return len(self._rings)

    @property
    def held_bytes(self) -> int:
        return sum(r.held_bytes for r in self._rings)

    def _share(self, partitions: int) -> int:
        return self.budget_bytes // partitions if partitions else 0

    def resize(self, partitions: int) -> None:
        """Grow to ``partitions`` rings (a topic never loses partitions), splitting the
        budget again."""
        self.version += 1
        share = self._share(max(partitions, len(self._rings)))
        for ring in self._rings:
            ring.resize(share)
        while len(self._rings) < partitions:
            self._rings.append(PartitionRing(share))

    def __getitem__(self, partition: int) -> PartitionRing:
        return self._rings[partition]

    def covers(self, partition: int, position: int) -> bool:
        return partition < len(self._rings) and self._rings[partition].covers(position)

    def reset(self, partition: int, floor: int | None, from_oldest: bool = False) -> None:
        self.version += 1
        self._rings[partition].reset(floor, from_oldest)

    def reset_all(self, floors: Sequence[int | None]) -> None:
        self.version += 1
        for ring, floor in zip(self._rings, floors, strict=False):
            ring.reset(floor)

    def extend(self, partition: int, entries: Sequence[Entry]) -> None:
        self.version += 1
        self._rings[partition].extend(entries)
