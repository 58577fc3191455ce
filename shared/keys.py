"""Redis key and channel names, derived from one prefix so that deployments and tests never
share state by accident."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str

    @property
    def stream(self) -> str:
        """Capped replay stream of valid events (XADD MAXLEN ~)."""
        return f"{self.prefix}:stream"

    @property
    def live(self) -> str:
        """Pub/sub channel carrying each applied batch, with stream ids."""
        return f"{self.prefix}:live"

    @property
    def dead(self) -> str:
        """Capped stream of dead letters."""
        return f"{self.prefix}:dead"

    @property
    def offsets(self) -> str:
        """Hash ``<topic>:<partition>`` -> last applied Kafka offset (the dedupe record)."""
        return f"{self.prefix}:offsets"

    @property
    def genesis(self) -> str:
        """Id of the first entry written into the current incarnation of the stream.

        If Redis loses the stream (restart without persistence, FLUSHALL), the next write
        records a new genesis, and edges can tell that an older position has no gap-free
        continuation."""
        return f"{self.prefix}:genesis"
