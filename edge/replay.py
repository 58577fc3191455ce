"""Resuming a client from its cursor: the per-partition decision, then the replay of what
it missed, up to where the hub stood when the client was attached (the live entries after
that collect in the client's buffer meanwhile).

Partitions are replayed one after the other (no order across partitions, as in Kafka; each
partition in order). Each replayed frame's id is the client's own cursor advanced to that
event, so the ids a client receives never go backwards, across the switch to live frames
too (the hub's cursor is at or past every replayed position).

A partition is read from the replay ring while the ring covers the position, else from
Redis; every Redis page is checked (``pv``), including the first one after the ring fell
behind mid-replay: a page whose first entry's ``pv`` is above the position reached means
the stream lost what lies between, and the client gets an in-band ``reset`` naming the
partition before the rest. Never a silent gap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.cursor import Cursor, CursorEncoder
from shared.sse import control_frame

from .bus import Bus, Entry
from .hub import Client, Hub, http_chunk
from .lru import ByteLru
from .metrics import EdgeMetrics
from .params import LegacyId, Position
from .resume import (
    NOT_RETAINED,
    OLD_FORMAT,
    TOPIC_CHANGED,
    TRIMMED,
    Exact,
    Reset,
    decide,
    overall_reason,
    reset_payload,
)

REFILL_WAIT_S = 5.0
"""How long a replay waits, with no progress, for Redis to hold again what the hub already
dispatched (Redis was lost or rolled back and ingest is refilling it from Kafka) before it
resets: progress is the partition's ``applied`` moving (a large refill takes a while, and
is waited for as long as it keeps moving, up to ``REFILL_MAX_S``)."""
REFILL_MAX_S = 60.0
"""The longest a replay waits for a refill that keeps moving (the client's live entries
pile up in its bounded buffer meanwhile; past that it is better told ``reset``)."""
REFILL_POLL_S = 0.05

PageKey = tuple[object, ...]
CachedPage = tuple[bytes, bytes, int, int]
"""Joined frames, the same as one HTTP chunk, the position reached, frames in the page."""


class NotReady(Exception):
    """The edge has not read the topic's meta hash: a resume cannot be decided."""


class Writer(Protocol):
    async def write(self, data: bytes) -> None:
        """Write ``data`` to the client (in order with everything before)."""
        ...

    def write_shared(self, framed: bytes) -> bool:
        """Write ``framed`` (pre-framed, shared with other clients) at once if the socket
        is idle; False when it must go through ``write``."""
        ...


@dataclass(slots=True)
class Plan:
    cursor: Cursor
    """The client's cursor with every reset applied: where delivery continues."""
    starts: list[int | None]
    """Per partition, where the replay starts (None: from the oldest retained entry)."""
    resets: list[Reset] = field(default_factory=list)
    pages: dict[int, list[Entry]] = field(default_factory=dict)
    """First pages read while deciding (their start is ``starts[p]``)."""

    def reset_frame(self) -> bytes | None:
        if not self.resets:
            return None
        return control_frame("reset", reset_payload(self.resets), self.cursor.encode())


