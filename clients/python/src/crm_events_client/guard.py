"""The per-partition duplicate guard: an offset at or below the newest one seen in its
partition is a duplicate. The server resumes exactly, so this should never fire; it is
cheap insurance (the JavaScript example does the same). Offsets have holes (transaction
markers, compaction), so a jump is not a gap and is not reported."""

from __future__ import annotations

from .models import Reset


class DuplicateGuard:
    def __init__(self) -> None:
        self.newest: dict[int, int] = {}
        self.dropped = 0

    def admit(self, partition: int, offset: int) -> bool:
        """True when the event is new (and remembers it)."""
        last = self.newest.get(partition)
        if last is not None and offset <= last:
            self.dropped += 1
            return False
        self.newest[partition] = offset
        return True

    def reset(self, reset: Reset) -> None:
        """Forget what the reset invalidates: offsets of the partitions it names may start
        again lower (a recreated topic resets every partition)."""
        if reset.whole_topic:
            self.newest.clear()
            return
        for part in reset.partitions:
            self.newest.pop(part.partition, None)
