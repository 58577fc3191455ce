"""``GET /crm-events/history``: stored events as JSON, with cursor paging.

Each partition is read on its own (from its ring when the ring can tell, else from its Redis
stream) and the partitions are merged by (Kafka timestamp, partition, offset); each
partition keeps its order. ``n`` without ``after`` takes up to n from the tail of each
partition and keeps the newest n of the merge: O(partitions x n) reads, fine for the tens of
partitions and ``n`` of a thousand this edge is configured for, not for thousands of
partitions. ``after=<cursor>`` pages each partition forward from its own position.

Every item is the envelope with ``"cursor"`` spliced in front: the cursor right after that
item, so that a client can resume the stream (or page on) from any item. Per partition it is
the position before that partition's next item in the merge (``pv``, so events a filter
skipped are not scanned again), or, after its last one, the last position the request
looked at. ``next_after`` is the last item's cursor.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from shared.contract import ContractError, check_json
from shared.cursor import Cursor, CursorEncoder
from shared.httpkit import ApiError

from .bus import BAD_LIVE_LINE, BadInput, BusUnavailable, Entry
from .context import EdgeContext
from .hub import NO_EPOCH
from .params import LegacyId, Position, TooManyTypes, parse_history_params
from .resume import (
    OLD_FORMAT,
    TOPIC_CHANGED,
    Reset,
    decide,
    overall_reason,
    reset_payload,
)

# Bounds the work of one filtered request on a stream where the wanted types are rare.
SCAN_FACTOR = 10

Wants = Callable[[Entry], bool] | None


@dataclass(slots=True)
class Part:
    """What the request read of one partition."""

    base: int | None
    """Where the request started in it (None: from its oldest entry, or ``n`` mode)."""
    items: list[Entry] = field(default_factory=list)
    """The entries it wants, in order."""
    tail: int | None = None
    """The last position it looked at (the partition's newest, in ``n`` mode)."""
    first_prev: int | None = None
    """``pv`` of the first entry read (where the retained stream starts, from the oldest)."""


def _scan(ctx: EdgeContext, n: int, wants: Wants) -> tuple[int, int]:
    """Entries per read, and how many a request may look at per partition: ``n *
    SCAN_FACTOR`` rounded up to whole reads (the ring looks at exactly as many, so both
    answer the same)."""
    page = max(n, min(ctx.settings.resume_page, n * SCAN_FACTOR)) if wants else n
    budget = -(-n * SCAN_FACTOR // page) * page
    return page, budget


def _predicate(types: frozenset[bytes] | None, required: frozenset[tuple[str, str]]) -> Wants:
    if types is None and not required:
        return None
    return lambda e: (types is None or e.type in types) and required <= e.match


# --- reading one partition ----------------------------------------------------------------------


async def _latest_part(
    ctx: EdgeContext, p: int, n: int, wants: Wants, page: int, budget: int
) -> Part:
    """The newest ``n`` wanted entries of the partition (a filtered scan stops after
    ``budget`` entries, so a rare type returns fewer rather than scanning forever)."""
    part = Part(None)
    before: int | None = None
    scanned = 0
    picked: list[Entry] = []
    while len(picked) < n and scanned < budget:
        rows = await ctx.bus.read_before(p, before, page)
        if rows and part.tail is None:
            part.tail = rows[0].position
        scanned += len(rows)
        picked.extend(e for e in rows if wants is None or wants(e))
        if len(rows) < page:
            break
        before = rows[-1].position
    part.items = picked[:n][::-1]
    if part.tail is None:
        part.tail = ctx.hub.positions[p] if p < ctx.hub.partitions else None
    return part


async def _forward_part(
    ctx: EdgeContext, p: int, start: int | None, n: int, wants: Wants, page: int, budget: int
) -> tuple[Part, Reset | None]:
    """The wanted entries after ``start`` (None: from the oldest), checked like a resume:
    the first page decides (``pv``), and a page that no longer follows the one before
    (trimmed in between) ends the scan there, for the next request to find out."""
    part = Part(start, tail=start)
    reset: Reset | None = None
    pos = start
    scanned = 0
    first = True
    while len(part.items) < n and scanned < budget:
        rows = await ctx.bus.read_after(p, pos if pos is not None else 0, page)
        if first:
            first = False
            part.first_prev = rows[0].prev if rows else None
            if start is not None and (not rows or rows[0].prev > start):
                state = await ctx.bus.state(p)
                decision = decide(p, start, rows[0] if rows else None, state)
                if isinstance(decision, Reset):
                    reset = decision
                    part.base = part.tail = pos = decision.oldest_available
        elif rows and pos is not None and rows[0].prev > pos:
            break
        if not rows:
            break
        for entry in rows:
            scanned += 1
            part.tail = entry.position
            if wants is None or wants(entry):
                part.items.append(entry)
                if len(part.items) == n:
                    return part, reset
        pos = rows[-1].position
        if len(rows) < page:
            break
    return part, reset


def _forward_in_ring(
    ctx: EdgeContext, p: int, start: int, n: int, wants: Wants, budget: int
) -> Part:
    """``_forward_part`` over the partition's ring (which holds every entry after start)."""
    part = Part(start, tail=start)
    for entry in ctx.hub.ring[p].after(start, None, budget):
        part.tail = entry.position
        if wants is None or wants(entry):
            part.items.append(entry)
            if len(part.items) == n:
                break
    return part


# --- the answer ---------------------------------------------------------------------------------

_EMPTY_OBJECT = re.compile(rb"\{[ \t]*\}")


def _item(cursor: bytes, data: bytes) -> bytes:
    """The envelope (a JSON object) with ``"cursor"`` spliced in as its first member."""
    head = b'{"cursor":"' + cursor + b'"'
    if _EMPTY_OBJECT.fullmatch(data):
        return head + b"}"
    return head + b"," + data[1:]


def _drop_invalid(ctx: EdgeContext, parts: Sequence[Part]) -> None:
    """Leave out ring entries whose envelope is not valid JSON. Stream reads validate every
    envelope; live lines do not (about 1 µs per event on the hot path, and a bad one there
    spoils one SSE frame only), but the ring holds them, and spliced into a history body one
    would make the whole body invalid. Only on a cache miss, so at most once per ring state."""
    for part in parts:
        keep = []
        for entry in part.items:
            try:
                check_json(entry.data)
            except ContractError as exc:
                where = f"partition {entry.partition} position {entry.position} (live, in the ring)"
                ctx.bus.bad_inputs.report(
                    BadInput.of(BAD_LIVE_LINE, where, exc.detail, entry.data), once_key=where
                )
                continue
            keep.append(entry)
        part.items = keep


def _merge(parts: Sequence[Part]) -> list[Entry]:
    return list(
        heapq.merge(*(p.items for p in parts), key=lambda e: (e.ts_ms, e.partition, e.offset))
    )


def _body(epoch: int, parts: Sequence[Part], n: int, newest: bool, reset_json: bytes) -> bytes:
    merged = _merge(parts)
    keep = merged[-n:] if newest else merged[:n]
    offset = len(merged) - len(keep) if newest else 0
    # Walking back from the end: each item's cursor is, per partition, the position before
    # that partition's next item in the merge, or its tail after its last one.
    encoder = CursorEncoder(epoch, [p.tail for p in parts])
    cursors: list[bytes] = [b""] * len(keep)
    for i in range(len(merged) - 1, -1, -1):
        entry = merged[i]
        k = i - offset
        if 0 <= k < len(keep):
            cursors[k] = encoder.encode()
        base = parts[entry.partition].base
        prev = entry.prev if base is None else max(base, entry.prev)
        encoder.set(entry.partition, prev)
    next_after = (
        cursors[-1]
        if keep
        else (CursorEncoder(epoch, [p.tail for p in parts]).encode() if parts else None)
    )
    items = [_item(c, e.data) for c, e in zip(cursors, keep, strict=True)]
    return (
        b'{"items":['
        + b",".join(items)
        + b'],"count":%d' % len(keep)
        + b',"next_after":'
        + (b'"' + next_after + b'"' if next_after else b"null")
        + b',"reset":'
        + reset_json
        + b"}"
    )


async def history_handler(request: web.Request, ctx: EdgeContext) -> web.Response:
    settings = ctx.settings
    try:
        params = parse_history_params(
            request.query,
            settings.history_default_n,
            settings.history_max_n,
            settings.limits.max_types,
        )
    except TooManyTypes:
        ctx.metrics.limit_rejections.labels(limit="types").inc()
        raise
    grant = await ctx.grant(request)
    types = ctx.narrow(grant, params.types)
    ctx.history_rate.take(ctx.client_ip(request))
    wants = _predicate(types, grant.match)
    hub, ring = ctx.hub, ctx.hub.ring
    epoch = hub.epoch if hub.epoch is not None else NO_EPOCH
    n = params.n
    key = (epoch, ring.version, n, params.after, types, grant.match)
    cached = ctx.history_bodies.get(key)
    if cached is not None:
        ctx.metrics.ring_hits.inc()
        return web.Response(body=cached, content_type="application/json")
    page, budget = _scan(ctx, n, wants)
    from_ring = _from_ring(ctx, params.after, epoch, n, wants, budget)
    if from_ring is not None:
        ctx.metrics.ring_hits.inc()
        _drop_invalid(ctx, from_ring)
        body = _body(epoch, from_ring, n, params.after is None, b"null")
        ctx.history_bodies.put(key, body)
        return web.Response(body=body, content_type="application/json")
    ctx.metrics.ring_misses.inc()
    try:
        if params.after is None:
            parts = await asyncio.gather(
                *(_latest_part(ctx, p, n, wants, page, budget) for p in range(hub.partitions))
            )
            body = _body(epoch, parts, n, True, b"null")
        else:
            parts, resets = await _after(ctx, params.after, epoch, n, wants, page, budget)
            reset_json = b"null"
            if resets:
                reset_json = json.dumps(reset_payload(resets), separators=(",", ":")).encode()
                ctx.metrics.resets.labels(reason=overall_reason(resets)).inc()
                for r in resets:
                    ctx.metrics.partition_resets.labels(
                        partition=str(r.partition), reason=r.reason
                    ).inc()
            body = _body(epoch, parts, n, False, reset_json)
    except BusUnavailable as exc:
        raise ApiError(
            503, "redis_unavailable", "history is unavailable; retry shortly", {"Retry-After": "2"}
        ) from exc
    return web.Response(body=body, content_type="application/json")


def _from_ring(
    ctx: EdgeContext, after: Position | None, epoch: int, n: int, wants: Wants, budget: int
) -> list[Part] | None:
    """The answer from the rings alone, when they can tell exactly what Redis would."""
    hub, ring = ctx.hub, ctx.hub.ring
    if not hub.partitions or ring.partitions < hub.partitions:
        return None
    parts = []
    if after is None:
        for p in range(hub.partitions):
            newest = ring[p].newest(n, wants, budget)
            if newest is None:
                return None
            parts.append(Part(None, newest[0], ring[p].last))
        return parts
    if (
        not isinstance(after, Cursor)
        or after.epoch != epoch
        or len(after.positions) > hub.partitions
    ):
        return None
    for p in range(hub.partitions):
        start = after.position(p)
        if start is None or not ring.covers(p, start):
            return None
        parts.append(_forward_in_ring(ctx, p, start, n, wants, budget))
    return parts


async def _after(
    ctx: EdgeContext,
    after: Position,
    epoch: int,
    n: int,
    wants: Wants,
    page: int,
    budget: int,
) -> tuple[list[Part], list[Reset]]:
    count = ctx.hub.partitions
    reason = None
    if isinstance(after, LegacyId):
        reason = OLD_FORMAT
    elif after.epoch != epoch or len(after.positions) > count:
        reason = TOPIC_CHANGED
    starts = [
        None if reason is not None or isinstance(after, LegacyId) else after.position(p)
        for p in range(count)
    ]
    scans = await asyncio.gather(
        *(_forward_part(ctx, p, starts[p], n, wants, page, budget) for p in range(count))
    )
    parts = [part for part, _ in scans]
    if reason is not None:
        asked = after if isinstance(after, Cursor) else None
        resets = []
        for p, part in enumerate(parts):
            requested = asked.position(p) if asked is not None else None
            resets.append(Reset(p, requested, part.first_prev, reason))
        return parts, resets
    return parts, [r for _, r in scans if r is not None]
