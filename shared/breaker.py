"""A circuit breaker per backend (Kafka, Redis): closed -> open -> half-open -> closed.

``failures`` consecutive failures open the circuit: callers stop trying and wait. After the
open period one caller is let through as a half-open probe; its success closes the circuit,
its failure opens it again for a longer period (doubling, with jitter, up to a cap). The
state is exported as ``crm_events_circuit_state{backend}`` (0 closed, 1 half-open, 2 open)
and readiness is false unless the circuit is closed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)


class State(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "crm_events_circuit_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
            ["backend"],
            registry=registry,
        )
        self.transitions = Counter(
            "crm_events_circuit_transitions",
            "Circuit breaker state changes, by backend and new state.",
            ["backend", "state"],
            registry=registry,
        )


class CircuitBreaker:
    def __init__(
        self,
        backend: str,
        metrics: BreakerMetrics,
        failures: int = 3,
        reset_s: float = 1.0,
        max_reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self._metrics = metrics
        self._threshold = failures
        self._reset_s = reset_s
        self._max_reset_s = max_reset_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._failures = 0
        self._opened = 0
        self._open_until = 0.0
        self.state = State.CLOSED
        metrics.state.labels(backend=backend).set(0)
        for state in State:
            metrics.transitions.labels(backend=backend, state=state.name.lower())

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _move(self, state: State) -> None:
        if state is self.state:
            return
        log.log(
            logging.WARNING if state is State.OPEN else logging.INFO,
            "circuit %s",
            state.name.lower().replace("_", "-"),
            extra={"backend": self.backend, "consecutive_failures": self._failures},
        )
        self.state = state
        self._metrics.state.labels(backend=self.backend).set(state.value)
        self._metrics.transitions.labels(backend=self.backend, state=state.name.lower()).inc()

    def wait_s(self) -> float:
        """Seconds until a call may be tried (0 when it may be tried now). Moves an open
        circuit whose period has passed to half-open: the caller then makes the probe."""
        if self.state is State.OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                return left
            self._move(State.HALF_OPEN)
        return 0.0

    def success(self) -> None:
        self._failures = 0
        self._opened = 0
        self._move(State.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self._threshold:
            period = min(self._max_reset_s, self._reset_s * (2 ** min(self._opened, 16)))
            # Jitter keeps many edges from probing a recovering Redis in lockstep.
            self._open_until = self._clock() + period * self._rng.uniform(0.5, 1.0)
            self._opened += 1
            self._move(State.OPEN)
