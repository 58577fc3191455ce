"""SSE framing as pure functions over bytes.

Frames use ``\\n`` line ends (the spec allows LF, CRLF or CR; LF is the smallest). An event
frame is encoded once per event and the same bytes go to every client that wants it.
Divergence from aiohttp-sse's ``send``: that method frames per call and per client, which
is what the fan-out must avoid, so the edge writes these bytes directly.
"""

from __future__ import annotations

import json
from typing import Any

_FORBIDDEN = (b"\r", b"\n", b"\0")


class FrameError(ValueError):
    pass


def _check_field(name: str, value: bytes) -> None:
    if any(ch in value for ch in _FORBIDDEN):
        raise FrameError(f"SSE {name} must not contain CR, LF or NUL")


def event_frame(event_id: bytes, data: bytes) -> bytes:
    """One data event: ``id`` then a single ``data`` line. No ``event:`` name, so a plain
    ``EventSource.onmessage`` receives it."""
    _check_field("id", event_id)
    _check_field("data", data)
    return b"id: " + event_id + b"\ndata: " + data + b"\n\n"


def event_frame_trusted(event_id: bytes, data: bytes) -> bytes:
    """``event_frame`` without checks, for ids from Redis and data built by ``json.dumps``
    (which escapes every control character), on the hot path."""
    return b"id: " + event_id + b"\ndata: " + data + b"\n\n"


def control_frame(event: str, payload: dict[str, Any], event_id: bytes | None = None) -> bytes:
    """A named control event (e.g. ``reset``), which only listeners for that name receive."""
    name = event.encode("utf-8")
    _check_field("event", name)
    data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    head = b""
    if event_id is not None:
        _check_field("id", event_id)
        head = b"id: " + event_id + b"\n"
    return head + b"event: " + name + b"\ndata: " + data + b"\n\n"


def retry_frame(retry_ms: int) -> bytes:
    if retry_ms < 0:
        raise FrameError("retry must not be negative")
    return b"retry: %d\n\n" % retry_ms


def comment_frame(text: str) -> bytes:
    raw = text.encode("utf-8")
    _check_field("comment", raw)
    return b": " + raw + b"\n\n"
