"""The newest entries this edge handed out, kept in memory for resumes and history.

Every entry the hub dispatches arrives in stream order with no gap (the subscription
repairs from the stream after each (re)subscription), so the ring holds *exactly* the
stream's entries in ``(floor, last]``. A position inside that range therefore has a
gap-free continuation without asking Redis, and a reconnect storm — thousands of clients
resuming from the same recent id — is served from memory instead of one ``XINFO`` and
one ``XRANGE`` per client.

The ring forgets everything when the subscription resets (the stream was lost) and is
empty until the first subscription; a position it does not cover falls back to Redis.
Entries removed from Redis with ``XDEL`` after they were delivered stay in the ring: a
resume replays what live clients already received.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

from shared.ids import StreamId

from .bus import Entry

Wants = Callable[[Entry], bool] | None


class ReplayRing:
    __slots__ = ("_entries", "_ids", "_start", "capacity", "floor", "generation")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        """Most entries held; 0 turns the ring off."""
        self.floor: StreamId | None = None
        """Every stream entry after ``floor`` (up to ``last``) is held; None: nothing is."""
        # Parallel lists with a moving start: appends and evictions are O(1) amortised and
        # the ids stay bisectable (a deque is O(n) to index in the middle).
        self._entries: list[Entry] = []
        self._ids: list[StreamId] = []
        self._start = 0
        self.generation = 0
        """Bumped by every reset: keys of anything derived from the ring (cached pages and
        bodies) include it, so nothing from before a reset is served after it."""

    def __len__(self) -> int:
        return len(self._ids) - self._start

    @property
    def last(self) -> StreamId | None:
        if len(self._ids) > self._start:
            return self._ids[-1]
        return self.floor

    def reset(self, floor: StreamId | None) -> None:
        """Forget every entry; the next ones continue the stream right after ``floor``."""
        self._entries = []
        self._ids = []
        self._start = 0
        self.floor = floor if self.capacity > 0 else None
        self.generation += 1

    def extend(self, entries: Sequence[Entry]) -> None:
        """Append dispatched entries (new, in stream order, continuing from ``last``)."""
        if self.floor is None or not entries:
            return
        self._entries.extend(entries)
        self._ids.extend([e.id for e in entries])
        excess = len(self._ids) - self._start - self.capacity
        if excess > 0:
            self._start += excess
            self.floor = self._ids[self._start - 1]
            if self._start >= self.capacity:
                del self._entries[: self._start]
                del self._ids[: self._start]
                self._start = 0

    def covers(self, position: StreamId) -> bool:
        """True when every entry after ``position`` (up to ``last``) is held."""
        floor = self.floor
        if floor is None or position < floor:
            return False
        last = self.last
        return last is not None and position <= last

    def after(
        self, position: StreamId, until: StreamId | None = None, limit: int | None = None
    ) -> list[Entry]:
        """Up to ``limit`` held entries with ``position < id (<= until)``, oldest first;
        only meaningful when ``covers(position)``."""
        lo = bisect_right(self._ids, position, self._start)
        hi = len(self._ids) if until is None else bisect_right(self._ids, until, lo)
        if limit is not None:
            hi = min(hi, lo + limit)
        return self._entries[lo:hi]

    def newest(self, n: int, wants: Wants, budget: int) -> list[Entry] | None:
        """The newest ``n`` entries ``wants`` accepts, oldest first, looking at no more than
        ``budget`` entries. None when the ring cannot tell: it holds fewer entries than
        that and Redis may have older ones."""
        held = len(self._ids) - self._start
        if wants is None:
            if held < n:
                return None
            return self._entries[len(self._entries) - n :]
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
        return picked
