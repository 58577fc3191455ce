"""Paging ``GET /crm-events/history`` forward to the newest event.

The end: the server answers a page with nothing after ``after`` with ``count`` 0 and
``next_after`` equal to ``after`` ("nothing newer yet"), or ``null`` when the page is empty
and no ``after`` was given. A page with fewer than ``n`` items is not the end: with a type
filter (or a token's ``crm_match``) the server bounds how much it scans per request, and
``next_after`` then moves past what it scanned even when it found nothing.

Progress is checked, not assumed: a page whose ``next_after`` equals the ``after`` asked
for ends the paging whatever its ``count`` and items say, so a server that keeps answering
the same page cannot hold the pager in a loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import CrmEventsClient
    from .models import Item


class HistoryPager:
    """``async for item in pager``: ``Event``s with their cursors, and a page's ``Reset``
    before that page's items. ``position`` is where the paging stands: after the last
    page, the cursor to stream on from."""

    def __init__(
        self, client: CrmEventsClient, after: str | None, types: str | None, page: int
    ) -> None:
        if page < 1:
            raise ValueError("page must be at least 1")
        self._client = client
        self._types = types
        self._page = page
        self.position = after
        self.pages = 0

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._items()

    async def _items(self) -> AsyncIterator[Item]:
        while True:
            after = self.position
            page = await self._client.history_page(after=after, n=self._page, types=self._types)
            self.pages += 1
            if page.reset is not None:
                yield page.reset
            for item in page.items:
                yield item
            if page.next_after is None or page.next_after == after:
                return
            self.position = page.next_after


def paginate(
    client: CrmEventsClient, after: str | None, types: str | None, page: int
) -> HistoryPager:
    return HistoryPager(client, after, types, page)
