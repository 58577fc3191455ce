"""The two one-call entry points, each with a client of its own."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from .auth import TokenProvider
from .client import CrmEventsClient, types_param
from .cursor_store import CursorStore
from .models import Item
from .stream import EventStream, OnInvalidCursor, OnReset


def stream(
    url: str,
    *,
    token: str | TokenProvider | None = None,
    types: list[str] | tuple[str, ...] | str | None = None,
    cursor: str | None = None,
    store: CursorStore | None = None,
    on_reset: OnReset = "yield",
    on_invalid_cursor: OnInvalidCursor = "raise",
    **options: Any,
) -> EventStream:
    """``async with stream(url, token=...) as events: async for item in events: ...``

    ``options`` are ``CrmEventsClient``'s (``proactive_refresh``, ``backoff_cap_s``,
    ``max_attempts``, ``session``, ...). The stream closes its client when closed."""
    client = CrmEventsClient(url, token=token, **options)
    return EventStream(
        client,
        types=types_param(types),
        cursor=cursor,
        store=store,
        on_reset=on_reset,
        on_invalid_cursor=on_invalid_cursor,
        owns_client=True,  # this stream made the client: closing it closes both
    )


async def history(
    url: str,
    *,
    token: str | TokenProvider | None = None,
    after: str | None = None,
    types: list[str] | tuple[str, ...] | str | None = None,
    page: int = 100,
    **options: Any,
) -> AsyncGenerator[Item, None]:
    """``async for item in history(url, after=cursor)``: stored events to the newest (see
    ``CrmEventsClient.history``)."""
    async with CrmEventsClient(url, token=token, **options) as client:
        async for item in client.history(after=after, types=types, page=page):
            yield item
