"""The edge's port to the event bus: a small Protocol with a Redis implementation
(``bus_redis``) for production and an in-memory one (``bus_memory``) for unit tests.

Everything is per Kafka partition: each partition has its own capped stream (entry id
``<offset+1>-0``), state hash and live channel (``shared/contract.py``). A position is
Kafka's "next offset": the record at offset o moves a reader to position o+1."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from shared.contract import (
    ContractError,
    Meta,
    PartitionState,
    parse_event_fields,
    parse_live_line,
    position_of,
    split_live_payload,
)
from shared.events import NO_MATCH, parse_match

log = logging.getLogger(__name__)

__all__ = [
    "BAD_ENTRY",
    "BAD_INPUT_REASONS",
    "BAD_LIVE_LINE",
    "MAX_BAD_LINES_CHECKED",
    "TICK",
    "BadInput",
    "BadInputs",
    "Bus",
    "BusDisconnected",
    "BusMoved",
    "BusUnavailable",
    "Entry",
    "LiveItem",
    "Meta",
    "PartitionState",
    "Resync",
    "Subscribed",
    "data_part",
]


def data_part(data: bytes) -> bytes:
    """The SSE frame of an event after its ``id:`` line, built once per event: the id (a
    cursor) is prepended when the event is dispatched."""
    return b"\ndata: " + data + b"\n\n"


@dataclass(frozen=True, slots=True)
class Entry:
    """One event as the edge handles it."""

    partition: int
    offset: int
    position: int
    """``offset + 1``: where a reader stands after this event."""
    prev: int
    """Position right after the previous event entry of this partition's stream (``pv``):
    a reader at c whose next entry has ``prev <= c`` has missed nothing."""
    type: bytes
    ts_ms: int
    """Kafka record timestamp, for the delivery-latency histogram and the history merge."""
    data: bytes
    frame: bytes
    """``\\ndata: <data>\\n\\n``: the frame without its ``id:`` line (see ``data_part``)."""
    match: frozenset[tuple[str, str]] = frozenset()
    """The event's match fields (see ``shared.events.match_token``)."""

    @classmethod
    def build(
        cls,
        partition: int,
        offset: int,
        prev: int,
        type_: bytes,
        ts_ms: int,
        data: bytes,
        match: bytes = NO_MATCH,
    ) -> Entry:
        return cls(
            partition,
            offset,
            offset + 1,
            prev,
            type_,
            ts_ms,
            data,
            data_part(data),
            parse_match(match),
        )

    def full_frame(self, cursor: bytes) -> bytes:
        return b"id: " + cursor + self.frame


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Yielded by ``Bus.live`` each time a partition's channel is (re)subscribed: anything
    published before was missed, so the caller repairs that partition from its stream."""

    partition: int


@dataclass(frozen=True, slots=True)
class Resync:
    """Yielded by ``Bus.live`` after a malformed live line of ``partition``: the line may
    have stood for a real event, so the caller reads that stream (the truth)."""

    partition: int


class _Tick:
    """Yielded by ``Bus.live`` when nothing arrived for a ping interval, so that the caller
    can do periodic work (polling the meta hash) on a quiet bus too."""

    def __repr__(self) -> str:
        return "TICK"


TICK: Final = _Tick()

LiveItem = list[Entry] | Subscribed | Resync | _Tick
"""What ``Bus.live`` yields: a non-empty batch of one partition's entries, in order, or a
marker."""

BAD_LIVE_LINE: Final = "bad_live_line"
"""A line on a live channel that does not follow the contract (``shared/contract.py``)."""
BAD_ENTRY: Final = "bad_entry"
"""A stream entry whose fields do not follow the contract."""
BAD_INPUT_REASONS: Final = (BAD_LIVE_LINE, BAD_ENTRY)
EXCERPT_BYTES = 120
"""How much of a bad input a log line quotes: enough to recognise it, bounded."""


MAX_BAD_LINES_CHECKED: Final = 16
"""Bad lines of one live message checked one by one; the lines after that many are skipped
unchecked (and counted as bad), so a huge malformed message costs bounded work. Nothing real
is lost: a bad line makes the subscription read the stream (which holds every event a
message carries) before anything later."""


@dataclass(frozen=True, slots=True)
class BadInput:
    """Something the edge read from Redis and skipped: the first bad line (or entry) of
    what was read at once, and how many were skipped with it."""

    reason: str
    """One of ``BAD_INPUT_REASONS``."""
    where: str
    """What identifies it: ``channel <name> line <n>`` or ``stream <key> id <id>``."""
    detail: str
    excerpt: str
    count: int = 1
    """How many inputs this report stands for (the metric is incremented by it)."""

    @classmethod
    def of(cls, reason: str, where: str, detail: str, raw: bytes, count: int = 1) -> BadInput:
        cut = raw[:EXCERPT_BYTES]
        excerpt = repr(cut)[2:-1] + ("..." if len(raw) > EXCERPT_BYTES else "")
        return cls(reason, where, detail, excerpt, count)


def log_bad_input(bad: BadInput) -> None:
    log.warning(
        "skipped malformed input from redis",
        extra={
            "reason": bad.reason,
            "where": bad.where,
            "detail": bad.detail,
            "excerpt": bad.excerpt,
            "count": bad.count,
        },
    )


class BadInputs:
    """Reports each bad input once: logged and handed to ``sink`` (the edge counts it,
    ``BadInput.count`` at a time).

    A bad stream entry is read again by every history query and repair that covers it; it
    is reported the first time only (the ids of the last ``remember`` are kept)."""

    def __init__(self, remember: int = 1024) -> None:
        self.sink: Callable[[BadInput], None] = lambda _bad: None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def report(self, bad: BadInput, once_key: str | None = None) -> None:
        if once_key is not None:
            if once_key in self._seen:
                self._seen.move_to_end(once_key)
                return
            self._seen[once_key] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        log_bad_input(bad)
        self.sink(bad)


def live_entry(partition: int, line: bytes) -> Entry:
    """One live line of ``partition`` as an Entry; raises ``ContractError`` when malformed."""
    offset, prev, type_b, ts, match, data = parse_live_line(line)
    return Entry.build(partition, offset, prev, type_b, ts, data, match)


def parse_live_payload(partition: int, payload: bytes) -> list[Entry]:
    """Decode one published message; raises ``ValueError`` on the first malformed line.
    ``read_live_payload`` is the tolerant form the subscription uses."""
    return [live_entry(partition, line) for line in split_live_payload(payload)]


def read_live_payload(
    payload: object, partition: int, channel: str, bad_inputs: BadInputs
) -> Iterable[list[Entry] | Resync]:
    """What ``Bus.live`` yields for one published message: its entries, or for a message
    with malformed lines, the good entries before the first bad line, ``Resync``, then the
    good entries after it (so the caller reads the stream where the bad line was before
    anything later is dispatched). Empty lists are left out. A line whose offset is not
    above the last good line's is bad too (the hub's positions never move backwards).

    One report per message: its first bad line, and how many lines were skipped. After
    ``MAX_BAD_LINES_CHECKED`` bad lines the rest is skipped unchecked: the ``Resync`` repair
    reads every real event of the message from the stream anyway, so a message of 100,000
    bad lines costs one log line and a split, not 100,000 of each."""
    if not isinstance(payload, bytes):
        bad_inputs.report(
            BadInput.of(BAD_LIVE_LINE, f"channel {channel}", "not a bytes payload", b"")
        )
        return (Resync(partition),)
    lines = split_live_payload(payload)
    before: list[Entry] = []
    try:
        for line in lines:
            entry = live_entry(partition, line)
            if before and entry.position <= before[-1].position:
                # The script publishes a batch in offset order; one out of order would move
                # the hub's position backwards.
                raise ContractError("the offset is not above the previous line's")
            before.append(entry)
        return (before,)
    except ValueError as exc:
        # The slow path, only for a message with a bad line.
        first_at = len(before)
        first = (first_at + 1, str(exc), lines[first_at])
    after: list[Entry] = []
    bad = 1
    unchecked = 0
    top = before[-1].position if before else -1
    for n in range(first_at + 1, len(lines)):
        if bad >= MAX_BAD_LINES_CHECKED:
            unchecked = len(lines) - n
            break
        try:
            entry = live_entry(partition, lines[n])
        except ValueError:
            bad += 1
            continue
        if entry.position <= top:
            bad += 1
            continue
        top = entry.position
        after.append(entry)
    number, detail, raw = first
    if bad > 1 or unchecked:
        detail += f"; {bad - 1} more bad lines in the message"
        if unchecked:
            detail += f", and {unchecked} lines after them skipped unchecked"
    bad_inputs.report(
        BadInput.of(BAD_LIVE_LINE, f"channel {channel} line {number}", detail, raw, bad + unchecked)
    )
    out: list[list[Entry] | Resync] = []
    if before:
        out.append(before)
    out.append(Resync(partition))
    if after:
        out.append(after)
    return out


def stream_entry(partition: int, id_b: bytes, fields: Mapping[bytes, bytes]) -> Entry:
    """One stream entry as an Entry; raises ``ContractError`` when it is malformed."""
    position = position_of(id_b)
    # Validated in full here, off the live path: a stream entry's envelope is spliced into
    # history bodies, where one invalid entry would break every answer covering it.
    type_b, ts, match, prev, data = parse_event_fields(fields, validate_json=True)
    if prev >= position:
        raise ContractError("the previous position (pv) is not below the entry's position")
    return Entry.build(partition, position - 1, prev, type_b, ts, data, match)


def read_stream_rows(
    rows: Iterable[tuple[bytes, Mapping[bytes, bytes]]],
    partition: int,
    stream: str,
    bad_inputs: BadInputs,
) -> list[Entry]:
    """Stream rows as Entries, skipping (and reporting once) those that break the contract.

    A skipped row leaves a hole in the ``pv`` chain. Readers check ``pv`` at the start of
    each page only: a reader positioned right before the row is told ``reset`` (the page
    it reads starts after the hole), but a row skipped inside a page is passed over
    silently, as it is on the live path (it was never a deliverable event); the bad-input
    counter and log are what show it."""
    out: list[Entry] = []
    for id_b, fields in rows:
        try:
            out.append(stream_entry(partition, id_b, fields))
        except (ContractError, ValueError) as exc:
            key = f"stream {stream} id {id_b.decode(errors='replace')}"
            raw = b" ".join(b"%s=%s" % (k, v[:40]) for k, v in list(fields.items())[:6])
            bad_inputs.report(BadInput.of(BAD_ENTRY, key, str(exc), raw), once_key=key)
    return out


class BusDisconnected(Exception):
    """The live subscription was lost; the caller reconnects and repairs its gaps."""


class BusUnavailable(Exception):
    """A read from the bus failed."""


class BusMoved(Exception):
    """Channels the live subscription listens to are now served elsewhere (a Redis Cluster
    failover, or a slot migration): not a failure; the caller subscribes again at once and
    repairs every partition, as after any (re)subscription."""


class Bus(Protocol):
    bad_inputs: BadInputs
    """Where the bus reports what it skipped (malformed live lines and stream entries)."""

    async def meta(self) -> Meta | None:
        """The topic's name, partition count and epoch (``<prefix>:meta``); None when
        ingest has not written it (yet, or since Redis lost it)."""
        ...

    async def state(self, partition: int) -> PartitionState | None:
        """The partition's ``applied``/``last``/``base``; None when Redis holds none."""
        ...

    async def read_after(
        self, partition: int, position: int, count: int, until: int | None = None
    ) -> list[Entry]:
        """Up to ``count`` entries of ``partition`` with ``position < entry.position
        (<= until)``, oldest first; fewer only at the end of that range (malformed entries
        are skipped, not counted). Each page is one consistent read, so only its first
        entry's ``prev`` needs checking against where the reader stood."""
        ...

    async def read_before(self, partition: int, before: int | None, count: int) -> list[Entry]:
        """Up to ``count`` entries with ``entry.position < before`` (the newest if None),
        newest first; fewer only at the start of the stream."""
        ...

    def live(self, partitions: int) -> AsyncGenerator[LiveItem, None]:
        """The live channels of partitions ``0..partitions-1`` on ONE subscription:
        batches of published entries, in publish order per partition; ``Subscribed(p)``
        whenever p's channel is (re)subscribed; ``Resync(p)`` where a malformed line of p
        was skipped; ``TICK`` when quiet. Raises ``BusDisconnected`` when it drops."""
        ...

    async def ping(self) -> bool: ...
