"""Can a client resume from a position without a gap? (pure)

A position ``L`` (the last id a client received) has a gap-free continuation when every
entry written after ``L`` is still in the stream:

* nothing after ``L`` was trimmed. Trimming removes the oldest entries, and Redis counts
  what was ever added (``entries-added``) but does not record the trimmed ids, so once
  anything was trimmed the safe floor is the entry just before the oldest retained one:
  ``L >= first - 1``. (A client whose last event was exactly the last trimmed one is the
  only case told "reset" without having missed anything; it gets every retained event.)
* nothing after ``L`` was deleted (``L >= max-deleted-entry-id``);
* the stream was not lost and recreated since ``L``: ``L >= genesis - 1``, where genesis is
  the first id written into this incarnation (recorded by the ingest script);
* ``L`` is not ahead of the stream's last generated id (a position from elsewhere).

Otherwise the client gets an in-band ``reset`` first, whose ``id`` is the floor from which
the retained history is complete, so a reconnect after the reset resumes cleanly.
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


def trimmed(info: StreamInfo) -> bool:
    return info.entries_added > info.length


def boundary(info: StreamInfo) -> StreamId:
    """The oldest position that still has a gap-free continuation."""
    if trimmed(info):
        floor = info.first_id.predecessor() if info.first_id is not None else info.last_id
    else:
        floor = info.genesis.predecessor() if info.genesis is not None else ZERO
    return max(floor, info.max_deleted_id)


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
    if requested == ZERO and not trimmed(info) and info.max_deleted_id == ZERO:
        # "From the very beginning" of a stream that never lost an entry.
        return Resume(ZERO)
    genesis_floor = info.genesis.predecessor() if info.genesis is not None else ZERO
    # 0-0 asks for "everything", which predates any genesis: what it lost was trimmed.
    reason = "stream_lost" if requested != ZERO and requested < genesis_floor else "trimmed"
    return Reset(reason, requested, floor, info.first_id)
