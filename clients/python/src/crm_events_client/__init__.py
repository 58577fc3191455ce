"""Async client for the crm-events stream (``GET /crm-events``) and its history.

::

    async with stream(url, token=provider, store=FileCursorStore("cursor.txt")) as events:
        async for item in events:
            if isinstance(item, Reset):
                ...  # events were lost in item.partitions: resync what depends on them
            else:
                handle(item.event)
"""

from .api import history, stream
from .auth import Token, TokenProvider, jwt_expiry
from .backoff import Backoff
from .client import CrmEventsClient
from .cursor_store import (
    CallbackCursorStore,
    CursorStore,
    FileCursorStore,
    MemoryCursorStore,
    is_cursor,
)
from .errors import (
    ApiError,
    BadRequest,
    CrmEventsError,
    Forbidden,
    InvalidCursor,
    ProtocolError,
    ResetError,
    TokenProviderError,
    Unauthorized,
    Unavailable,
)
from .history import HistoryPager
from .models import Event, HistoryPage, Item, PartitionReset, Reset
from .stream import EventStream, OnInvalidCursor, OnReset

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Backoff",
    "BadRequest",
    "CallbackCursorStore",
    "CrmEventsClient",
    "CrmEventsError",
    "CursorStore",
    "Event",
    "EventStream",
    "FileCursorStore",
    "Forbidden",
    "HistoryPage",
    "HistoryPager",
    "InvalidCursor",
    "Item",
    "MemoryCursorStore",
    "OnInvalidCursor",
    "OnReset",
    "PartitionReset",
    "ProtocolError",
    "Reset",
    "ResetError",
    "Token",
    "TokenProvider",
    "TokenProviderError",
    "Unauthorized",
    "Unavailable",
    "__version__",
    "history",
    "is_cursor",
    "jwt_expiry",
    "stream",
]
