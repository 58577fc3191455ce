"""``GET /crm-events/history``: stored events as JSON, oldest to newest, with cursor paging."""

from __future__ import annotations

import json

from aiohttp import web

from shared.httpkit import ApiError
from shared.ids import StreamId

from .bus import BusUnavailable, Entry
from .context import EdgeContext
from .params import parse_history_params
from .resume import Reset, check_position

# Bounds the work of one filtered request on a stream where the wanted types are rare.
SCAN_FACTOR = 10


def _item(entry: Entry) -> bytes:
    # The stored envelope is a JSON object; splice the id in front instead of re-encoding.
    return b'{"id":"' + entry.id_bytes + b'",' + entry.data[1:]


async def _latest(
    ctx: EdgeContext, n: int, types: frozenset[bytes] | None
) -> tuple[list[Entry], bool]:
    page = max(n, min(ctx.settings.resume_page, n * SCAN_FACTOR)) if types else n
    budget = n * SCAN_FACTOR
    picked: list[Entry] = []
    before: StreamId | None = None
    scanned = 0
    while len(picked) < n:
        rows = await ctx.bus.read_before(before, page)
        if not rows:
            return picked[::-1], True
        scanned += len(rows)
        picked.extend(e for e in rows if types is None or e.type in types)
        before = rows[-1].id
        if len(rows) < page:
            return picked[:n][::-1], True
        if scanned >= budget:
            return picked[:n][::-1], False
    return picked[:n][::-1], False


async def _after(
    ctx: EdgeContext, after: StreamId, n: int, types: frozenset[bytes] | None
) -> tuple[list[Entry], StreamId]:
    """Entries after the cursor, and the cursor for the next page (the last id scanned,
    so a filtered page never rescans what it skipped)."""
    page = max(n, min(ctx.settings.resume_page, n * SCAN_FACTOR)) if types else n
    budget = n * SCAN_FACTOR
    picked: list[Entry] = []
    cursor = after
    scanned = 0
    while len(picked) < n and scanned < budget:
        rows = await ctx.bus.read_after(cursor, page)
        if not rows:
            break
        for entry in rows:
            if types is None or entry.type in types:
                picked.append(entry)
                if len(picked) == n:
                    return picked, entry.id
        scanned += len(rows)
        cursor = rows[-1].id
        if len(rows) < page:
            break
    return picked, cursor


async def history_handler(request: web.Request, ctx: EdgeContext) -> web.Response:
    params = parse_history_params(
        request.query, ctx.settings.history_default_n, ctx.settings.history_max_n
    )
    reset_json = b"null"
    try:
        if params.after is None:
            entries, _complete = await _latest(ctx, params.n, params.types)
            next_after = entries[-1].id if entries else None
        else:
            decision = check_position(params.after, await ctx.bus.info())
            start = params.after
            if isinstance(decision, Reset):
                reset_json = json.dumps(decision.payload(), separators=(",", ":")).encode()
                start = decision.after
            entries, cursor = await _after(ctx, start, params.n, params.types)
            next_after = cursor
    except BusUnavailable as exc:
        raise ApiError(
            503, "redis_unavailable", "history is unavailable; retry shortly", {"Retry-After": "2"}
        ) from exc
    body = (
        b'{"items":['
        + b",".join(_item(e) for e in entries)
        + b'],"count":%d' % len(entries)
        + b',"next_after":'
        + (b'"' + next_after.encode() + b'"' if next_after else b"null")
        + b',"reset":'
        + reset_json
        + b"}"
    )
    return web.Response(body=body, content_type="application/json")
