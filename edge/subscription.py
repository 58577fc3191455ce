"""The edge's single subscription: keep it alive, repair gaps, feed the hub.

Pub/sub is at-most-once. Each time a partition's channel is (re)subscribed, and whenever a
live entry's ``pv`` shows that something before it never arrived, the edge reads that
partition's stream after the hub's position before dispatching anything later; the hub
drops what it already has, so the repair and the live path never overlap. Each repair page
is checked (``pv``): when the stream no longer holds what the hub missed (trimmed, or lost
and refilled from a later position), every client gets an in-band ``reset`` naming the
partition, and the partition continues from the oldest entry still stored.

The meta hash (topic, partitions, epoch) is read at every (re)subscription and every
``META_POLL_S``; the edge is not ready before it was read once. More partitions are
subscribed to; another epoch (the topic was recreated) resets every client and starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from shared.breaker import CircuitBreaker
from shared.sse import control_frame

from .bus import Bus, BusDisconnected, BusMoved, BusUnavailable, Entry, Resync, Subscribed
from .hub import Hub
from .metrics import EdgeMetrics
from .resume import NOT_RETAINED, TOPIC_CHANGED, TRIMMED, Reset, reset_payload

log = logging.getLogger(__name__)

CLOSED_RETRY_S = 0.1
"""Pause before resubscribing while the circuit is still closed."""
META_POLL_S = 5.0
"""How often the meta hash (and each partition's state, to catch a lost last message) is
read while subscribed."""
META_POLL_EMPTY_S = 1.0
MOVED_PAUSE_MAX_S = 1.0
"""The longest pause between resubscriptions for slots that keep moving."""
"""... and while no partition is known yet (ingest has never run): events come sooner."""


class Resubscribe(Exception):
    """The topic gained partitions or changed incarnation: subscribe again."""


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
        self._fresh: set[int] = set()
        """Partitions the hub starts at their stream's current end (live from now): those
        known at the edge's first subscription. Partitions found later start at their oldest
        entry, since clients were already being served when they appeared."""
        self._next_meta = 0.0
        self._served = False
        self._moves = 0
        """Resubscriptions in a row for a moved slot (reset once every partition is
        subscribed)."""

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
                await self._sync_meta(None)
                hub = self._hub
                subscribed = hub.partitions
                pending = set(range(subscribed))
                if not pending and hub.initialized:
                    self._subscribed()
                async with contextlib.aclosing(self._bus.live(subscribed)) as live:
                    async for item in live:
                        if isinstance(item, list):
                            await self._live(item)
                        elif isinstance(item, Subscribed):
                            p = item.partition
                            if connected_once and p == 0:
                                self._metrics.bus_reconnects.inc()
                            await self._repair(p, "subscribed")
                            if p in pending:
                                pending.discard(p)
                                if not pending:
                                    self._subscribed()
                                    self._moves = 0
                                    connected_once = True
                        elif isinstance(item, Resync):
                            # A malformed live line was skipped (the bus reported it). It may
                            # have stood for a real event: the stream is the truth, so read it
                            # after the hub's position before dispatching anything later.
                            await self._repair(
                                item.partition, "resynced after a malformed live line"
                            )
                        if time.monotonic() >= self._next_meta:
                            await self._sync_meta(subscribed)
                            if not pending:
                                await self._check_states()
                raise BusDisconnected("the subscription ended")
            except asyncio.CancelledError:
                raise
            except Resubscribe as why:
                log.info("resubscribing", extra={"why": str(why)})
            except BusMoved as why:
                # A failover or migration: not a failure, the edge stays ready. Each move
                # reads the slot map afresh; a node whose map lags can answer MOVED again,
                # so repeated moves pause a little (jittered) instead of spinning.
                self._moves += 1
                log.info("resubscribing", extra={"why": str(why), "moves": self._moves})
                if self._moves > 1:
                    await asyncio.sleep(
                        min(MOVED_PAUSE_MAX_S, 0.05 * self._moves) * random.random()
                    )
            except (BusDisconnected, BusUnavailable) as exc:
                self._set_ready(False)
                self.breaker.failure()
                delay = max(self.breaker.wait_s(), CLOSED_RETRY_S)
                log.warning(
                    "redis subscription lost; reconnecting",
                    extra={
                        "error": str(exc),
                        "retry_in_s": round(delay, 2),
                        "positions": str(self._hub.positions),
                    },
                )
                await asyncio.sleep(delay)

    def _subscribed(self) -> None:
        # Before the meta hash was ever read the edge knows neither the epoch nor the
        # partitions: a resume could not be judged (it would be told topic_changed, then get
        # everything again once meta appears), so it is not ready. Until then this loop only
        # polls meta (``Resubscribe`` once it appears).
        if not self._hub.initialized:
            return
        self._served = True
        self.breaker.success()
        self._set_ready(True)

    def _set_ready(self, ready: bool) -> None:
        self._metrics.ready.set(1 if ready else 0)
        if ready:
            self.ready.set()
        else:
            self.ready.clear()

    async def _sync_meta(self, subscribed: int | None) -> None:
        """Read the meta hash. ``subscribed``: how many partitions the running subscription
        listens to (None: before subscribing); raises ``Resubscribe`` when that changed."""
        hub = self._hub
        meta = await self._bus.meta()
        poll = META_POLL_S if hub.partitions else META_POLL_EMPTY_S
        self._next_meta = time.monotonic() + poll
        if meta is None:
            # Not written yet, or Redis lost it and ingest will write it back: no change.
            return
        changed = False
        if not hub.initialized:
            hub.start(meta.epoch, [None] * meta.partitions)
            if not self._served:
                # The edge's first subscription: live from now on.
                self._fresh = set(range(meta.partitions))
            log.info("topic", extra={"topic": meta.topic, "partitions": meta.partitions})
        elif hub.epoch != meta.epoch:
            self._topic_changed(meta.epoch, meta.partitions)
            changed = True
        elif meta.partitions > hub.partitions:
            hub.grow(meta.partitions)
            log.info("more partitions", extra={"topic": meta.topic, "partitions": meta.partitions})
        self._metrics.export_partitions(hub.partitions)
        if subscribed is not None and (changed or hub.partitions != subscribed):
            raise Resubscribe("the topic changed")

    async def _check_states(self) -> None:
        """Repair any partition whose stream went further than the hub: the live message of
        its last write never arrived (no later one shows the break in the pv links)."""
        hub = self._hub
        states = await asyncio.gather(*(self._bus.state(p) for p in range(hub.partitions)))
        for p, state in enumerate(states):
            pos = hub.positions[p]
            if state is not None and pos is not None and state.last > pos:
                await self._repair(p, "repaired a partition whose last live message was lost")

    def _topic_changed(self, epoch: int, partitions: int) -> None:
        hub = self._hub
        resets = [Reset(p, hub.positions[p], None, TOPIC_CHANGED) for p in range(partitions)]
        log.warning(
            "the topic was recreated; resetting clients",
            extra={"old_epoch": hub.epoch, "epoch": epoch},
        )
        hub.start(epoch, [None] * partitions)
        self._count_resets(resets)
        payload = reset_payload(resets)
        hub.broadcast_control(lambda cursor: control_frame("reset", payload, cursor.encode()))

    def _count_resets(self, resets: list[Reset]) -> None:
        clients = self._hub.client_count
        if not clients:
            return
        self._metrics.resets.labels(reason=resets[0].reason).inc(clients)
        for r in resets:
            self._metrics.partition_resets.labels(partition=str(r.partition), reason=r.reason).inc(
                clients
            )

    async def _live(self, entries: list[Entry]) -> None:
        hub = self._hub
        p = entries[0].partition
        if p >= hub.partitions:
            return  # a channel of a partition the hub does not serve yet
        pos = hub.positions[p]
        if pos is not None:
            first = next((e for e in entries if e.position > pos), None)
            if first is None:
                return  # all seen (a refill burst, or what a repair read)
            if first.prev > pos:
                # Something between the hub's position and this entry never arrived: the
                # stream has it (or says it is gone).
                await self._repair(p, "repaired a gap in the live feed")
                after = hub.positions[p]
                if after is not None and after < first.prev:
                    # Redis no longer holds what lies in between (it was lost or rolled back
                    # after this message was published). Dispatching would skip it; ingest
                    # refills the partition with the same ids, this entry included, and the
                    # refill comes down this channel.
                    log.info(
                        "live entries after a hole the stream does not hold; awaiting refill",
                        extra={"partition": p, "position": after, "pv": first.prev},
                    )
                    return
        self._metrics.messages.inc(hub.dispatch(entries))

    async def _repair(self, p: int, what: str) -> None:
        hub = self._hub
        if p >= hub.partitions:
            return
        if p in self._fresh:
            state = await self._bus.state(p)
            hub.move(p, state.last if state is not None else None)
            self._fresh.discard(p)
            log.info("subscribed", extra={"partition": p, "position": hub.positions[p]})
        repaired = 0
        while True:
            pos = hub.positions[p]
            entries = await self._bus.read_after(p, pos if pos is not None else 0, self._page)
            if not entries:
                if pos is None:
                    state = await self._bus.state(p)
                    if state is not None:
                        # Nothing stored yet: the partition stands at its state, so that
                        # the next live entry's pv is checked from there.
                        hub.move(p, state.last)
                break
            if pos is not None and entries[0].prev > pos:
                await self._reset_partition(p, pos, entries[0].prev)
            repaired += hub.dispatch(entries)
            if len(entries) < self._page:
                break
        self._metrics.bus_repaired.inc(repaired)
        self._metrics.messages.inc(repaired)
        if repaired:
            log.info(what, extra={"partition": p, "repaired_events": repaired})

    async def _reset_partition(self, p: int, requested: int, oldest: int) -> None:
        state = await self._bus.state(p)
        reason = NOT_RETAINED if state is not None and oldest <= state.base else TRIMMED
        reset = Reset(p, requested, oldest, reason)
        log.warning(
            "the stream lost events this edge had not delivered; resetting clients",
            extra={"partition": p, "reason": reason, "requested": requested, "oldest": oldest},
        )
        self._hub.move(p, oldest)
        self._count_resets([reset])
        payload = reset_payload([reset])
        self._hub.broadcast_control(lambda cursor: control_frame("reset", payload, cursor.encode()))
