"""Query and header parsing for the edge's endpoints (pure). Errors are ``ApiError`` 400s
with a machine code, so every bad value answers the same way."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import MultiMapping

from shared.cursor import Cursor, CursorError, decode_cursor, is_legacy_id
from shared.events import TYPE_RE
from shared.httpkit import ApiError

MAX_TYPES = 64
_DIGITS = re.compile(r"[0-9]{1,9}")
MAX_TYPES_PARAM_LEN = 8192


@dataclass(frozen=True, slots=True)
class LegacyId:
    """A stream id of the old single-stream layout (``<ms>-<seq>``): answered with one
    ``reset`` (reason ``old_format``), not a 400, so that an upgrade costs clients one reset."""

    text: str


Position = Cursor | LegacyId
"""Where a client stands: a cursor, or an id of the old layout."""


@dataclass(frozen=True, slots=True)
class StreamParams:
    last_event_id: Position | None
    types: frozenset[bytes] | None


@dataclass(frozen=True, slots=True)
class HistoryParams:
    n: int
    after: Position | None
    types: frozenset[bytes] | None


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise ApiError(400, "invalid_query", f"'{name}' is given more than once")
    return values[0] if values else None


class TooManyTypes(ApiError):
    """``types=`` lists more types than allowed (counted as a limit rejection)."""


def parse_types(raw: str | None, max_types: int = MAX_TYPES) -> frozenset[bytes] | None:
    if raw is None:
        return None
    if len(raw) > MAX_TYPES_PARAM_LEN:
        raise ApiError(400, "invalid_types", "'types' is too long")
    items = raw.split(",")
    if any(not TYPE_RE.fullmatch(item) for item in items):
        raise ApiError(
            400,
            "invalid_types",
            "'types' must be a comma-separated list of event types "
            "(letters, digits, '_', '.', ':', '-'; no empty items)",
        )
    if len(set(items)) > max_types:
        raise TooManyTypes(400, "invalid_types", f"'types' lists more than {max_types} types")
    return frozenset(item.encode() for item in items)


def parse_position(raw: str, name: str) -> Position:
    """A cursor (``shared/cursor.py``), or an old stream id; anything else is a 400
    ``invalid_cursor`` naming the parameter."""
    if is_legacy_id(raw):
        return LegacyId(raw)
    try:
        return decode_cursor(raw)
    except CursorError as exc:
        raise ApiError(400, "invalid_cursor", f"'{name}': {exc.detail}") from None


def parse_stream_params(
    query: MultiMapping[str], headers: Mapping[str, str], max_types: int = MAX_TYPES
) -> StreamParams:
    # The header wins: a browser sends it on every automatic reconnect with the newest id,
    # while the URL keeps the ?last_event_id= the page was loaded with.
    header = headers.get("Last-Event-ID", "").strip()
    from_query = _single(query, "last_event_id")
    # Both are validated: a malformed value is a 400 even where the other one would win.
    query_id = parse_position(from_query, "last_event_id") if from_query else None
    last = parse_position(header, "Last-Event-ID") if header else query_id
    return StreamParams(last, parse_types(_single(query, "types"), max_types))


def parse_history_params(
    query: MultiMapping[str], default_n: int, max_n: int, max_types: int = MAX_TYPES
) -> HistoryParams:
    raw_n = _single(query, "n")
    n = default_n
    if raw_n is not None:
        if not _DIGITS.fullmatch(raw_n) or not 1 <= int(raw_n) <= max_n:
            raise ApiError(400, "invalid_n", f"'n' must be an integer from 1 to {max_n}")
        n = int(raw_n)
    raw_after = _single(query, "after")
    after = parse_position(raw_after, "after") if raw_after is not None else None
    return HistoryParams(n, after, parse_types(_single(query, "types"), max_types))
