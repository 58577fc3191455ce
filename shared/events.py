"""The event model: turning a Kafka record value into an envelope or a dead letter (pure).

The envelope is the exact ``data:`` line every client receives, built once at ingest:

    {"type":"ContactCreated","key":"contact-42","partition":1,"offset":17,
     "timestamp_ms":1764410400000,"event":{...the original object, unchanged...}}

The original object is re-serialised compactly (one line, as SSE requires); parsing
``event`` gives back the producer's object with the same keys, order and values.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote

# Types become filter keys and label-free log fields, so keep them to a safe alphabet.
TYPE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


NO_MATCH = b"-"


def match_token(obj: dict[str, Any], fields: tuple[str, ...]) -> bytes:
    """Scalar values of ``fields`` as one space-free token, for claim filtering at the edge."""
    parts = []
    for name in fields:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            continue
        parts.append(quote(name, safe="") + "=" + quote(str(value), safe=""))
    return "&".join(parts).encode() if parts else NO_MATCH


def parse_match(token: bytes) -> frozenset[tuple[str, str]]:
    if token == NO_MATCH or not token:
        return frozenset()
    pairs = []
    for part in token.decode().split("&"):
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return frozenset(pairs)


class DeadReason(StrEnum):
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_TYPE = "missing_type"
    BAD_TYPE = "bad_type"


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    data: bytes
    """Compact one-line JSON envelope, UTF-8."""
    match: bytes = NO_MATCH
    """The event's match fields as ``field=value&...`` (percent-encoded), or ``-``."""


@dataclass(frozen=True, slots=True)
class Dead:
    reason: DeadReason
    detail: str


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would re-emit invalid JSON to browsers.
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400 is JSON, but as a float it becomes inf, which would be re-emitted as the
        # non-JSON token Infinity.
        raise ValueError(f"number {text[:40]} is out of the range of a double")
    return value


def _encode_key(key: bytes | None) -> tuple[str, Any]:
    if key is None:
        return "key", None
    try:
        return "key", key.decode("utf-8")
    except UnicodeDecodeError:
        return "key_b64", base64.b64encode(key).decode("ascii")


def decode_record(
    value: bytes | None,
    *,
    key: bytes | None,
    partition: int,
    offset: int,
    timestamp_ms: int,
    max_bytes: int,
    type_fields: tuple[str, ...],
    match_fields: tuple[str, ...] = (),
) -> Envelope | Dead:
    """Validate one Kafka record value and build its envelope, or say why it is dead."""
    if value is None or len(value) == 0:
        return Dead(DeadReason.EMPTY, "the record has no value (tombstone or empty)")
    if len(value) > max_bytes:
        return Dead(DeadReason.TOO_LARGE, f"value is {len(value)} bytes, the limit is {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Dead(DeadReason.NOT_UTF8, f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except (ValueError, RecursionError) as exc:
        return Dead(DeadReason.NOT_JSON, str(exc)[:200])
    if not isinstance(obj, dict):
        return Dead(
            DeadReason.NOT_OBJECT, f"the JSON value is a {type(obj).__name__}, not an object"
        )
    event_type: object = None
    for name in type_fields:
        if name in obj:
            event_type = obj[name]
            break
    if event_type is None:
        return Dead(DeadReason.MISSING_TYPE, f"none of the type fields {list(type_fields)} is set")
    if not isinstance(event_type, str) or not TYPE_RE.fullmatch(event_type):
        return Dead(
            DeadReason.BAD_TYPE, f"type {str(event_type)[:80]!r} does not match {TYPE_RE.pattern}"
        )
    key_name, key_value = _encode_key(key)
    envelope = {
        "type": event_type,
        key_name: key_value,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
        "event": obj,
    }
    try:
        try:
            data = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # A lone surrogate escape ("\\ud800") parses but cannot be UTF-8 encoded; ASCII
            # escaping keeps the same JSON value.
            data = json.dumps(envelope, separators=(",", ":")).encode("ascii")
    except RecursionError:
        # Nesting just under the parser's limit parses, but the envelope adds two levels.
        return Dead(DeadReason.NOT_JSON, "the JSON value is nested too deeply")
    return Envelope(type=event_type, data=data, match=match_token(obj, match_fields))
