"""``GET /crm-events/history``: stored events as JSON, oldest to newest, with cursor paging."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from shared.httpkit import ApiError
from shared.ids import StreamId

from .bus import BusUnavailable, Entry
from .context import EdgeContext
from .params import TooManyTypes, parse_history_params
from .resume import Reset, check_position
from .ring import ReplayRing

# Bounds the work of one filtered request on a stream where the wanted types are rare.
SCAN_FACTOR = 10


def _item(entry: Entry) -> bytes:
    # The stored envelope is a JSON object; splice the id in front instead of re-encoding.
    return b'{"id":"' + entry.id_bytes + b'",' + entry.data[1:]


Wants = Callable[[Entry], bool] | None


def _scan(ctx: EdgeContext, n: int, wants: Wants) -> tuple[int, int]:
    """Entries per read, and how many a request may look at: ``n * SCAN_FACTOR`` rounded up
    to whole reads (the ring looks at exactly as many, so both answer the same)."""
    page = max(n, min(ctx.settings.resume_page, n * SCAN_FACTOR)) if wants else n
    budget = -(-n * SCAN_FACTOR // page) * page
    return page, budget


async def _latest(ctx: EdgeContext, n: int, wants: Wants) -> list[Entry]:
    """The newest ``n`` matching entries, oldest first. A filtered scan stops after
    ``n * SCAN_FACTOR`` entries, so a rare type returns fewer rather than scanning forever."""
    page, budget = _scan(ctx, n, wants)
    picked: list[Entry] = []
    before: StreamId | None = None
    scanned = 0
    while len(picked) < n and scanned < budget:
        rows = await ctx.bus.read_before(before, page)
        scanned += len(rows)
        picked.extend(e for e in rows if wants is None or wants(e))
        if len(rows) < page:
            break
        before = rows[-1].id
    return picked[:n][::-1]


async def _after(
    ctx: EdgeContext, after: StreamId, n: int, wants: Wants
) -> tuple[list[Entry], StreamId]:
    """Entries after the cursor, and the cursor for the next page (the last id scanned,
    so a filtered page never rescans what it skipped)."""
    page, budget = _scan(ctx, n, wants)
    picked: list[Entry] = []
    cursor = after
    scanned = 0
    while len(picked) < n and scanned < budget:
        rows = await ctx.bus.read_after(cursor, page)
        if not rows:
            break
        for entry in rows:
            if wants is None or wants(entry):
                picked.append(entry)
                if len(picked) == n:
                    return picked, entry.id
        scanned += len(rows)
        cursor = rows[-1].id
        if len(rows) < page:
            break
    return picked, cursor


def _after_in_ring(
    ring: ReplayRing, after: StreamId, n: int, wants: Wants, budget: int
) -> tuple[list[Entry], StreamId]:
    """``_after`` over the ring (which holds every entry after ``after``), same cursor rule."""
    rows = ring.after(after, None, budget)
    if wants is None:
        picked = rows[:n]
        return picked, (picked[-1].id if picked else after)
    out: list[Entry] = []
    for entry in rows:
        if wants(entry):
            out.append(entry)
            if len(out) == n:
                return out, entry.id
    return out, (rows[-1].id if rows else after)


def _predicate(types: frozenset[bytes] | None, required: frozenset[tuple[str, str]]) -> Wants:
    if types is None and not required:
        return None
    return lambda e: (types is None or e.type in types) and required <= e.match


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
    grant = ctx.grant(request)
    types = ctx.narrow(grant, params.types)
    ctx.history_rate.take(ctx.client_ip(request))
    wants = _predicate(types, grant.match)
    ring = ctx.hub.ring
    key = (ring.generation, ring.last, params.n, params.after, types, grant.match)
    cached = ctx.history_bodies.get(key) if ring.floor is not None else None
    if cached is not None:
        ctx.metrics.ring_hits.inc()
        return web.Response(body=cached, content_type="application/json")
    from_ring: tuple[list[Entry], StreamId | None] | None = None
    _, budget = _scan(ctx, params.n, wants)
    if params.after is None:
        latest = ring.newest(params.n, wants, budget)
        if latest is not None:
            from_ring = latest, (latest[-1].id if latest else None)
    elif ring.covers(params.after):
        from_ring = _after_in_ring(ring, params.after, params.n, wants, budget)
    if from_ring is not None:
        ctx.metrics.ring_hits.inc()
        body = _body(from_ring[0], from_ring[1], b"null")
        ctx.history_bodies.put(key, body)
        return web.Response(body=body, content_type="application/json")
    ctx.metrics.ring_misses.inc()
    reset_json = b"null"
    next_after: StreamId | None
    try:
        if params.after is None:
            entries = await _latest(ctx, params.n, wants)
            next_after = entries[-1].id if entries else None
        else:
            decision = check_position(params.after, await ctx.bus.info())
            start = params.after
            if isinstance(decision, Reset):
                reset_json = json.dumps(decision.payload(), separators=(",", ":")).encode()
                start = decision.after
            entries, cursor = await _after(ctx, start, params.n, wants)
            next_after = cursor
    except BusUnavailable as exc:
        raise ApiError(
            503, "redis_unavailable", "history is unavailable; retry shortly", {"Retry-After": "2"}
        ) from exc
    body = _body(entries, next_after, reset_json)
    return web.Response(body=body, content_type="application/json")


def _body(entries: list[Entry], next_after: StreamId | None, reset_json: bytes) -> bytes:
    return (
        b'{"items":['
        + b",".join([_item(e) for e in entries])
        + b'],"count":%d' % len(entries)
        + b',"next_after":'
        + (b'"' + next_after.encode() + b'"' if next_after else b"null")
        + b',"reset":'
        + reset_json
        + b"}"
    )
