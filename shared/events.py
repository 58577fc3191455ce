"""The event model: turning a Kafka record value into an envelope or a dead letter (pure).

The envelope is the exact ``data:`` line every client receives, built once at ingest:

    {"type":"ContactCreated","key":"contact-42","partition":1,"offset":17,
     "timestamp_ms":1764410400000,"event":{...the original object, unchanged...}}

``event`` is the producer's object: parsing it gives back the same keys, order and values.
It gets there in one of two ways (the rule is the same for every record):

* **spliced**: the record value's own bytes are placed after ``"event":`` when the value
  starts with ``{`` and ends with ``}``, holds no CR or LF byte, has at most
  ``SPLICE_MAX_OPENERS`` ``{``/``[`` bytes, and orjson accepts it as JSON with a valid type
  (and no float among the match fields). JSON strings cannot hold a raw CR or LF, so such a
  value is already one line; spaces and tabs between tokens, escapes such as ``\\u00e9`` and
  number spellings such as ``1E5`` stay as the producer wrote them (all valid JSON).
  orjson rejects lone-surrogate escapes, NaN/Infinity, numbers overflowing a double and
  invalid UTF-8, so none of those is ever spliced.
* **re-serialised** (everything else: pretty-printed values, values with CR/LF, deeply
  nested ones, anything orjson refuses): parsed with the standard library exactly as before
  and written back compactly; a lone surrogate escape is re-emitted as an ASCII escape so the
  bytes stay valid UTF-8. Dead letters are always decided here, so their reasons and details
  do not depend on the fast path.

Either way the envelope is one line of valid UTF-8 JSON.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict, Unpack
from urllib.parse import quote, unquote

import orjson

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
        try:
            text = quote(str(value), safe="")
        except UnicodeEncodeError:
            # A lone surrogate escape ("\\ud800") is no text a claim could name; leaving the
            # field out means no claim on it matches (this used to stop the worker).
            continue
        parts.append(quote(name, safe="") + "=" + text)
    return "&".join(parts).encode() if parts else NO_MATCH


def parse_match(token: bytes) -> frozenset[tuple[str, str]]:
    if token == NO_MATCH or not token:
        return frozenset()
    pairs = []
    for part in token.decode().split("&"):
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return frozenset(pairs)


class RecordFields(TypedDict):
    """What is known of a record besides its value, and the rules it is checked against."""

    key: bytes | None
    partition: int
    offset: int
    timestamp_ms: int
    max_bytes: int
    type_fields: tuple[str, ...]
    match_fields: NotRequired[tuple[str, ...]]


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


SPLICE_MAX_OPENERS = 512
"""Values with more ``{``/``[`` bytes than this go the standard-library way, whose nesting
limit (the recursion limit) decides them as before; orjson's own limit is 1024."""

_HEAD = b'{"type":"%b",%b,"partition":%d,"offset":%d,"timestamp_ms":%d,"event":%b}'
_LBRACE, _RBRACE = 0x7B, 0x7D


def spliceable(value: bytes) -> bool:
    """Whether the value's bytes may go into the envelope as they are, once orjson has
    accepted them: one object on one line, not nested deeper than the limit."""
    return (
        value[0] == _LBRACE
        and value[-1] == _RBRACE
        and b"\n" not in value
        and b"\r" not in value
        and (
            len(value) <= 2 * SPLICE_MAX_OPENERS
            or value.count(b"{") + value.count(b"[") <= SPLICE_MAX_OPENERS
        )
    )


_NULL_KEY = b'"key":null'


def _key_fragment(key: bytes | None) -> bytes:
    if key is None:
        return _NULL_KEY
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return b'"key_b64":"' + base64.b64encode(key) + b'"'
    return b'"key":' + orjson.dumps(text)


def encode_event(
    value: bytes | None, **record: Unpack[RecordFields]
) -> tuple[bytes, bytes, bytes] | Dead:
    """``(type, envelope, match token)`` as bytes, or a dead letter (see ``encode_record``)."""
    return encode_record(
        value,
        record["key"],
        record["partition"],
        record["offset"],
        record["timestamp_ms"],
        record["max_bytes"],
        record["type_fields"],
        record.get("match_fields", ()),
    )


def encode_record(
    value: bytes | None,
    key: bytes | None,
    partition: int,
    offset: int,
    timestamp_ms: int,
    max_bytes: int,
    type_fields: tuple[str, ...],
    match_fields: tuple[str, ...],
) -> tuple[bytes, bytes, bytes] | Dead:
    """The hot path of ingest: ``(type, envelope, match token)`` as bytes, or a dead letter.
    Positional, as ingest calls it once per record.

    Splices the value when it may (see the module docstring), else falls back to the
    standard-library path, which gives exactly the same verdicts as before."""
    if value and len(value) <= max_bytes and spliceable(value):
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict:
            event_type: object = None
            for name in type_fields:
                if name in obj:
                    event_type = obj[name]
                    break
            if type(event_type) is str and TYPE_RE.fullmatch(event_type):
                for name in match_fields:
                    # orjson turns integers beyond 64 bits into floats; the standard library
                    # keeps them exact, and a match token must not depend on the path taken.
                    if type(obj.get(name)) is float:
                        break
                else:
                    type_bytes = event_type.encode()
                    data = _HEAD % (
                        type_bytes,
                        _NULL_KEY if key is None else _key_fragment(key),
                        partition,
                        offset,
                        timestamp_ms,
                        value,
                    )
                    return type_bytes, data, match_token(obj, match_fields)
    outcome = decode_with_stdlib(
        value,
        key=key,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        max_bytes=max_bytes,
        type_fields=type_fields,
        match_fields=match_fields,
    )
    if isinstance(outcome, Dead):
        return outcome
    return outcome.type.encode(), outcome.data, outcome.match


def decode_record(value: bytes | None, **record: Unpack[RecordFields]) -> Envelope | Dead:
    """Validate one Kafka record value and build its envelope, or say why it is dead."""
    outcome = encode_event(value, **record)
    if isinstance(outcome, Dead):
        return outcome
    type_bytes, data, match = outcome
    return Envelope(type=type_bytes.decode(), data=data, match=match)


def decode_with_stdlib(value: bytes | None, **record: Unpack[RecordFields]) -> Envelope | Dead:
    """The standard-library path: decides every dead letter, and re-serialises."""
    max_bytes, type_fields = record["max_bytes"], record["type_fields"]
    match_fields = record.get("match_fields", ())
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
    key_name, key_value = _encode_key(record["key"])
    envelope = {
        "type": event_type,
        key_name: key_value,
        "partition": record["partition"],
        "offset": record["offset"],
        "timestamp_ms": record["timestamp_ms"],
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