class Resumer:
    def __init__(
        self,
        bus: Bus,
        hub: Hub,
        metrics: EdgeMetrics,
        page: int,
        pages_cache: ByteLru[PageKey, CachedPage],
        refill_wait_s: float = REFILL_WAIT_S,
        refill_max_s: float = REFILL_MAX_S,
    ) -> None:
        self.bus = bus
        self.hub = hub
        self.metrics = metrics
        self.page = page
        self.pages_cache = pages_cache
        self.refill_wait_s = refill_wait_s
        self.refill_max_s = refill_max_s

    # --- the decision -------------------------------------------------------------------------

    async def plan(self, requested: Position) -> Plan:
        """Decide every partition (reading Redis only where the ring does not cover it)."""
        hub = self.hub
        n = hub.partitions
        if hub.epoch is None:
            # Only reached if called before the edge is ready (the handler waits for that):
            # nothing is known, so nothing is decided; the client resumes from its own cursor.
            raise NotReady("the topic's meta hash has not been read yet")
        epoch = hub.epoch
        reason = None
        if isinstance(requested, LegacyId):
            reason = OLD_FORMAT
        elif requested.epoch != epoch or len(requested.positions) > n:
            reason = TOPIC_CHANGED
        if reason is not None:
            self.metrics.ring_misses.inc()
            return await self._from_oldest(epoch, n, reason, requested)
        assert isinstance(requested, Cursor)
        starts: list[int | None] = []
        to_read: list[tuple[int, int]] = []
        for p in range(n):
            c = requested.position(p)
            starts.append(c)
            if c is not None and not hub.ring.covers(p, c):
                to_read.append((p, c))
        if not to_read:
            self.metrics.ring_hits.inc()
            self.metrics.resumed.inc()
            return Plan(Cursor(epoch, tuple(starts)), starts)
        self.metrics.ring_misses.inc()
        first_pages = await asyncio.gather(
            *(self.bus.read_after(p, c, self.page) for p, c in to_read)
        )
        plan = Plan(Cursor(epoch, tuple(starts)), starts)
        for (p, c), page in zip(to_read, first_pages, strict=True):
            first = page[0] if page else None
            state = None
            if first is None or first.prev > c:
                state = await self.bus.state(p)
            decision = decide(p, c, first, state)
            if isinstance(decision, Exact):
                plan.pages[p] = page
                continue
            plan.resets.append(decision)
            starts[p] = decision.oldest_available
            plan.pages[p] = page
        plan.cursor = Cursor(epoch, tuple(starts))
        self._count(plan.resets)
        return plan

    async def _from_oldest(self, epoch: int, n: int, reason: str, requested: Position) -> Plan:
        pages = await asyncio.gather(*(self.bus.read_after(p, 0, self.page) for p in range(n)))
        starts: list[int | None] = []
        resets = []
        for p, page in enumerate(pages):
            oldest = page[0].prev if page else None
            starts.append(oldest)
            asked = requested.position(p) if isinstance(requested, Cursor) else None
            resets.append(Reset(p, asked, oldest, reason))
        plan = Plan(Cursor(epoch, tuple(starts)), starts, resets, dict(enumerate(pages)))
        self._count(resets)
        return plan

    def _count(self, resets: Sequence[Reset]) -> None:
        metrics = self.metrics
        if not resets:
            metrics.resumed.inc()
            return
        metrics.resumed_with_reset.inc()
        metrics.resets.labels(reason=overall_reason(resets)).inc()
        for r in resets:
            metrics.partition_resets.labels(partition=str(r.partition), reason=r.reason).inc()

    # --- the replay ---------------------------------------------------------------------------

    async def replay(self, plan: Plan, client: Client, head: Cursor, writer: Writer) -> None:
        """Send what lies between ``plan`` and ``head`` (the hub's cursor at attach)."""
        encoder = CursorEncoder(plan.cursor.epoch, plan.cursor.positions)
        for p, h in enumerate(head.positions):
            if h is None or client.closed:
                continue
            start = plan.starts[p] if p < len(plan.starts) else None
            if start is not None and start >= h:
                continue
            await self._partition(p, start, h, plan.pages.get(p), client, encoder, writer)

    async def _partition(
        self,
        p: int,
        pos: int | None,
        head: int,
        pending: list[Entry] | None,
        client: Client,
        encoder: CursorEncoder,
        writer: Writer,
    ) -> None:
        ring = self.hub.ring
        if pos is None and pending is None and ring[p].from_oldest:
            # No position here asks for the partition's oldest retained entries, and the ring
            # still holds the partition from its oldest on (typical for a partition that had
            # no event yet when the client's cursor was made): no Redis read per client.
            pos = ring[p].floor
        while (pos is None or pos < head) and not client.closed:
            if pending is None and pos is not None and ring.covers(p, pos):
                pos = await self._ring_page(p, pos, head, client, encoder, writer)
                continue
            if pending is not None:
                page, pending = pending, None
            else:
                page = await self.bus.read_after(
                    p, pos if pos is not None else 0, self.page, until=head
                )
            if page and page[-1].position > head:
                page = [e for e in page if e.position <= head]
            if not page:
                pos = await self._nothing_up_to_head(p, pos, head, client, encoder, writer)
                continue
            if pos is not None and page[0].prev > pos:
                # The stream lost what lies between (trimmed between two pages, or the ring
                # fell behind mid-replay and Redis no longer has it either).
                await self._reset(p, pos, page[0].prev, None, encoder, writer)
            frames = []
            for entry in page:
                encoder.set(p, entry.position)
                if client.wants(entry):
                    frames.append(b"id: " + encoder.encode() + entry.frame)
            pos = page[-1].position
            if frames:
                await writer.write(b"".join(frames))
                self.metrics.replayed.inc(len(frames))

    async def _ring_page(
        self,
        p: int,
        pos: int,
        head: int,
        client: Client,
        encoder: CursorEncoder,
        writer: Writer,
    ) -> int:
        ring = self.hub.ring[p]
        # A reconnect storm: thousands of clients resume from the same place and get the very
        # same page, joined (and framed as an HTTP chunk) once.
        key = (ring.generation, encoder.encode(), p, pos, head, client.group)
        cached = self.pages_cache.get(key)
        if cached is None:
            entries = ring.after(pos, head, self.page)
            if not entries:
                return head
            frames = []
            for entry in entries:
                encoder.set(p, entry.position)
                if client.wants(entry):
                    frames.append(b"id: " + encoder.encode() + entry.frame)
            data = b"".join(frames)
            cached = (data, http_chunk(data) if frames else b"", entries[-1].position, len(frames))
            self.pages_cache.put(key, cached)
        data, framed, reached, count = cached
        encoder.set(p, reached)
        if count:
            # At most this one page waits in the transport: the next write drains through
            # the response.
            if not writer.write_shared(framed):
                await writer.write(data)
            self.metrics.replayed.inc(count)
        return reached

    async def _nothing_up_to_head(
        self,
        p: int,
        pos: int | None,
        head: int,
        client: Client,
        encoder: CursorEncoder,
        writer: Writer,
    ) -> int:
        """Redis holds nothing of the partition in ``(pos, head]`` although the hub has
        dispatched up to ``head``: find out why, and where to continue."""
        now = time.monotonic()
        give_up = now + self.refill_max_s
        stalled = now + self.refill_wait_s
        applied: int | None = None
        while True:
            # The state first, the stream after: a refill that writes (pos, head] between the
            # two reads then shows up in the probe. The other order could read an empty
            # stream, then a state already past head, and skip what the refill just wrote.
            state = await self.bus.state(p)
            probe = await self.bus.read_after(p, pos if pos is not None else 0, 1)
            if probe:
                first = probe[0]
                if pos is not None and first.prev > pos:
                    # Lost up to first.prev; but the hub has every entry after head and the
                    # client gets those live, so the loss ends at head at the latest (and
                    # the ids it then receives do not go back).
                    oldest = min(first.prev, head)
                    await self._reset(p, pos, oldest, None, encoder, writer)
                    return oldest
                if first.position <= head:
                    # Written since the read that found nothing (a refill): read again.
                    return pos if pos is not None else first.prev
                # Nothing of this incarnation lies in (pos, head]: nothing was missed.
                return head
            if state is not None and state.applied + 1 >= head:
                if pos is None or pos >= state.base:
                    return head  # nothing of this incarnation lies in (pos, head]
                await self._reset(p, pos, head, NOT_RETAINED, encoder, writer)
                return head
            # Redis lost or rolled back what the hub had: ingest refills it from Kafka and
            # will hold (pos, head] again; while it moves, a reset would skip what it brings.
            now = time.monotonic()
            if state is not None and (applied is None or state.applied > applied):
                if applied is not None:
                    stalled = now + self.refill_wait_s
                applied = state.applied
            if client.closed:
                return head  # nobody to send it to; the handler ends
            if now >= stalled or now >= give_up:
                await self._reset(p, pos, head, NOT_RETAINED, encoder, writer)
                return head
            await asyncio.sleep(REFILL_POLL_S)

    async def _reset(
        self,
        p: int,
        requested: int | None,
        oldest: int,
        reason: str | None,
        encoder: CursorEncoder,
        writer: Writer,
    ) -> None:
        if reason is None:
            state = await self.bus.state(p)
            reason = NOT_RETAINED if state is not None and oldest <= state.base else TRIMMED
        reset = Reset(p, requested, oldest, reason)
        encoder.set(p, oldest)
        await writer.write(control_frame("reset", reset_payload([reset]), encoder.encode()))
        self.metrics.resets.labels(reason=reason).inc()
        self.metrics.partition_resets.labels(partition=str(p), reason=reason).inc()
