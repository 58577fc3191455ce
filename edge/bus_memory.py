"""An in-memory Bus for fast unit tests of edge logic (not for production).

It mimics the Redis semantics the edge relies on: ids ``ms-seq`` that only grow, trimming
that records the largest deleted id, a genesis id per incarnation, and a live feed that
can be dropped (the subscription is lost) or wiped (Redis lost the data)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shared.events import NO_MATCH
from shared.ids import ZERO, StreamId

from .bus import (
    SUBSCRIBED,
    BadInputs,
    BusDisconnected,
    BusUnavailable,
    Entry,
    StreamInfo,
    _Resync,
    _Subscribed,
    read_live_payload,
    read_stream_rows,
)

STREAM = "memory:stream"
CHANNEL = "memory:live"

_DROP = object()


class MemoryBus:
    def __init__(self, maxlen: int = 10_000, start_ms: int = 1_700_000_000_000) -> None:
        self.maxlen = maxlen
        self._entries: list[Entry | tuple[StreamId, dict[bytes, bytes]]] = []
        """Entries, and raw field maps added with ``add_raw`` (foreign or malformed)."""
        self.bad_inputs = BadInputs()
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

    def publish_raw(self, payload: bytes) -> None:
        """Publish bytes on the live channel as they are (what a foreign or broken publisher
        could send); the feed parses them exactly as the Redis bus does."""
        for feed in self._feeds:
            feed.put_nowait(payload)

    def add_raw(self, fields: dict[bytes, bytes]) -> StreamId:
        """XADD arbitrary fields to the stream, without publishing (a foreign writer)."""
        self._seq += 1
        sid = StreamId(self._ms, self._seq)
        if not self._exists:
            self._exists = True
            self._genesis = sid
        self._entries.append((sid, dict(fields)))
        self._added += 1
        self._last = sid
        return sid

    def _read(self, rows: list[Entry | tuple[StreamId, dict[bytes, bytes]]]) -> list[Entry]:
        out: list[Entry] = []
        for row in rows:
            if isinstance(row, Entry):
                out.append(row)
            else:
                out += read_stream_rows([(row[0].encode(), row[1])], STREAM, self.bad_inputs)
        return out

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
            first_id=_id(self._entries[0]) if self._entries else None,
            last_id=self._last,
            max_deleted_id=self._max_deleted,
            entries_added=self._added,
            genesis=self._genesis,
        )

    async def read_after(
        self, after: StreamId, count: int, until: StreamId | None = None
    ) -> list[Entry]:
        self._check_reads()
        rows = self._read(
            [e for e in self._entries if _id(e) > after and (until is None or _id(e) <= until)]
        )
        return rows[:count]

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        self._check_reads()
        rows = self._read([e for e in reversed(self._entries) if before is None or _id(e) < before])
        return rows[:count]

    async def ping(self) -> bool:
        return self.healthy

    async def live(self) -> AsyncIterator[list[Entry] | _Subscribed | _Resync]:
        feed: asyncio.Queue[object] = asyncio.Queue()
        self._feeds.append(feed)
        try:
            yield SUBSCRIBED
            while True:
                item = await feed.get()
                if item is _DROP:
                    raise BusDisconnected("dropped by the test")
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, bytes):
                    for parsed in read_live_payload(item, CHANNEL, self.bad_inputs):
                        yield parsed
                    continue
                assert isinstance(item, list)
                yield item
        finally:
            self._feeds.remove(feed)

    def fail_live(self, exc: BaseException) -> None:
        """Make every live feed raise ``exc`` (an unforeseen failure, for supervision tests)."""
        for feed in self._feeds:
            feed.put_nowait(exc)


def _id(row: Entry | tuple[StreamId, dict[bytes, bytes]]) -> StreamId:
    return row.id if isinstance(row, Entry) else row[0]
