"""An in-memory Bus for fast unit tests of edge logic (not for production).

It models what the edge relies on, Kafka included: per partition a Kafka log (offsets that
only grow, with records that are no events, like transaction markers), the ingest step that
copies it into a capped stream with ids ``<offset+1>-0`` and ``pv`` links, the state hash,
the meta hash, and one live channel per partition. The failure modes of Redis are methods:
trimming, a wipe (then the next ingest step refills the window from Kafka with the same
ids, as ingest does), a rollback to an older copy (then ingest re-applies what it lost), a
recreated topic (new epoch, offsets from 0), a dropped subscription, a silent publish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from shared.contract import Meta, PartitionState
from shared.events import NO_MATCH

from .bus import (
    TICK,
    BadInputs,
    BusDisconnected,
    BusUnavailable,
    Entry,
    LiveItem,
    Subscribed,
    read_live_payload,
    read_stream_rows,
)

STREAM = "memory:{p%d}:stream"
CHANNEL = "memory:{p%d}:live"

_DROP = object()

Event = tuple[bytes, int, bytes]
"""``(type, kafka ts ms, envelope)``."""


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record: an event, or something that takes an offset but is no event
    (a transaction marker, a dead letter)."""

    offset: int
    event: Event | None
    match: bytes = NO_MATCH


Row = Entry | tuple[int, dict[bytes, bytes]]
"""A stream entry, or raw fields at a position (written by a foreign or broken writer)."""


def _position(row: Row) -> int:
    return row.position if isinstance(row, Entry) else row[0]


