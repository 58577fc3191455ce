"""The edge's port to the event bus: a small Protocol with a Redis implementation
(``bus_redis``) for production and an in-memory one (``bus_memory``) for unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Protocol

from shared.events import NO_MATCH, parse_match
from shared.ids import StreamId
from shared.sse import event_frame_trusted


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


class BusDisconnected(Exception):
    """The live subscription was lost; the caller reconnects and repairs its gap."""


class BusUnavailable(Exception):
    """A read from the bus failed."""


class Bus(Protocol):
    async def info(self) -> StreamInfo: ...

    async def read_after(
        self, after: StreamId, count: int, until: StreamId | None = None
    ) -> list[Entry]:
        """Up to ``count`` entries with ``after < id (<= until)``, oldest first."""
        ...

    async def read_before(self, before: StreamId | None, count: int) -> list[Entry]:
        """Up to ``count`` entries with ``id < before`` (newest if None), newest first."""
        ...

    def live(self) -> AsyncIterator[list[Entry] | _Subscribed]:
        """Batches of published entries, in publish order; ``SUBSCRIBED`` whenever the
        subscription is (re)established. Raises ``BusDisconnected`` when it drops."""
        ...

    async def ping(self) -> bool: ...
