"""Exponential backoff with full jitter (as in the AWS architecture blog and redis-py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    base_s: float = 0.1
    cap_s: float = 10.0
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [0, min(cap, base * 2**attempts)]."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        # Never zero, so a tight failure loop still yields the CPU.
        return max(0.01, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempts = 0
