"""``GET /crm-events``: the SSE stream, with resume and in-band reset."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from shared.httpkit import ApiError
from shared.ids import StreamId
from shared.sse import control_frame

from .auth import Grant
from .bus import BusUnavailable
from .context import EdgeContext
from .hub import Client, http_chunk
from .params import TooManyTypes, parse_stream_params
from .resume import Reset, Resume, check_position

log = logging.getLogger(__name__)

READY_WAIT_S = 3.0

T = TypeVar("T")


async def _unless_closing(ctx: EdgeContext, awaitable: Awaitable[T]) -> T | None:
    """``awaitable``'s result, or None as soon as the edge starts shutting down.

    A request that passed the ``shutting_down`` check may still be waiting here (for
    readiness, or for Redis to locate its position) when SIGTERM's ``close_all`` runs; it
    must not wait on, then attach and stream until the server cancels it."""
    if ctx.shutting_down:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        return None
    work = asyncio.ensure_future(awaitable)
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        done, _ = await asyncio.wait((work, closing), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()  # the ready wait's timeout, or the request went away
        raise
    finally:
        closing.cancel()
    if work in done:
        return work.result()
    work.cancel()
    return None


async def _wait_ready(ctx: EdgeContext) -> None:
    if ctx.subscription.ready.is_set():
        return
    # A just-restarted edge, or one riding out a Redis blip: hold the request briefly
    # rather than fail a browser's EventSource, which does not retry after an error status.
    try:
        async with asyncio.timeout(READY_WAIT_S):
            await _unless_closing(ctx, ctx.subscription.ready.wait())
    except TimeoutError:
        raise ApiError(
            503,
            "not_ready",
            "the edge is not connected to Redis; retry shortly",
            {"Retry-After": "2"},
        ) from None


async def stream_handler(request: web.Request, ctx: EdgeContext) -> web.StreamResponse:
    settings, metrics = ctx.settings, ctx.metrics
    try:
        params = parse_stream_params(request.query, request.headers, settings.limits.max_types)
    except TooManyTypes:
        metrics.limit_rejections.labels(limit="types").inc()
        raise
    grant = ctx.grant(request)
    types = ctx.narrow(grant, params.types)
    if ctx.shutting_down:
        raise ApiError(503, "shutting_down", "this edge is shutting down", {"Retry-After": "1"})
    ip = ctx.client_ip(request)
    ctx.connections.acquire(ip)
    try:
        return await _serve(request, ctx, params.last_event_id, types, grant)
    finally:
        ctx.connections.release(ip)


async def _serve(
    request: web.Request,
    ctx: EdgeContext,
    last_event_id: StreamId | None,
    types: frozenset[bytes] | None,
    grant: Grant,
) -> web.StreamResponse:
    settings, metrics, hub = ctx.settings, ctx.metrics, ctx.hub
    await _wait_ready(ctx)
    decision: Resume | Reset | None = None
    if ctx.shutting_down:
        # SIGTERM came while this stream was being set up: it gets the preface and ends
        # at once below, so that the client reconnects elsewhere (an EventSource gives up
        # for good on an error status, but reconnects after a stream that ends).
        pass
    elif last_event_id is not None and hub.ring.covers(last_event_id):
        # Everything after it is in memory: gap-free without asking Redis.
        metrics.ring_hits.inc()
        decision = Resume(last_event_id)
    elif last_event_id is not None:
        metrics.ring_misses.inc()
        try:
            info = await _unless_closing(ctx, ctx.bus.info())
            decision = check_position(last_event_id, info) if info is not None else None
        except BusUnavailable as exc:
            raise ApiError(
                503,
                "redis_unavailable",
                "history is unavailable; retry shortly",
                {"Retry-After": "2"},
            ) from exc

    if request.transport is None or request.transport.is_closing():
        # The peer left while we looked at its position; aiohttp-sse would assert on it.
        raise ConnectionResetError("the client went away before its stream started")
    response = EventSourceResponse(sep="\n", ping_interval=settings.ping_interval_s)
    await response.prepare(request)
    transport = request.transport

    def abort() -> None:
        if transport is not None:
            transport.abort()

    client = Client(types, settings.client_buffer_bytes, abort, grant.match)
    if transport is not None and response.headers.get("Transfer-Encoding") == "chunked":
        # The hub may then frame and write live batches itself (see Client.push).
        client.transport = transport
    resume_after = decision.after if decision is not None else None
    head = hub.attach(client, resume_after)
    if ctx.shutting_down:
        # on_shutdown's close_all ran while this stream was being set up; nothing awaits
        # between attach and this check, so no stream can slip past both.
        client.close("shutdown")
    metrics.clients.inc()
    metrics.connections.inc()
    # The ping task ends when the peer goes away; that must wake this handler too.
    closer = asyncio.ensure_future(response.wait())
    closer.add_done_callback(lambda _: client.close("client_closed"))
    expiry: asyncio.TimerHandle | None = None
    if grant.expires_at is not None:
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, grant.expires_at - time.time()), client.close, "token_expired"
        )
    reason = "error"
    try:
        preface = ctx.preface
        if isinstance(decision, Reset):
            metrics.resumed_with_reset.inc()
            metrics.resets.labels(reason=decision.reason).inc()
            preface += control_frame("reset", decision.payload(), decision.after.encode())
        elif decision is not None:
            metrics.resumed.inc()
        await response.write(preface)
        if decision is not None and decision.after < head:
            started = time.monotonic()
            await _replay(ctx, response, client, decision.after, head)
            log.debug("replayed", extra={"seconds": round(time.monotonic() - started, 4)})
        while True:
            if client.closed:
                break
            data, ts_ms = client.take()
            if data:
                await response.write(data)
                if ts_ms:
                    metrics.latency.observe(max(0.0, (hub.clock_ms() - ts_ms) / 1000.0))
                continue
            client.direct = True
            try:
                await client.wait()
            finally:
                client.direct = False
        reason = client.close_reason or "error"
        if reason == "token_expired":
            # Tell the client why before the stream ends, so it renews its token rather
            # than reconnect with the expired one.
            await response.write(
                control_frame(
                    "auth_expired",
                    {"error": "token_expired", "message": "the access token has expired"},
                )
            )
    except (ConnectionResetError, BrokenPipeError):
        reason = client.close_reason or "client_closed"
    except asyncio.CancelledError:
        # The server cancels the handler when the peer disconnects (handler_cancellation).
        reason = client.close_reason or "client_closed"
        raise
    except BusUnavailable:
        reason = "error"
        log.warning("replay failed: redis unavailable")
    finally:
        if expiry is not None:
            expiry.cancel()
        hub.detach(client)
        metrics.clients.dec()
        metrics.disconnects.labels(reason=reason).inc()
        if reason == "slow":
            log.info("slow client disconnected", extra={"peer": request.remote})
        with contextlib.suppress(RuntimeError):
            response.stop_streaming()
        closer.cancel()
    return response


async def _replay(
    ctx: EdgeContext, response: EventSourceResponse, client: Client, after: StreamId, head: StreamId
) -> None:
    """Send the stored entries in ``(after, head]``, from the replay ring while it holds
    them, else from Redis; live entries after ``head`` are already collecting in the
    client's buffer."""
    cursor = after
    page = ctx.settings.resume_page
    ring = ctx.hub.ring
    while cursor < head and not client.closed:
        if ring.covers(cursor):
            key = (ring.generation, cursor, head, client.group)
            cached = ctx.replay_pages.get(key)
            if cached is None:
                entries = ring.after(cursor, head, page)
                if not entries:
                    break
                frames = [e.frame for e in entries if client.wants(e)]
                data = b"".join(frames)
                cached = (data, http_chunk(data) if frames else b"", entries[-1].id, len(frames))
                ctx.replay_pages.put(key, cached)
            data, framed, cursor, count = cached
            transport = client.transport
            if (
                framed
                and transport is not None
                and not transport.get_write_buffer_size()
                and not transport.is_closing()
            ):
                # A reconnect storm: thousands of clients get the very same page; writing
                # the shared, pre-framed bytes skips a copy per client. At most this one
                # page waits in the transport: the next write drains through aiohttp.
                transport.write(framed)
                ctx.metrics.replayed.inc(count)
                continue
        else:
            entries = await ctx.bus.read_after(cursor, page, until=head)
            if not entries:
                break
            cursor = entries[-1].id
            frames = [e.frame for e in entries if client.wants(e)]
            data, count = b"".join(frames), len(frames)
        if data:
            await response.write(data)
            ctx.metrics.replayed.inc(count)
