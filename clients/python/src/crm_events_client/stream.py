"""``EventStream``: ``GET /crm-events`` as an async iterator of ``Event | Reset`` that
reconnects and resumes by itself.

One connection at a time. The cursor sent on every (re)connect (``Last-Event-ID``) is the
id of the last item this iterator handed over (or dropped as a duplicate), so a reconnect
neither loses nor repeats anything: frames read but not yet handed over when a connection
is dropped are simply sent again by the server.

Reconnects:
* the stream ended or the connection broke: after a jittered, growing delay (``backoff``).
  The backoff starts over only after a connection that lasted ``stable_after_s``: one that
  the server accepts and ends at once counts as a failure, so delays keep growing;
* 408/429/5xx: the same, never sooner than Retry-After (jitter is added above it);
* ``event: auth_expired``: at once, with a token fresh from the provider, when the
  connection lasted ``stable_after_s`` (or a quarter of the token's lifetime, if shorter)
  and the new token is not already expired by its ``exp``. Otherwise it is premature (a
  provider handing out a token the server takes for expired): the reconnect waits the
  backoff, and ``auth_expired_limit`` (3) premature ones in a row raise ``Unauthorized``
  (``error == "auth_expired"``) instead of hammering the server;
* the token is near expiry (``proactive_refresh``): a new token is asked for while the
  stream goes on, then the stream reconnects at once with it. If the provider fails, the
  stream keeps the current token (still valid) and asks again later; when it really
  expires, ``auth_expired`` takes over;
* 401: once more at once with a fresh token from the provider; a second 401 in a row, or a
  401 with no provider, raises ``Unauthorized``;
* a token provider that raises: retried after the backoff (``max_attempts`` counts it).
400 ``invalid_cursor``: ``on_invalid_cursor`` (below). 400, 403 and other 4xx raise at
once (``BadRequest``, ``Forbidden``, ``ApiError``).

Bounded waits: the response headers and every read of the body wait at most
``idle_timeout_s``; an error answer's body is read up to 64 KiB within
``request_timeout_s``; an SSE line or event over 4 MiB raises ``ProtocolError``.

``on_invalid_cursor``: a cursor that cannot be one (``cursor_store.is_cursor``: e.g. a
damaged cursor file) or that the server answers ``400 invalid_cursor`` to raises
``InvalidCursor`` with ``"raise"`` (the default: nothing is skipped without you knowing);
``"restart"`` logs a warning and streams from now instead, accepting the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Literal

import aiohttp

from .backoff import Backoff
from .cursor_store import CursorStore, is_cursor
from .errors import (
    CrmEventsError,
    Forbidden,
    InvalidCursor,
    ProtocolError,
    ResetError,
    TokenProviderError,
    Unauthorized,
    error_from,
)
from .guard import DuplicateGuard
from .history import HistoryPager
from .models import Event, Item, Reset, event_from, reset_from
from .retry import NETWORK_ERRORS, pause, read_error_body
from .sse import SseMessage, SseParser

if TYPE_CHECKING:
    from .client import CrmEventsClient

log = logging.getLogger("crm_events_client")

OnReset = Literal["yield", "raise", "refetch"]
"""What a stream does with a reset: hand it over (``yield``, the default); raise
``ResetError`` (``raise``); or hand it over, then back-fill from history from the reset's
cursor before streaming on (``refetch``; see the README)."""
OnInvalidCursor = Literal["raise", "restart"]
"""What a stream does with a cursor that is not one, or that the server refuses as
``invalid_cursor``: raise ``InvalidCursor`` (``raise``, the default) or log it and stream
from now (``restart``)."""


class _Reconnect(Exception):
    """Internal: end this connection and open the next one."""

    def __init__(self, why: str, *, now: bool = False, auth_expired: bool = False) -> None:
        super().__init__(why)
        self.now = now
        self.auth_expired = auth_expired


class _Refetch(Exception):
    """Internal: leave the stream for history after a reset (``on_reset="refetch"``)."""


class EventStream:
    """``async for item in stream``: ``Event``s and ``Reset``s, for ever (or until you stop).

    ``cursor`` is the cursor of the last item handed over. With a ``store``, the cursor of an
    item is saved when you ask for the next item, or call ``commit()``: a consumer that dies
    while handling an item gets it again (at least once). Close with ``aclose()`` or use
    ``async with``; breaking out of ``async for`` alone leaves the connection open until the
    iterator is garbage-collected."""

    def __init__(
        self,
        client: CrmEventsClient,
        *,
        types: str | None,
        cursor: str | None,
        store: CursorStore | None,
        on_reset: OnReset,
        on_invalid_cursor: OnInvalidCursor = "raise",
        history_page_size: int = 100,
        owns_client: bool = False,
    ) -> None:
        if on_reset not in ("yield", "raise", "refetch"):
            raise ValueError(f"on_reset must be 'yield', 'raise' or 'refetch', not {on_reset!r}")
        if on_invalid_cursor not in ("raise", "restart"):
            raise ValueError(
                f"on_invalid_cursor must be 'raise' or 'restart', not {on_invalid_cursor!r}"
            )
        self._on_invalid_cursor = on_invalid_cursor
        self._client = client
        self._types = types
        self._store = store
        self._on_reset = on_reset
        self._page_size = history_page_size
        self._owns_client = owns_client
        self._start = cursor
        self.cursor: str | None = cursor
        """The cursor of the last item handed over (None before the first)."""
        self._unsaved: str | None = None
        self._resume: str | None = cursor
        self.guard = DuplicateGuard()
        self.connections = 0
        """Connections accepted so far (a 200 answer)."""
        self.reconnects: Counter[str] = Counter()
        """Why this stream reconnected, and how often (e.g. ``"the token expired"``)."""
        self.node: str | None = None
        """The edge serving the current connection (from its ``: node`` comment)."""
        self._gen = self._run()

    # -- the iterator protocol -------------------------------------------------------------

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Item:
        await self.commit()
        try:
            item = await self._gen.__anext__()
        except BaseException:
            await self._close_client()
            raise
        self.cursor = item.cursor or self.cursor
        self._unsaved = item.cursor
        return item

    async def commit(self) -> None:
        """Save the cursor of the last item handed over, if not saved yet (the iterator does
        this itself when you ask for the next item)."""
        if self._unsaved is not None and self._store is not None:
            cursor, self._unsaved = self._unsaved, None
            await self._store.save(cursor)

    async def aclose(self) -> None:
        """Close the connection (and the client, when this stream made it). The cursor of
        the last item is not saved: call ``commit()`` first if you handled it."""
        await self._gen.aclose()
        await self._close_client()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _close_client(self) -> None:
        if self._owns_client:
            await self._client.close()

    # -- connections ------------------------------------------------------------------------

    async def _run(self) -> AsyncGenerator[Item, None]:
        if self._resume is None and self._store is not None:
            self._resume = await self._store.load()
        if self._resume is not None and not is_cursor(self._resume):
            self._invalid_cursor(f"{self._resume[:80]!r} is not a cursor")
        self.cursor = self._resume
        client = self._client
        loop = asyncio.get_running_loop()
        backoff = client.backoff()
        refused_once = False  # a 401 already answered with a fresh token
        refresh = False
        premature: bool | None = None  # set by an auth_expired: was it too early?
        auth_failures = 0  # premature auth_expired in a row
        while True:
            opened: float | None = None
            lifetime: float | None = None
            try:
                if refresh:
                    await client.tokens.refresh()
                    refresh = False
                if premature is not None:
                    # The token this refresh brought is the answer to an auth_expired: one
                    # already expired by its own exp would only bring the next one.
                    too_early, premature = premature or client.tokens.expired(), None
                    if too_early:
                        auth_failures += 1
                        if auth_failures >= client.auth_expired_limit:
                            raise Unauthorized(
                                401,
                                "auth_expired",
                                f"the server ended {auth_failures} streams in a row as expired"
                                " right after they started: the token provider keeps"
                                " returning a token that is expired or about to be",
                            )
                        log.warning("premature auth_expired (%d in a row)", auth_failures)
                        await pause(
                            backoff,
                            client.max_attempts,
                            None,
                            Unauthorized(401, "auth_expired", "premature auth_expired"),
                        )
                    else:
                        auth_failures = 0
                async with await self._open() as resp:
                    if resp.status != 200:
                        body = await read_error_body(resp, client.request_timeout_s)
                        error = error_from(resp.status, body, resp.headers)
                        if isinstance(error, Unauthorized):
                            if not client.tokens.can_refresh or refused_once:
                                raise error
                            refused_once = refresh = True
                            continue
                        if isinstance(error, InvalidCursor) and self._resume is not None:
                            self._invalid_cursor(error.message, error)
                            continue
                        if not error.retriable:
                            raise error
                        await pause(backoff, client.max_attempts, error.retry_after_s, error)
                        continue
                    _check_content_type(resp)
                    refused_once = False
                    self.connections += 1
                    opened = loop.time()
                    lifetime = client.tokens.lifetime_s()
                    async with contextlib.aclosing(self._read(resp, backoff)) as items:
                        async for item in items:
                            yield item
                            if isinstance(item, Reset) and self._on_reset == "refetch":
                                raise _Refetch
                    raise _Reconnect("the stream ended")
            except _Refetch:
                async with contextlib.aclosing(self._refetch()) as backfill:
                    async for item in backfill:
                        yield item
            except _Reconnect as why:
                log.debug("reconnecting: %s", why)
                self.reconnects[str(why)] += 1
                stable = self._lasted(loop, opened, client.stable_after_s)
                if stable:
                    backoff.succeeded()
                    if not why.auth_expired:  # that one is judged after the refresh
                        auth_failures = 0  # "in a row": a connection that lasted ends it
                if why.auth_expired:
                    refresh = True
                    # A short token cannot last stable_after_s: a quarter of its life will do.
                    enough = client.stable_after_s
                    if lifetime is not None:
                        enough = min(enough, lifetime / 4)
                    premature = not self._lasted(loop, opened, enough)
                elif not why.now:
                    await pause(backoff, client.max_attempts, None, why)
            except TokenProviderError as exc:
                log.warning("%s; trying again", exc)
                refresh = True
                await pause(backoff, client.max_attempts, None, exc)
            except NETWORK_ERRORS as exc:
                log.debug("connection failed: %r", exc)
                if self._lasted(loop, opened, client.stable_after_s):
                    backoff.succeeded()
                    auth_failures = 0
                await pause(backoff, client.max_attempts, None, exc)

    @staticmethod
    def _lasted(loop: asyncio.AbstractEventLoop, opened: float | None, at_least: float) -> bool:
        return opened is not None and loop.time() - opened >= at_least

    def _invalid_cursor(self, why: str, error: InvalidCursor | None = None) -> None:
        """Apply ``on_invalid_cursor`` to the cursor about to be sent."""
        if self._on_invalid_cursor == "raise":
            raise error or InvalidCursor(400, "invalid_cursor", why)
        log.warning("invalid cursor (%s): streaming from now, events since it are skipped", why)
        self._resume = None
        self.cursor = None

    async def _open(self) -> aiohttp.ClientResponse:
        client = self._client
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self._resume:
            extra["Last-Event-ID"] = self._resume
        params = {"types": self._types} if self._types else {}
        # sock_read bounds the wait for the response headers (a server that accepts and
        # never answers) and for each read of the body, both at idle_timeout_s.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=client.connect_timeout_s, sock_read=client.idle_timeout_s
        )
        return await client.session().get(
            client.url,
            params=params,
            headers=await client.request_headers(extra),
            timeout=timeout,
        )

    def _deadline(self, loop: asyncio.AbstractEventLoop) -> tuple[float, bool]:
        """When the next read gives up, and whether that is the token's refresh time."""
        idle = loop.time() + self._client.idle_timeout_s
        due = self._client.tokens.refresh_due() if self._client.proactive_refresh else None
        if due is None:
            return idle, False
        renew = loop.time() + (due - time.time())
        return (renew, True) if renew < idle else (idle, False)

    async def _renew(self) -> bool:
        """Get the next token before this one expires; False (and a later try) when the
        provider fails: the current token is still good, so the stream goes on with it."""
        tokens = self._client.tokens
        try:
            await tokens.refresh()
        except TokenProviderError as exc:
            delay = tokens.renewal_failed()
            log.warning("%s; keeping the current token, next try in %.1f s", exc, delay)
            return False
        return True

    async def _read(
        self, resp: aiohttp.ClientResponse, backoff: Backoff
    ) -> AsyncGenerator[Item, None]:
        parser = SseParser()
        loop = asyncio.get_running_loop()
        while True:
            deadline, renew = self._deadline(loop)
            try:
                # Only the read is bounded, never the time the consumer holds an item.
                async with asyncio.timeout_at(deadline):
                    chunk = await resp.content.readany()
            except TimeoutError:
                if not renew:
                    raise _Reconnect("no keepalive from the server", now=True) from None
                if await self._renew():
                    raise _Reconnect("the token is about to expire", now=True) from None
                continue
            if not chunk:
                return
            messages = parser.feed(chunk)
            if parser.retry_ms is not None:
                backoff.base_s = parser.retry_ms / 1000
            for comment in parser.comments:
                if comment.startswith("node "):
                    self.node = comment.removeprefix("node ")
            parser.comments.clear()
            for message in messages:
                item = self._item(message)
                if item is not None:
                    yield item

    def _item(self, message: SseMessage) -> Item | None:
        if not message.has_data:
            # An id alone moves the cursor, as it would in a browser.
            self._resume = message.id
            return None
        if message.event == "message":
            if message.id is None:
                raise ProtocolError("an event without an id (cursor)")
            event = event_from(_json(message.data), message.id)
            self._resume = message.id
            if not self.guard.admit(event.partition, event.offset):
                log.warning(
                    "duplicate dropped: partition %d offset %d", event.partition, event.offset
                )
                return None
            return event
        if message.event == "reset":
            reset = reset_from(_json(message.data), message.id)
            if message.id is not None:
                self._resume = message.id
            self.guard.reset(reset)
            if self._on_reset == "raise":
                raise ResetError(reset)
            return reset
        if message.event == "auth_expired":
            raise _Reconnect("the token expired", now=True, auth_expired=True)
        return None  # another named event: not one this client knows

    async def _refetch(self) -> AsyncGenerator[Item, None]:
        """Back-fill from history after a reset, then let the stream go on from where the
        last page ended. History failing (it gives up after a few attempts, or answers
        what this client cannot read) is not the end: the stream replays the same events
        from where the back-fill stopped. Only 401/403 end it, as they would the stream."""
        pager = HistoryPager(self._client, self._resume, self._types, self._page_size)
        try:
            async for item in pager:
                if isinstance(item, Reset):
                    self.guard.reset(item)
                    yield item
                    continue
                self._resume = item.cursor
                if self.guard.admit(item.partition, item.offset):
                    yield item
        except (Unauthorized, Forbidden):
            raise
        except CrmEventsError as exc:
            log.warning("history back-fill failed (%s): the stream goes on from its cursor", exc)
            return
        if pager.position is not None:
            self._resume = pager.position


def _json(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"an event's data is not JSON: {exc}") from None


def _check_content_type(resp: aiohttp.ClientResponse) -> None:
    if resp.content_type != "text/event-stream":
        raise ProtocolError(f"expected text/event-stream, got {resp.content_type!r}")


__all__ = ["Event", "EventStream", "OnInvalidCursor", "OnReset"]
