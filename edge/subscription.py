"""The edge's single subscription: keep it alive, repair gaps, feed the hub.

Pub/sub is at-most-once. Each time the subscription is (re)established the edge reads the
stream after the last id it handed out, before live messages are dispatched again; the
hub drops anything at or below that id, so the repair and the live path never overlap.
If the stream no longer holds a gap-free continuation (Redis lost it), every client gets
an in-band ``reset`` rather than silence.
"""

from __future__ import annotations

import asyncio
import logging

from shared.breaker import CircuitBreaker
from shared.sse import control_frame

from .bus import RESYNC, SUBSCRIBED, Bus, BusDisconnected, BusUnavailable
from .hub import Hub
from .metrics import EdgeMetrics
from .resume import Reset, check_position

log = logging.getLogger(__name__)

CLOSED_RETRY_S = 0.1
"""Pause before resubscribing while the circuit is still closed."""


class Subscription:
    def __init__(
        self, bus: Bus, hub: Hub, metrics: EdgeMetrics, page: int, breaker: CircuitBreaker
    ) -> None:
        self._bus = bus
        self._hub = hub
        self._metrics = metrics
        self._page = page
        self.breaker = breaker
        self.ready = asyncio.Event()

    async def run(self) -> None:
        # Also after a restart by the supervisor: not ready until subscribed and repaired.
        self._set_ready(False)
        connected_once = False
        while True:
            delay = self.breaker.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                async for item in self._bus.live():
                    if item is SUBSCRIBED:
                        if connected_once:
                            self._metrics.bus_reconnects.inc()
                        await self._repair("resubscribed")
                        connected_once = True
                        self.breaker.success()
                        self._set_ready(True)
                    elif isinstance(item, list):
                        self._metrics.messages.inc(self._hub.dispatch(item))
                    elif item is RESYNC:
                        # A malformed live line was skipped (the bus reported it). It may
                        # have stood for a real event: the stream is the truth, so read it
                        # after our last id before dispatching anything later; the hub drops
                        # what the repair already delivered.
                        await self._repair("resynced after a malformed live line")
                raise BusDisconnected("the subscription ended")
            except asyncio.CancelledError:
                raise
            except (BusDisconnected, BusUnavailable) as exc:
                self._set_ready(False)
                self.breaker.failure()
                delay = max(self.breaker.wait_s(), CLOSED_RETRY_S)
                log.warning(
                    "redis subscription lost; reconnecting",
                    extra={
                        "error": str(exc),
                        "retry_in_s": round(delay, 2),
                        "last_id": str(self._hub.last_id),
                    },
                )
                await asyncio.sleep(delay)

    def _set_ready(self, ready: bool) -> None:
        self._metrics.ready.set(1 if ready else 0)
        if ready:
            self.ready.set()
        else:
            self.ready.clear()

    async def _repair(self, what: str) -> None:
        hub = self._hub
        info = await self._bus.info()
        if not hub.initialized:
            hub.start_at(info.last_id)
            log.info("subscribed", extra={"last_id": str(hub.last_id)})
            return
        decision = check_position(hub.last_id, info)
        if isinstance(decision, Reset):
            log.warning(
                "stream lost events this edge had not delivered; resetting clients",
                extra={
                    "reason": decision.reason,
                    "requested": str(decision.requested),
                    "resume_from": str(decision.after),
                },
            )
            self._metrics.resets.labels(reason=decision.reason).inc(hub.client_count)
            hub.broadcast(control_frame("reset", decision.payload(), decision.after.encode()))
            hub.start_at(decision.after)
        repaired = 0
        while True:
            entries = await self._bus.read_after(hub.last_id, self._page)
            if not entries:
                break
            repaired += hub.dispatch(entries)
            if len(entries) < self._page:
                break
        self._metrics.bus_repaired.inc(repaired)
        self._metrics.messages.inc(repaired)
        log.info(what, extra={"repaired_events": repaired, "last_id": str(hub.last_id)})
