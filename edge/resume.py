"""Can a client resume from a position without a gap? (pure)

A position ``L`` (the last id a client received) has a gap-free continuation when every
entry after ``L`` that was ever written is still in the stream:

* nothing after ``L`` was trimmed: ``L >= max-deleted-entry-id``;
* the stream was not lost and recreated since ``L``: ``L >= genesis - 1``;
* ``L`` is not ahead of what this stream ever generated (a position from elsewhere).

Otherwise the client gets an in-band ``reset`` first, whose ``id`` is the boundary ``B``
from which the retained history is complete, so a reconnect after the reset resumes
cleanly from ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.ids import ZERO, StreamId

from .bus import StreamInfo


@dataclass(frozen=True, slots=True)
class Resume:
    after: StreamId


@dataclass(frozen=True, slots=True)
class Reset:
    reason: str
    """``trimmed``, ``stream_lost``, ``stream_empty`` or ``unknown_position``."""
    requested: StreamId
    after: StreamId
    """Boundary from which delivery continues (the reset frame's id)."""
    oldest_available: StreamId | None

    def payload(self) -> dict[str, Any]:
        messages = {
            "trimmed": "events after the requested id were trimmed from the replay stream; "
            "delivery continues from the oldest event still stored",
            "stream_lost": "the replay stream was lost and recreated after the requested id; "
            "delivery continues from the oldest event still stored",
            "stream_empty": "the replay stream holds no events, so history since the "
            "requested id is unknown; delivery continues with new events",
            "unknown_position": "the requested id is ahead of every event in the stream "
            "(it comes from another deployment or a restored Redis); delivery continues "
            "with new events",
        }
        return {
            "reason": self.reason,
            "requested": str(self.requested),
            "resume_from": str(self.after),
            "oldest_available": str(self.oldest_available) if self.oldest_available else None,
            "message": messages[self.reason],
        }


def boundary(info: StreamInfo) -> StreamId:
    """The oldest position that still has a gap-free continuation."""
    genesis_floor = info.genesis.predecessor() if info.genesis is not None else ZERO
    return max(info.max_deleted_id, genesis_floor)


def check_position(requested: StreamId, info: StreamInfo) -> Resume | Reset:
    if not info.exists:
        if requested == ZERO:
            return Resume(ZERO)
        return Reset("stream_empty", requested, ZERO, None)
    if requested > info.last_id:
        return Reset("unknown_position", requested, info.last_id, info.first_id)
    floor = boundary(info)
    if requested >= floor:
        return Resume(requested)
    if requested == ZERO and info.max_deleted_id == ZERO:
        # "From the very beginning" of a stream that never lost an entry.
        return Resume(ZERO)
    reason = "trimmed" if info.max_deleted_id > requested else "stream_lost"
    return Reset(reason, requested, floor, info.first_id)
