"""An in-memory Bus for fast unit tests of edge logic (not for production).

It mimics the Redis semantics the edge relies on: ids ``ms-seq`` that only grow, trimming
that records the largest deleted id, a genesis id per incarnation, and a live feed that
can be dropped (the subscription is lost) or wiped (Redis lost the data)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shared.events import NO_MATCH
from shared.ids import ZERO, StreamId

from .bus import SUBSCRIBED, BusDisconnected, BusUnavailable, Entry, StreamInfo, _Subscribed

_DROP = object()


class MemoryBus:
    def __init__(self, maxlen: int = 10_000, start_ms: int = 1_700_000_000_000) -> None:
        self.maxlen = maxlen
        self._entries: list[Entry] = []
        self._ms = start_ms
        self._seq = 0
        self._last = ZERO
        self._max_deleted = ZERO
        self._genesis: StreamId | None = None
        self._exists = False
        self._added = 0
        self._feeds: list[asyncio.Queue[object]] = []
        self.healthy = True
        self.reads_fail = False
        """When set, reads raise ``BusUnavailable`` (what a Redis outage looks like)."""

    def publish(
        self, events: list[tuple[bytes, int, bytes]], match: bytes = NO_MATCH
    ) -> list[Entry]:
        """Append ``(type, ts_ms, envelope)`` events (all with the same match token), trim,
        and publish them as one batch."""
        batch = []
        for type_, ts, data in events:
            self._seq += 1
            sid = StreamId(self._ms, self._seq)
            entry = Entry.build(sid.encode(), type_, ts, data, sid, match)
            if not self._exists:
                self._exists = True
                self._genesis = sid
            self._entries.append(entry)
            self._added += 1
            self._last = sid
            batch.append(entry)
        # Trimming, like Redis's, drops the oldest entries and leaves max-deleted alone.
        del self._entries[: max(0, len(self._entries) - self.maxlen)]
        for feed in self._feeds:
            feed.put_nowait(batch)
        return batch

    def drop_subscriptions(self) -> None:
        for feed in self._feeds:
            feed.put_nowait(_DROP)

    def wipe(self) -> None:
        """Lose everything, as a Redis restart without persistence would."""
        self._entries.clear()
        self._exists = False
        self._genesis = None
        self._max_deleted = ZERO
        self._last = ZERO
        self._added = 0
        self._ms += 1000

    def _check_reads(self) -> None:
        if self.reads_fail:
            raise BusUnavailable("reads are failing (test)")

    async def info(self) -> StreamInfo:
        self._check_reads()
        return StreamInfo(
            exists=self._exists,
            length=len(self._entries),
            first_id=self._entries[0].id if self._entries else None,
            last_id=self._last,
            max_deleted_id=self._max_deleted,
            entries_added=self._added,
            genesis=self._genesis,
        )

    async def read_after(
        self, after: StreamId, count: int, until: StreamId | None = None
    ) -> list[Entry]:
        self._check_reads()
        rows = [e for e in self._entries if e.id > after and (until is None or e.id <= until)]
        return rows[:count]

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        self._check_reads()
        rows = [e for e in reversed(self._entries) if before is None or e.id < before]
        return rows[:count]

    async def ping(self) -> bool:
        return self.healthy

    async def live(self) -> AsyncIterator[list[Entry] | _Subscribed]:
        feed: asyncio.Queue[object] = asyncio.Queue()
        self._feeds.append(feed)
        try:
            yield SUBSCRIBED
            while True:
                item = await feed.get()
                if item is _DROP:
                    raise BusDisconnected("dropped by the test")
                assert isinstance(item, list)
                yield item
        finally:
            self._feeds.remove(feed)
