"""Can a client resume a partition from its position without a gap? (pure)

Positions are Kafka positions (offset + 1). Every stream entry carries ``pv``, the position
right after the previous event entry of its partition's stream in this incarnation (or the
incarnation's ``base`` for its first entry). Kafka offsets are not contiguous (transaction
markers, compaction, dead letters), and Redis records nothing when MAXLEN trims, so neither
offset arithmetic nor ``max-deleted-entry-id`` can tell "trimmed" from "never existed";
``pv`` can. For a reader at position c in partition p:

* the first retained entry E after c has ``pv(E) <= c``: nothing between c and E existed,
  the continuation is exact;
* ``pv(E) > c``: the positions in ``[c, pv(E))`` are gone: ``trimmed`` (by MAXLEN), or
  ``not_retained`` (before ``base``, where a refill from Kafka started). Delivery continues
  from ``pv(E)``, which is also a position that then resumes exactly;
* no entry after c: exact when ``c >= base``; ``c`` beyond ``applied + 1`` means the
  client is ahead of this Redis (it came from an edge that saw more, or Redis rolled back and
  ingest is refilling): not a loss, the hub skips what the client already has; ``c < base``
  is ``not_retained``.

A cursor of another topic incarnation (``topic_changed``: another epoch, or more partitions
than the topic has) and an id of the old single-stream layout (``old_format``) reset every
partition, continuing from its oldest retained entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from shared.contract import PartitionState

from .bus import Entry

TRIMMED: Final = "trimmed"
NOT_RETAINED: Final = "not_retained"
TOPIC_CHANGED: Final = "topic_changed"
OLD_FORMAT: Final = "old_format"
RESET_REASONS: Final = (TRIMMED, NOT_RETAINED, TOPIC_CHANGED, OLD_FORMAT)
"""Per partition; a reset event's overall reason is the first of these that applies, in
this order of precedence: old_format, topic_changed, trimmed, not_retained."""
_PRECEDENCE: Final = (OLD_FORMAT, TOPIC_CHANGED, TRIMMED, NOT_RETAINED)

MESSAGES: Final = {
    TRIMMED: "events after the requested position were trimmed from the replay stream of the "
    "named partitions; delivery continues there from the oldest event still stored, and "
    "exactly in every other partition",
    NOT_RETAINED: "events after the requested position of the named partitions are no longer "
    "kept (the replay stream was rebuilt from Kafka from a later position); delivery "
    "continues there from the oldest event still stored, and exactly in every other partition",
    TOPIC_CHANGED: "the cursor belongs to another incarnation of the topic (it was recreated) "
    "or to another topic; delivery continues from the oldest event stored in every partition",
    OLD_FORMAT: "the id is of the replay stream's old format, which is no longer used; "
    "delivery continues from the oldest event stored in every partition",
}


@dataclass(frozen=True, slots=True)
class Exact:
    """Resume the partition from ``position`` (None: from its oldest retained entry)."""

    partition: int
    position: int | None
    ahead: bool = False
    """The client is ahead of what Redis holds (the hub skips live entries up to it)."""


@dataclass(frozen=True, slots=True)
class Reset:
    partition: int
    requested: int | None
    oldest_available: int | None
    """Where delivery continues (None: from the oldest retained entry, none known)."""
    reason: str
    """One of ``RESET_REASONS``."""

    def item(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "requested": self.requested,
            "oldest_available": self.oldest_available,
            "reason": self.reason,
        }


Decision = Exact | Reset


def decide(
    partition: int, requested: int, first: Entry | None, state: PartitionState | None
) -> Decision:
    """The decision for a reader at ``requested``, given the first retained entry after it
    (None: there is none) and the partition's state (only needed when there is none)."""
    if first is not None:
        if first.prev <= requested:
            return Exact(partition, requested)
        reason = NOT_RETAINED if state is not None and first.prev <= state.base else TRIMMED
        return Reset(partition, requested, first.prev, reason)
    if state is None:
        # Redis holds nothing of the partition (lost, and ingest has not refilled it yet):
        # the refill comes down the live channel, where the hub skips up to the client.
        return Exact(partition, requested, ahead=requested > 0)
    if requested >= state.base:
        return Exact(partition, requested, ahead=requested > state.applied + 1)
    # Nothing after the reader, which stands before the incarnation's start: the stream holds
    # no entry from base on (all trimmed), so it continues after the last one written.
    return Reset(partition, requested, state.last, NOT_RETAINED)


def overall_reason(resets: Sequence[Reset]) -> str:
    reasons = {r.reason for r in resets}
    return next(r for r in _PRECEDENCE if r in reasons)


def reset_payload(resets: Sequence[Reset]) -> dict[str, Any]:
    """The data of a ``reset`` event (and of history's ``reset``)."""
    reason = overall_reason(resets)
    return {
        "reason": reason,
        "partitions": [r.item() for r in sorted(resets, key=lambda r: r.partition)],
        "message": MESSAGES[reason],
    }
