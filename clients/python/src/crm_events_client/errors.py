"""The library's exceptions, and the mapping of an HTTP error answer onto them.

::

    CrmEventsError
    ├── ApiError            an HTTP error answer: ``status``, ``error`` (the JSON code), ``message``
    │   ├── BadRequest      400 (``invalid_cursor``, ``invalid_types``, ...): fix the request
    │   │   └── InvalidCursor   a cursor the server (or the client's own check) refuses
    │   ├── Unauthorized    401 with no way to a better token (none, or a fresh one refused too)
    │   └── Forbidden       403: the token does not grant what was asked; never retried
    ├── Unavailable         the server stayed unreachable or overloaded for max_attempts tries
    ├── TokenProviderError  the token provider raised (retried; seen as ``Unavailable.last``)
    ├── ResetError          a reset, with ``on_reset="raise"`` (``.reset`` holds it)
    └── ProtocolError       the server sent something this client cannot read

408, 429, every 5xx answer and lost connections are retried (``retriable``) and surface
only as ``Unavailable`` when the attempts allowed run out.

Retry-After is read in both of its forms (delta-seconds and an HTTP date) and clamped to
``MAX_RETRY_AFTER_S``: a broken proxy's "Retry-After: 86400000" must not park a client for
1000 days.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Reset

RETRIABLE_4XX = frozenset({408, 429})
"""The 4xx answers that say "later" rather than "wrong"; every 5xx is retried too."""
MAX_RETRY_AFTER_S = 300.0
"""The longest Retry-After honoured (longer ones are taken as this)."""


class CrmEventsError(Exception):
    """The root of this library's exceptions."""


class ProtocolError(CrmEventsError):
    """The server's answer does not follow the crm-events protocol."""


class ApiError(CrmEventsError):
    """An HTTP error answer, with the JSON body's ``error`` code and ``message``."""

    def __init__(
        self, status: int, error: str, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message
        self.retry_after_s = retry_after_s
        """The server's Retry-After, in seconds, when it sent one."""

    @property
    def retriable(self) -> bool:
        return self.status >= 500 or self.status in RETRIABLE_4XX


class BadRequest(ApiError):
    """400: the request itself is wrong (e.g. ``invalid_cursor``); retrying cannot help."""


class InvalidCursor(BadRequest):
    """400 ``invalid_cursor``: the server cannot read the cursor sent. Also raised before any
    request for a cursor that cannot be one (see ``cursor_store.is_cursor``), with status
    400 and the same ``error``, so that one ``except`` handles both."""


class Unauthorized(ApiError):
    """401, with no token provider or after a freshly provided token was refused too."""


class Forbidden(ApiError):
    """403: the token does not grant the requested event types."""


class Unavailable(CrmEventsError):
    """The server could not be reached or kept answering with retriable errors."""

    def __init__(self, message: str, last: BaseException | None = None) -> None:
        super().__init__(message)
        self.last = last


class TokenProviderError(CrmEventsError):
    """The token provider raised (the original exception is ``__cause__``), or returned an
    empty token. The stream and history calls retry it with backoff; it reaches the caller
    only as ``Unavailable.last`` when ``max_attempts`` run out."""


class ResetError(CrmEventsError):
    """A reset reached a stream opened with ``on_reset="raise"``."""

    def __init__(self, reset: Reset) -> None:
        super().__init__(f"reset ({reset.reason}): {reset.message}")
        self.reset = reset


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Retry-After in seconds, at most ``MAX_RETRY_AFTER_S``: delta-seconds, or an HTTP
    date (a date in the past is 0); None when absent or unreadable."""
    raw = headers.get("Retry-After", "").strip()
    if not raw:
        return None
    if raw.isascii() and raw.isdigit():
        # Compared as text length first: int() of a 400-digit string is fine, float() is inf.
        return min(float(int(raw)) if len(raw) < 12 else MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


def error_from(status: int, body: bytes, headers: Mapping[str, str]) -> ApiError:
    """The exception for an error answer. The product answers JSON ``{"error", "message"}``;
    a load balancer's own page (e.g. nginx's 502 HTML) gets ``http_<status>``."""
    error, message = f"http_{status}", body[:200].decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        error = parsed["error"]
        message = str(parsed.get("message", ""))
    cls = {400: BadRequest, 401: Unauthorized, 403: Forbidden}.get(status, ApiError)
    if status == 400 and error == "invalid_cursor":
        cls = InvalidCursor
    return cls(status, error, message, retry_after_s(headers))
