"""Reconnect delays: exponential from the server's ``retry:`` hint, with full jitter.

After the n-th consecutive failure the delay is uniform in ``[0, min(cap, base * 2**n))``
("full jitter"): when an edge drains, its clients spread over the whole window instead of
returning together. ``base`` is the server's ``retry:`` (2 s until it says otherwise), but
never below ``MIN_BASE_S``: ``retry: 0`` must not turn a failing server into a hot loop. A
Retry-After from a 429/503 is a floor: the client never comes back earlier than asked, and
the jitter is added above it (uniform in ``[floor, floor + window)``), so that clients told
the same Retry-After do not all return in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

DEFAULT_RETRY_S = 2.0
"""The reconnect base until the server's ``retry:`` arrives (EventSource's usual default)."""
DEFAULT_CAP_S = 30.0
"""The longest wait between two attempts (a Retry-After may ask for longer)."""
MIN_BASE_S = 0.1
"""The smallest base, whatever the server's ``retry:`` says."""


class Backoff:
    def __init__(
        self,
        base_s: float = DEFAULT_RETRY_S,
        cap_s: float = DEFAULT_CAP_S,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if base_s < 0 or cap_s < 0:
            raise ValueError("backoff base and cap must not be negative")
        self._base_s = max(base_s, MIN_BASE_S)
        self.cap_s = cap_s
        self.failures = 0
        """Consecutive failed attempts (0 after a connection that lasted; see ``succeeded``)."""
        self._rand = rand

    @property
    def base_s(self) -> float:
        return self._base_s

    @base_s.setter
    def base_s(self, value: float) -> None:
        self._base_s = max(value, MIN_BASE_S)

    def window_s(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap_s, self.base_s * 2.0 ** min(self.failures, 32))

    def next_delay_s(self, floor_s: float | None = None) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = self._rand() * self.window_s()
        self.failures += 1
        if floor_s is not None:
            delay += floor_s
        return delay

    def succeeded(self) -> None:
        self.failures = 0
