"""The ingest <-> edge contract in Redis, in one place: key names, stream field names, and
the live line (its encoder and its parser).

Ingest writes through ``apply_batch.lua``, which cannot import Python: the writer passes the
field names below as script arguments, so the script names no field itself. The edge reads
with ``parse_live_line`` and ``parse_event_fields``; both check what they read, because the
channel and the stream are shared with anyone who can reach Redis, and one malformed line
must never stop an edge (or inject SSE fields into a client's stream).

Stream entry of an event (``<prefix>:stream``)::

    t <type>  ts <kafka timestamp ms>  m <match token>  d <envelope JSON>

Live line (``<prefix>:live``, one message per batch, lines joined by ``\\n``)::

    <stream id> <type> <kafka ts ms> <match token> <envelope JSON>

Ids, types, timestamps and match tokens hold no spaces; the envelope is one line of JSON
and the last field, so it may hold spaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

from shared.events import NO_MATCH
from shared.keys import RedisKeys

__all__ = [
    "DEAD_FIELDS",
    "EVENT_FIELDS",
    "FIELD_DATA",
    "FIELD_MATCH",
    "FIELD_TS",
    "FIELD_TYPE",
    "LIVE_FIELD_COUNT",
    "NO_MATCH",
    "ContractError",
    "LiveLine",
    "RedisKeys",
    "encode_live_line",
    "encode_live_payload",
    "parse_event_fields",
    "parse_live_line",
    "split_live_payload",
]

FIELD_TYPE: Final = "t"
FIELD_TS: Final = "ts"
FIELD_MATCH: Final = "m"
FIELD_DATA: Final = "d"
EVENT_FIELDS: Final = (FIELD_TYPE, FIELD_TS, FIELD_MATCH, FIELD_DATA)
"""An event's stream fields, in the order the script writes them."""
DEAD_FIELDS: Final = ("topic", "partition", "offset", "reason", "detail", "value")
"""A dead letter's stream fields (``<prefix>:dead``), in the order the script writes them."""

_T, _TS, _M, _D = (name.encode() for name in EVENT_FIELDS)

LIVE_FIELD_COUNT: Final = 5
LIVE_SEPARATOR: Final = b" "
LINE_SEPARATOR: Final = b"\n"
_MAX_ID_DIGITS = 20  # a 64-bit number


class ContractError(ValueError):
    """Something read from Redis does not follow the contract; ``detail`` says how."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class LiveLine(NamedTuple):
    id: bytes
    type: bytes
    ts_ms: int
    match: bytes
    envelope: bytes


def encode_live_line(id_: bytes, type_: bytes, ts_ms: int, match: bytes, envelope: bytes) -> bytes:
    """One live line (what the script builds in Lua; used by tests and documentation)."""
    return b"%s %s %d %s %s" % (id_, type_, ts_ms, match, envelope)


def encode_live_payload(lines: Iterable[bytes]) -> bytes:
    return LINE_SEPARATOR.join(lines)


def split_live_payload(payload: bytes) -> list[bytes]:
    return payload.split(LINE_SEPARATOR)


def check_id(raw: bytes) -> bytes:
    ms, sep, seq = raw.partition(b"-")
    if not (
        sep
        and ms.isdigit()
        and seq.isdigit()
        and len(ms) <= _MAX_ID_DIGITS
        and len(seq) <= _MAX_ID_DIGITS
    ):
        raise ContractError("the id is not <ms>-<seq>")
    return raw


def _check_ts(raw: bytes) -> int:
    # Kafka writes -1 for a record without a timestamp (old message format).
    digits = raw[1:] if raw[:1] == b"-" else raw
    if not digits.isdigit() or len(digits) > _MAX_ID_DIGITS:
        raise ContractError("the timestamp is not an integer")
    return int(raw)


def _check_common(type_: bytes, match: bytes, envelope: bytes) -> None:
    if not type_:
        raise ContractError("the type is empty")
    if not match.isascii():
        raise ContractError("the match token is not ASCII")
    # The envelope becomes an SSE data: line as is; a CR or LF in it would end the line
    # and let the rest be read as SSE fields.
    if envelope[:1] != b"{" or envelope[-1:] != b"}":
        raise ContractError("the envelope is not a JSON object")
    if b"\r" in envelope or b"\n" in envelope:
        raise ContractError("the envelope holds a line break")


def parse_live_line(line: bytes) -> LiveLine:
    """One live line, checked; raises ``ContractError`` saying what is wrong."""
    parts = line.split(LIVE_SEPARATOR, LIVE_FIELD_COUNT - 1)
    if len(parts) != LIVE_FIELD_COUNT:
        raise ContractError(
            f"{len(parts)} space-separated fields, expected {LIVE_FIELD_COUNT} "
            "(<id> <type> <ts> <match> <envelope>)"
        )
    id_b, type_b, ts_b, match, envelope = parts
    check_id(id_b)
    ts = _check_ts(ts_b)
    _check_common(type_b, match, envelope)
    return LiveLine(id_b, type_b, ts, match, envelope)


def parse_event_fields(fields: Mapping[bytes, bytes]) -> tuple[bytes, int, bytes, bytes]:
    """An event's stream fields as ``(type, ts_ms, match, envelope)``, checked."""
    try:
        type_b, ts_b, envelope = fields[_T], fields[_TS], fields[_D]
    except KeyError as exc:
        raise ContractError(f"field {exc.args[0]!r} is missing") from None
    match = fields.get(_M, NO_MATCH)
    ts = _check_ts(ts_b)
    _check_common(type_b, match, envelope)
    return type_b, ts, match, envelope
