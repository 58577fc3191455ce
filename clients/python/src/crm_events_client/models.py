"""What the iterators yield: typed events and resets, built from the server's JSON at the
edge of the library so that no raw dict travels further than the ``event`` payload itself."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .errors import ProtocolError

Source = Literal["stream", "history"]

WHOLE_TOPIC_REASONS = frozenset({"topic_changed", "old_format"})
"""Reset reasons that restart every partition (offsets may start again from zero)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One CRM event: the envelope of ``GET /crm-events`` (or a history item) and its cursor.

    ``cursor`` is opaque: the position right after this event, to pass back unchanged
    (``Last-Event-ID``, ``last_event_id``, history ``after``); never parse or compare it."""

    type: str
    key: str | None
    partition: int
    offset: int
    timestamp_ms: int
    """The Kafka record's timestamp, in milliseconds since the Unix epoch."""
    event: dict[str, Any]
    """The producer's event object, unchanged."""
    cursor: str
    source: Source = "stream"
    """Where it came from: the live/replayed stream, or a history page (see ``on_reset``)."""

    @property
    def timestamp(self) -> datetime:
        """``timestamp_ms`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    def envelope(self) -> dict[str, Any]:
        """The server's envelope with the cursor in front (a history item's shape)."""
        return {
            "cursor": self.cursor,
            "type": self.type,
            "key": self.key,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "event": self.event,
        }


@dataclass(frozen=True, slots=True)
class PartitionReset:
    partition: int
    requested: int | None
    """The position the cursor asked for (None: it had none for this partition)."""
    oldest_available: int | None
    """Where delivery continues in this partition (a Kafka position: the next offset)."""
    reason: str


@dataclass(frozen=True, slots=True)
class Reset:
    """Events after the cursor are gone in ``partitions``: delivery continues there from
    ``oldest_available``; every other partition continues exactly. Never ignore one."""

    reason: str
    """``trimmed``, ``not_retained``, ``topic_changed`` or ``old_format``."""
    partitions: tuple[PartitionReset, ...]
    message: str
    cursor: str | None
    """The new cursor (the SSE id of the reset event); None for a history page's reset,
    whose items carry their own cursors."""
    source: Source = "stream"

    @property
    def whole_topic(self) -> bool:
        """Every partition restarts (the topic was recreated, or the id is of the old
        format): per-partition offsets seen before mean nothing any more."""
        return self.reason in WHOLE_TOPIC_REASONS or not self.partitions


Item = Event | Reset
"""What ``stream()`` and ``history()`` yield."""


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"'{name}' is not an integer in {obj!r:.200}")
    return value


def _opt_int(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    return None if value is None else _int(obj, name)


def event_from(envelope: Any, cursor: str, source: Source = "stream") -> Event:
    if not isinstance(envelope, dict):
        raise ProtocolError(f"an event's data is not a JSON object: {envelope!r:.200}")
    type_ = envelope.get("type")
    key = envelope.get("key")
    payload = envelope.get("event")
    if not isinstance(type_, str):
        raise ProtocolError(f"an event without a type: {envelope!r:.200}")
    if key is not None and not isinstance(key, str):
        raise ProtocolError(f"an event's key is not a string: {envelope!r:.200}")
    if not isinstance(payload, dict):
        raise ProtocolError(f"an event's 'event' is not an object: {envelope!r:.200}")
    return Event(
        type=type_,
        key=key,
        partition=_int(envelope, "partition"),
        offset=_int(envelope, "offset"),
        timestamp_ms=_int(envelope, "timestamp_ms"),
        event=payload,
        cursor=cursor,
        source=source,
    )


def reset_from(info: Any, cursor: str | None, source: Source = "stream") -> Reset:
    if not isinstance(info, dict):
        raise ProtocolError(f"a reset's data is not a JSON object: {info!r:.200}")
    raw_parts = info.get("partitions") or []
    if not isinstance(raw_parts, list) or not all(isinstance(p, dict) for p in raw_parts):
        raise ProtocolError(f"a reset's partitions are not a list of objects: {info!r:.200}")
    parts = tuple(
        PartitionReset(
            partition=_int(p, "partition"),
            requested=_opt_int(p, "requested"),
            oldest_available=_opt_int(p, "oldest_available"),
            reason=str(p.get("reason", "")),
        )
        for p in raw_parts
    )
    return Reset(
        reason=str(info.get("reason", "")),
        partitions=parts,
        message=str(info.get("message", "")),
        cursor=cursor,
        source=source,
    )


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One answer of ``GET /crm-events/history``."""

    items: tuple[Event, ...]
    count: int
    next_after: str | None
    """The ``after`` of the next page (null when the page is empty and no ``after`` was
    given)."""
    reset: Reset | None


def page_from(body: Any) -> HistoryPage:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise ProtocolError(f"a history answer without items: {body!r:.200}")
    items = []
    for raw in body["items"]:
        cursor = raw.get("cursor") if isinstance(raw, dict) else None
        if not isinstance(cursor, str):
            raise ProtocolError(f"a history item without a cursor: {raw!r:.200}")
        items.append(event_from(raw, cursor, "history"))
    next_after = body.get("next_after")
    if next_after is not None and not isinstance(next_after, str):
        raise ProtocolError(f"'next_after' is not a string: {next_after!r:.200}")
    raw_reset = body.get("reset")
    reset = reset_from(raw_reset, None, "history") if raw_reset is not None else None
    return HistoryPage(tuple(items), _int(body, "count"), next_after, reset)
