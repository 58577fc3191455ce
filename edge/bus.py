"""The edge's port to the event bus: a small Protocol with a Redis implementation
(``bus_redis``) for production and an in-memory one (``bus_memory``) for unit tests."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from shared.contract import ContractError, parse_event_fields, parse_live_line, split_live_payload
from shared.events import NO_MATCH, parse_match
from shared.ids import StreamId, parse_id_bytes
from shared.sse import event_frame_trusted

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    """One event as the edge handles it; ``frame`` is its SSE bytes, built once."""

    id: StreamId
    id_bytes: bytes
    type: bytes
    ts_ms: int
    """Kafka record timestamp, for the delivery-latency histogram."""
    data: bytes
    frame: bytes
    match: frozenset[tuple[str, str]] = frozenset()
    """The event's match fields (see ``shared.events.match_token``)."""

    @classmethod
    def build(
        cls,
        id_bytes: bytes,
        type_: bytes,
        ts_ms: int,
        data: bytes,
        id_: StreamId,
        match: bytes = NO_MATCH,
    ) -> Entry:
        return cls(
            id_,
            id_bytes,
            type_,
            ts_ms,
            data,
            event_frame_trusted(id_bytes, data),
            parse_match(match),
        )


@dataclass(frozen=True, slots=True)
class StreamInfo:
    exists: bool
    length: int
    first_id: StreamId | None
    last_id: StreamId
    """Last id ever generated in this incarnation of the stream (``0-0`` if none)."""
    max_deleted_id: StreamId
    """Largest id removed by XDEL (``0-0`` if none). Redis does not record trimming here."""
    entries_added: int
    """Entries ever added to this incarnation; more than ``length`` means some were trimmed
    (always from the oldest end)."""
    genesis: StreamId | None
    """First id written into this incarnation of the stream, if known."""


class _Subscribed:
    """Marker yielded by ``Bus.live`` each time the subscription is (re)established."""

    def __repr__(self) -> str:
        return "SUBSCRIBED"


SUBSCRIBED: Final = _Subscribed()


class _Resync:
    """Marker yielded by ``Bus.live`` after a malformed live line: the line may have stood
    for a real event, so the caller reads the stream (the truth) after its last id."""

    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()

BAD_LIVE_LINE: Final = "bad_live_line"
"""A line on the live channel that does not follow the contract (``shared/contract.py``)."""
BAD_ENTRY: Final = "bad_entry"
"""A stream entry whose fields do not follow the contract."""
BAD_INPUT_REASONS: Final = (BAD_LIVE_LINE, BAD_ENTRY)
EXCERPT_BYTES = 120
"""How much of a bad input a log line quotes: enough to recognise it, bounded."""


@dataclass(frozen=True, slots=True)
class BadInput:
    """Something the edge read from Redis and skipped."""

    reason: str
    """One of ``BAD_INPUT_REASONS``."""
    where: str
    """What identifies it: ``channel <name> line <n>`` or ``stream <key> id <id>``."""
    detail: str
    excerpt: str

    @classmethod
    def of(cls, reason: str, where: str, detail: str, raw: bytes) -> BadInput:
        cut = raw[:EXCERPT_BYTES]
        excerpt = repr(cut)[2:-1] + ("..." if len(raw) > EXCERPT_BYTES else "")
        return cls(reason, where, detail, excerpt)


def log_bad_input(bad: BadInput) -> None:
    log.warning(
        "skipped malformed input from redis",
        extra={
            "reason": bad.reason,
            "where": bad.where,
            "detail": bad.detail,
            "excerpt": bad.excerpt,
        },
    )


class BadInputs:
    """Reports each bad input once: logged and handed to ``sink`` (the edge counts it).

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


def live_entry(line: bytes) -> Entry:
    """One live line as an Entry; raises ``ValueError`` (``ContractError``) when malformed."""
    id_b, type_b, ts, match, data = parse_live_line(line)
    return Entry.build(id_b, type_b, ts, data, parse_id_bytes(id_b), match)


def parse_live_payload(payload: bytes) -> list[Entry]:
    """Decode one published batch (``shared.contract``); raises ``ValueError`` on the first
    malformed line. ``read_live_payload`` is the tolerant form the subscription uses."""
    return [live_entry(line) for line in split_live_payload(payload)]


def read_live_payload(
    payload: object, channel: str, bad_inputs: BadInputs
) -> Iterable[list[Entry] | _Resync]:
    """What ``Bus.live`` yields for one published message: its entries, or for a message
    with malformed lines, the good entries before the first bad line, ``RESYNC``, then the
    remaining good entries (so the caller reads the stream where the bad line was before
    anything later is dispatched). Each bad line is reported."""
    if not isinstance(payload, bytes):
        bad_inputs.report(
            BadInput.of(BAD_LIVE_LINE, f"channel {channel}", "not a bytes payload", b"")
        )
        return (RESYNC,)
    try:
        return (parse_live_payload(payload),)
    except ValueError:
        pass  # the slow path below, line by line, only for a message with a bad line
    before: list[Entry] = []
    after: list[Entry] = []
    current = before
    for n, line in enumerate(split_live_payload(payload), start=1):
        try:
            current.append(live_entry(line))
        except ValueError as exc:
            bad_inputs.report(
                BadInput.of(BAD_LIVE_LINE, f"channel {channel} line {n}", str(exc), line)
            )
            current = after
    return (before, RESYNC, after)


def stream_entry(id_b: bytes, fields: Mapping[bytes, bytes]) -> Entry:
    """One stream entry as an Entry; raises ``ContractError`` when its fields are malformed."""
    type_b, ts, match, data = parse_event_fields(fields)
    return Entry.build(id_b, type_b, ts, data, parse_id_bytes(id_b), match)


def read_stream_rows(
    rows: Iterable[tuple[bytes, Mapping[bytes, bytes]]], stream: str, bad_inputs: BadInputs
) -> list[Entry]:
    """Stream rows as Entries, skipping (and reporting once) those that break the contract."""
    out: list[Entry] = []
    for id_b, fields in rows:
        try:
            out.append(stream_entry(id_b, fields))
        except (ContractError, ValueError) as exc:
            key = f"stream {stream} id {id_b.decode(errors='replace')}"
            raw = b" ".join(b"%s=%s" % (k, v[:40]) for k, v in list(fields.items())[:6])
            bad_inputs.report(BadInput.of(BAD_ENTRY, key, str(exc), raw), once_key=key)
    return out


class BusDisconnected(Exception):
    """The live subscription was lost; the caller reconnects and repairs its gap."""


class BusUnavailable(Exception):
    """A read from the bus failed."""


class Bus(Protocol):
    bad_inputs: BadInputs
    """Where the bus reports what it skipped (malformed live lines and stream entries)."""

    async def info(self) -> StreamInfo: ...

    async def read_after(
        self, after: StreamId, count: int, until: StreamId | None = None
    ) -> list[Entry]:
        """Up to ``count`` entries with ``after < id (<= until)``, oldest first; fewer only
        at the end of that range (malformed entries are skipped, not counted)."""
        ...

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        """Up to ``count`` entries with ``id < before`` (newest if None), newest first;
        fewer only at the start of the stream (malformed entries are skipped)."""
        ...

    def live(self) -> AsyncIterator[list[Entry] | _Subscribed | _Resync]:
        """Batches of published entries, in publish order; ``SUBSCRIBED`` whenever the
        subscription is (re)established; ``RESYNC`` where a malformed line was skipped.
        Raises ``BusDisconnected`` when it drops."""
        ...

    async def ping(self) -> bool: ...
