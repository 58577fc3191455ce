"""``CrmEventsClient``: one HTTP session, the token, and the retry policy, shared by the
stream and history calls made through it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .auth import DEFAULT_REFRESH_MARGIN_S, TokenProvider, TokenSource
from .backoff import DEFAULT_CAP_S, Backoff
from .cursor_store import CursorStore
from .errors import ProtocolError, TokenProviderError, Unauthorized, error_from
from .history import HistoryPager, paginate
from .models import HistoryPage, page_from
from .retry import NETWORK_ERRORS, pause, read_error_body
from .stream import EventStream, OnInvalidCursor, OnReset

CONNECT_TIMEOUT_S = 10.0
"""Connecting (TCP and TLS) to the server."""
IDLE_TIMEOUT_S = 45.0
"""A stream silent this long is taken for dead (the server sends a keepalive at least
every 15 s)."""
REQUEST_TIMEOUT_S = 30.0
"""A whole history request."""
STABLE_AFTER_S = 1.0
"""A stream connection that lasted this long resets the backoff; one that ends sooner (the
server closed it, the network dropped it, or an ``auth_expired`` came) counts as a failed
attempt, so a server that accepts and hangs up at once is not reconnected to in a loop."""
AUTH_EXPIRED_LIMIT = 3
"""Premature ``auth_expired`` in a row (see ``EventStream``) after which the stream raises
``Unauthorized``: the provider keeps returning a token the server takes for expired."""
HISTORY_ATTEMPTS = 6
"""A history request gives up after this many consecutive retriable failures unless
``max_attempts`` says otherwise (a stream, like EventSource, retries for ever by default)."""


def history_url(stream_url: str) -> str:
    """``…/crm-events`` → ``…/crm-events/history`` (the query string is dropped)."""
    parts = urlsplit(stream_url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/history", "", ""))


class CrmEventsClient:
    """The stream and history of one crm-events deployment.

    ``url`` is the stream's URL (``http://host:9010/crm-events``); history is ``url +
    "/history"``. ``token``: a bearer token, or a provider (see ``auth.TokenProvider``),
    or None where authentication is off. Use as ``async with CrmEventsClient(...) as c``,
    or call ``close()``; a ``session`` you pass is yours to close."""

    def __init__(
        self,
        url: str,
        *,
        token: str | TokenProvider | None = None,
        session: aiohttp.ClientSession | None = None,
        headers: Mapping[str, str] | None = None,
        proactive_refresh: bool = True,
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        backoff_cap_s: float = DEFAULT_CAP_S,
        max_attempts: int | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        stable_after_s: float = STABLE_AFTER_S,
        auth_expired_limit: int = AUTH_EXPIRED_LIMIT,
    ) -> None:
        if auth_expired_limit < 1:
            raise ValueError("auth_expired_limit must be at least 1")
        self.url = url
        self.history_url = history_url(url)
        self.tokens = TokenSource(token, refresh_margin_s)
        self.proactive_refresh = proactive_refresh
        self.backoff_cap_s = backoff_cap_s
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.stable_after_s = stable_after_s
        self.auth_expired_limit = auth_expired_limit
        self.extra_headers = dict(headers or {})
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> CrmEventsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, as aiohttp requires.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    def backoff(self) -> Backoff:
        return Backoff(cap_s=self.backoff_cap_s)

    async def request_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**self.extra_headers, **(await self.tokens.headers()), **(extra or {})}

    # -- the stream -----------------------------------------------------------------------

    def stream(
        self,
        *,
        types: list[str] | tuple[str, ...] | str | None = None,
        cursor: str | None = None,
        store: CursorStore | None = None,
        on_reset: OnReset = "yield",
        on_invalid_cursor: OnInvalidCursor = "raise",
        history_page_size: int = 100,
    ) -> EventStream:
        """The events after ``cursor`` (else the one ``store`` holds, else from now), then
        live ones, across reconnects; see ``EventStream``."""
        return EventStream(
            self,
            types=types_param(types),
            cursor=cursor,
            store=store,
            on_reset=on_reset,
            on_invalid_cursor=on_invalid_cursor,
            history_page_size=history_page_size,
        )

    # -- history --------------------------------------------------------------------------

    def history(
        self,
        *,
        after: str | None = None,
        types: list[str] | tuple[str, ...] | str | None = None,
        page: int = 100,
    ) -> HistoryPager:
        """Every stored event after ``after`` to the newest, page by page (``page`` items
        per request), as ``Event``s with their cursors; a page's ``reset`` comes as a
        ``Reset`` before its items. Without ``after``: the newest ``page`` events, then
        forward from there."""
        return paginate(self, after, types_param(types), page)

    async def history_page(
        self, *, after: str | None = None, n: int = 100, types: str | None = None
    ) -> HistoryPage:
        """One ``GET /crm-events/history`` (retried on 408/429/5xx, network errors and a
        failing token provider; a token renewed once on 401)."""
        params: dict[str, str] = {"n": str(n)}
        if after is not None:
            params["after"] = after
        if types:
            params["types"] = types
        return page_from(await self._get_json(self.history_url, params))

    async def _get_json(self, url: str, params: Mapping[str, str]) -> Any:
        backoff = self.backoff()
        refreshed = refresh = False
        attempts = self.max_attempts or HISTORY_ATTEMPTS
        timeout = aiohttp.ClientTimeout(
            total=self.request_timeout_s, sock_connect=self.connect_timeout_s
        )
        while True:
            try:
                if refresh:
                    await self.tokens.refresh()
                    refresh = False
                headers = await self.request_headers({"Accept": "application/json"})
            except TokenProviderError as exc:
                await pause(backoff, attempts, None, exc)
                continue
            try:
                async with self.session().get(
                    url, params=params, headers=headers, timeout=timeout
                ) as resp:
                    if resp.status == 200:
                        body = await resp.read()
                        try:
                            return json.loads(body)
                        except ValueError as exc:
                            raise ProtocolError(f"history answered invalid JSON: {exc}") from None
                    body = await read_error_body(resp, self.request_timeout_s)
                    error = error_from(resp.status, body, resp.headers)
            except NETWORK_ERRORS as exc:
                await pause(backoff, attempts, None, exc)
                continue
            if isinstance(error, Unauthorized) and self.tokens.can_refresh and not refreshed:
                refreshed = refresh = True
                continue
            if not error.retriable:
                raise error
            await pause(backoff, attempts, error.retry_after_s, error)


def types_param(types: list[str] | tuple[str, ...] | str | None) -> str | None:
    if types is None:
        return None
    if isinstance(types, str):
        return types or None
    return ",".join(types) or None