class MemoryBus:
    def __init__(
        self,
        maxlen: int = 10_000,
        partitions: int = 1,
        epoch: int = 1,
        topic: str = "memory.events",
        tick_s: float = 0.05,
    ) -> None:
        self.maxlen = maxlen
        self.topic = topic
        self.epoch = epoch
        self.tick_s = tick_s
        self.kafka: list[list[Record]] = [[] for _ in range(partitions)]
        """Each partition's log; ``kafka[p][i].offset == kafka_start[p] + i``."""
        self.kafka_start: list[int] = [0] * partitions
        """Each log's start offset (Kafka retention moves it)."""
        self._produced: list[list[Record]] = [[] for _ in range(partitions)]
        """Every record ever produced, retention or not: what an older Redis copy was
        written from (see ``rollback``)."""
        self._next_offset: list[int] = [0] * partitions
        self.expect: list[int] = [-1] * partitions
        """What ingest believes Redis has applied per partition (its ``expect``)."""
        self._streams: list[list[Row]] = [[] for _ in range(partitions)]
        self._states: list[PartitionState | None] = [None] * partitions
        self._meta: Meta | None = Meta(topic, partitions, epoch)
        self.bad_inputs = BadInputs()
        self._feeds: list[asyncio.Queue[object]] = []
        self.healthy = True
        self.reads_fail = False
        """When set, reads raise ``BusUnavailable`` (what a Redis outage looks like)."""
        self.before_read: Callable[[int], None] | None = None
        """Called with the partition before every ``read_after`` (tests trim in between)."""
        self.refills = 0

    @property
    def partitions(self) -> int:
        return len(self.kafka)

    # --- the producer and ingest ------------------------------------------------------------

    def produce(
        self, events: list[Event], match: bytes = NO_MATCH, partition: int = 0
    ) -> list[Record]:
        """Append events to the partition's Kafka log (not yet applied to Redis)."""
        out = []
        for event in events:
            record = Record(self._next_offset[partition], event, match)
            self._next_offset[partition] += 1
            self.kafka[partition].append(record)
            self._produced[partition].append(record)
            out.append(record)
        return out

    def skip_offsets(self, count: int, partition: int = 0) -> None:
        """Records that take offsets but are no events (transaction markers, dead letters)."""
        for _ in range(count):
            record = Record(self._next_offset[partition], None)
            self.kafka[partition].append(record)
            self._produced[partition].append(record)
            self._next_offset[partition] += 1

    def publish(
        self,
        events: list[Event],
        match: bytes = NO_MATCH,
        partition: int = 0,
        live: bool = True,
    ) -> list[Entry]:
        """Produce events and run ingest's step for the partition: returns the entries
        written (the new events, and everything re-applied by a refill before them).
        ``live=False`` writes without publishing (a lost pub/sub message)."""
        self.produce(events, match, partition)
        return self.ingest(partition, live)

    def ingest(self, partition: int = 0, live: bool = True) -> list[Entry]:
        """Ingest's step for one partition, as ``apply_partition.lua`` and the worker do it:
        refill a lost partition from Kafka, re-apply what a rollback lost, apply the rest,
        trim, publish one message."""
        p = partition
        if self._meta is None:
            self._meta = Meta(self.topic, self.partitions, self.epoch)
        state = self._states[p]
        if state is None or state.applied < self.expect[p]:
            self.refills += 1
        if state is None:
            committed = self.expect[p] + 1
            start = self.kafka_start[p]
            if self.expect[p] >= 0:
                start = max(start, committed - self.maxlen)
            state = PartitionState(start - 1, start, start)
            self._streams[p] = []
        applied, last, base = state
        written: list[Entry] = []
        for record in self.kafka[p][max(0, applied + 1 - self.kafka_start[p]) :]:
            if record.offset <= applied:
                continue
            applied = record.offset
            if record.event is None:
                continue
            type_, ts, data = record.event
            entry = Entry.build(p, record.offset, last, type_, ts, data, record.match)
            self._streams[p].append(entry)
            last = entry.position
            written.append(entry)
        self._states[p] = PartitionState(applied, last, base)
        self.expect[p] = applied
        self.trim(p, self.maxlen)
        if written and live:
            for feed in self._feeds:
                feed.put_nowait((p, written))
        return written

    # --- failures ---------------------------------------------------------------------------

    def trim(self, partition: int, maxlen: int) -> None:
        """Drop the oldest entries beyond ``maxlen`` (Redis records nothing of it)."""
        stream = self._streams[partition]
        del stream[: max(0, len(stream) - maxlen)]

    def retain_kafka(self, partition: int, start: int) -> None:
        """Kafka retention: the partition's log now starts at ``start``."""
        drop = max(0, start - self.kafka_start[partition])
        del self.kafka[partition][:drop]
        self.kafka_start[partition] = max(self.kafka_start[partition], start)

    def wipe(self) -> None:
        """Lose everything in Redis, as FLUSHALL or a restart without persistence would."""
        for p in range(self.partitions):
            self._streams[p] = []
            self._states[p] = None
        self._meta = None

    def rollback(self, partition: int, applied: int) -> None:
        """Redis fails over to a copy that had applied only up to offset ``applied``."""
        state = self._states[partition]
        if state is None or applied >= state.applied:
            return
        self._streams[partition] = [
            r for r in self._streams[partition] if _position(r) <= applied + 1
        ]
        # The older copy's state as it was: its last event is the last one at or below
        # ``applied`` (the next write links to it, even if trimming removed its entry, and
        # even if Kafka's retention has dropped that record since: the copy was written
        # before, so this reads every record ever produced, not the retained log).
        events = [
            r.offset + 1
            for r in self._produced[partition]
            if r.event is not None and r.offset <= applied and r.offset + 1 > state.base
        ]
        last = max([state.base, *events])
        self._states[partition] = PartitionState(applied, last, state.base)

    def recreate_topic(self, epoch: int) -> None:
        """The topic was deleted and created again: offsets restart at 0, a new epoch, and
        ingest deletes the old incarnation's keys."""
        self.epoch = epoch
        n = self.partitions
        self.kafka = [[] for _ in range(n)]
        self._produced = [[] for _ in range(n)]
        self.kafka_start = [0] * n
        self._next_offset = [0] * n
        self.expect = [-1] * n
        self._streams = [[] for _ in range(n)]
        self._states = [None] * n
        self._meta = Meta(self.topic, n, epoch)

    def add_partitions(self, count: int) -> None:
        for _ in range(count):
            self.kafka.append([])
            self._produced.append([])
            self.kafka_start.append(0)
            self._next_offset.append(0)
            self.expect.append(-1)
            self._streams.append([])
            self._states.append(None)
        self._meta = Meta(self.topic, self.partitions, self.epoch)

    def publish_raw(self, payload: bytes, partition: int = 0) -> None:
        """Publish bytes on a live channel as they are (what a foreign or broken publisher
        could send); the feed parses them exactly as the Redis bus does."""
        for feed in self._feeds:
            feed.put_nowait((partition, payload))

    def add_raw(self, fields: dict[bytes, bytes], partition: int = 0) -> int:
        """XADD arbitrary fields at the next offset's id, without publishing (a foreign
        writer); the offset is spent as a non-event record. Returns the entry's position."""
        offset = self._next_offset[partition]
        self.skip_offsets(1, partition)
        state = self._states[partition]
        if state is not None:
            self._states[partition] = state._replace(applied=offset)
            self.expect[partition] = offset
        self._streams[partition].append((offset + 1, dict(fields)))
        return offset + 1

    def drop_subscriptions(self) -> None:
        for feed in self._feeds:
            feed.put_nowait(_DROP)

    def fail_live(self, exc: BaseException) -> None:
        """Make every live feed raise ``exc`` (an unforeseen failure, for supervision tests)."""
        for feed in self._feeds:
            feed.put_nowait(exc)

    # --- what the edge reads ----------------------------------------------------------------

    def entries(self, partition: int = 0) -> list[Entry]:
        """The partition's well-formed stream entries (for assertions)."""
        return [r for r in self._streams[partition] if isinstance(r, Entry)]

    def _read(self, partition: int, rows: list[Row]) -> list[Entry]:
        out: list[Entry] = []
        for row in rows:
            if isinstance(row, Entry):
                out.append(row)
            else:
                out += read_stream_rows(
                    [(b"%d-0" % row[0], row[1])],
                    partition,
                    STREAM % partition,
                    self.bad_inputs,
                )
        return out

    def _check_reads(self) -> None:
        if self.reads_fail:
            raise BusUnavailable("reads are failing (test)")

    async def meta(self) -> Meta | None:
        self._check_reads()
        return self._meta

    async def state(self, partition: int) -> PartitionState | None:
        self._check_reads()
        if partition >= self.partitions:
            return None
        return self._states[partition]

    async def read_after(
        self, partition: int, position: int, count: int, until: int | None = None
    ) -> list[Entry]:
        if self.before_read is not None:
            self.before_read(partition)
        self._check_reads()
        if partition >= self.partitions:
            return []
        rows = [
            r
            for r in self._streams[partition]
            if _position(r) > position and (until is None or _position(r) <= until)
        ]
        return self._read(partition, rows)[:count]

    async def read_before(self, partition: int, before: int | None, count: int) -> list[Entry]:
        self._check_reads()
        if partition >= self.partitions:
            return []
        rows = [
            r for r in reversed(self._streams[partition]) if before is None or _position(r) < before
        ]
        return self._read(partition, rows)[:count]

    async def ping(self) -> bool:
        return self.healthy

    async def live(self, partitions: int) -> AsyncGenerator[LiveItem, None]:
        feed: asyncio.Queue[object] = asyncio.Queue()
        self._feeds.append(feed)
        try:
            for p in range(partitions):
                yield Subscribed(p)
            while True:
                try:
                    item = await asyncio.wait_for(feed.get(), self.tick_s)
                except TimeoutError:
                    yield TICK
                    continue
                if item is _DROP:
                    raise BusDisconnected("dropped by the test")
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, tuple)
                p, payload = item
                if p >= partitions:
                    continue  # not subscribed to that channel
                if isinstance(payload, bytes):
                    for parsed in read_live_payload(payload, p, CHANNEL % p, self.bad_inputs):
                        yield parsed
                    continue
                yield list(payload)
        finally:
            self._feeds.remove(feed)
