"""``GET /crm-events``: the SSE stream, with resume from a cursor and in-band reset."""

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
from shared.sse import control_frame

from .auth import CERT, TOKEN, TOKEN_AND_CERT, Grant
from .bus import BusUnavailable
from .context import EdgeContext
from .hub import Client
from .params import Position, TooManyTypes, parse_stream_params
from .replay import NotReady, Plan

EXPIRED_MESSAGES = {
    TOKEN: "the access token has expired",
    CERT: "the client certificate has expired",
    TOKEN_AND_CERT: "the access token or the client certificate has expired",
}

log = logging.getLogger(__name__)

READY_WAIT_S = 3.0

T = TypeVar("T")


async def _unless_closing(ctx: EdgeContext, awaitable: Awaitable[T]) -> T | None:
    """``awaitable``'s result, or None as soon as the edge starts shutting down.

    A request that passed the ``shutting_down`` check may still be waiting here (for
    readiness, for Redis to locate its position, or replaying from Redis) when SIGTERM's
    ``close_all`` runs; it must not wait on until the server cancels it at the grace
    deadline, but end its stream cleanly at once. The work is cancelled and awaited, so
    nothing it does overlaps with the end of the stream."""
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
    # It stops at its next await (a Redis read, a refill poll, a write's drain).
    await asyncio.wait((work,))
    if not work.cancelled():
        work.exception()  # retrieved: it failed as it was being stopped; nothing to add
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
    grant = await ctx.grant(request)
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
    last_event_id: Position | None,
    types: frozenset[bytes] | None,
    grant: Grant,
) -> web.StreamResponse:
    settings, metrics, hub = ctx.settings, ctx.metrics, ctx.hub
    await _wait_ready(ctx)
    plan: Plan | None = None
    if ctx.shutting_down:
        # SIGTERM came while this stream was being set up: it gets the preface and ends
        # at once below, so that the client reconnects elsewhere (an EventSource gives up
        # for good on an error status, but reconnects after a stream that ends).
        pass
    elif last_event_id is not None:
        try:
            plan = await _unless_closing(ctx, ctx.resumer.plan(last_event_id))
        except BusUnavailable as exc:
            raise ApiError(
                503,
                "redis_unavailable",
                "history is unavailable; retry shortly",
                {"Retry-After": "2"},
            ) from exc
        except NotReady as exc:
            raise ApiError(
                503,
                "not_ready",
                "the edge has not read the topic yet; retry shortly",
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
    head = hub.attach(client, plan.cursor if plan is not None else None)
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
        # The token was accepted until exp plus the leeway (edge/auth.py): so it lives. Ending
        # at exp would end a token accepted within the leeway at once, and its client would
        # reconnect with the same token, again and again.
        ends_at = grant.expires_at + settings.auth.leeway_s
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, ends_at - time.time()), client.close, "token_expired"
        )
    reason = "error"
    try:
        preface = ctx.preface
        if plan is not None:
            reset = plan.reset_frame()
            if reset is not None:
                preface += reset
        await response.write(preface)
        if plan is not None and not client.closed:
            started = time.monotonic()
            await _unless_closing(
                ctx, ctx.resumer.replay(plan, client, head, _ResponseWriter(response, client))
            )
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
                    # One machine code for clients whatever ran out; the text says which.
                    {"error": "token_expired", "message": EXPIRED_MESSAGES[grant.source]},
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


class _ResponseWriter:
    """The replay's way to the client: through the response, or, for a page shared by a
    reconnect storm, the pre-framed chunk straight to an idle transport."""

    __slots__ = ("_client", "_response")

    def __init__(self, response: EventSourceResponse, client: Client) -> None:
        self._response = response
        self._client = client

    async def write(self, data: bytes) -> None:
        await self._response.write(data)

    def write_shared(self, framed: bytes) -> bool:
        transport = self._client.transport
        if (
            transport is not None
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            # Skips a copy per client; at most this one page waits in the transport.
            transport.write(framed)
            return True
        return False
