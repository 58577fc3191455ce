"""The cursor: the SSE ``id:`` and the history ``after``/``next_after`` value.

A cursor is the vector of Kafka positions a client has seen, one per partition, plus the
topic incarnation (``epoch``) those positions belong to. Every position is a Kafka position
(the record's offset + 1, like a committed offset), so a cursor handed out by one edge is
valid on every other edge, and stays valid after Redis loses its data and ingest refills it.

Text format (version 1)
=======================

::

    cursor   = "1." base64url(payload)           ; RFC 4648 section 5 alphabet, no "=" padding
    payload  = epoch count value*                ; exactly `count` values, nothing after them
    epoch    = 4 bytes, unsigned, big-endian     ; the topic incarnation (``<prefix>:meta`` epoch)
    count    = varint                            ; number of partitions in the vector
    value    = varint                            ; partition i's entry, i = 0 .. count-1:
                                                 ;   0     -> no position (read from the oldest
                                                 ;            retained entry of that partition)
                                                 ;   v > 0 -> position v-1 (next offset to read)
    varint   = unsigned LEB128: 7 bits per byte, least significant group first, the high bit
               set on every byte but the last

Worked example: epoch 1, partitions 0..2 at positions 1, 2 and none::

    payload  00 00 00 01 | 03 | 02 03 00
    cursor   1.AAAAAQMCAwA

Decoding is strict, so that every cursor has exactly one spelling
(``decode_cursor(x).encode() == x`` for every accepted ``x``) and a hostile value costs a
bounded amount of work. ``decode_cursor`` refuses, with ``CursorError`` (the edge answers
HTTP 400 ``invalid_cursor``):

- text longer than ``MAX_CURSOR_CHARS`` characters, or not ASCII;
- a version other than ``1`` (text before the first ``.``);
- characters outside the base64url alphabet, ``=`` padding, an impossible base64 length,
  or non-zero unused bits in the last base64 character;
- a payload shorter than the epoch and the count;
- a count above ``MAX_PARTITIONS``;
- a varint longer than 9 bytes (so every value is below 2**63), cut off by the end of the
  payload, or not in its shortest form (a final ``00`` byte after a continuation byte);
- fewer values than the count says, or any byte after the last value.

A partition beyond ``count`` is "no position" (a missing partition reads from its oldest
retained entry). Whether the positions belong to the topic the edge serves is not decided
here: the edge compares ``epoch`` and ``count`` with the topic's and answers ``reset``.

Size: 4 bytes of epoch, 1-2 bytes of count, then 1 byte per partition with no position and
1-9 bytes per position (1-3 bytes below 2**21, 5 bytes below 2**35 ~ 3.4e10); base64 adds a
third. Realistic offsets (1e6..1e9) cost 4-7 characters per partition.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CURSOR_VERSION",
    "MAX_CURSOR_CHARS",
    "MAX_PARTITIONS",
    "MAX_POSITION",
    "Cursor",
    "CursorEncoder",
    "CursorError",
    "decode_cursor",
    "is_legacy_id",
]

CURSOR_VERSION: Final = "1"
MAX_PARTITIONS: Final = 4096
_MAX_VARINT_BYTES: Final = 9
MAX_POSITION: Final = 2**63 - 2
"""The largest position a cursor holds (its value, position + 1, fits 9 varint bytes)."""
MAX_EPOCH: Final = 2**32 - 1

_PREFIX: Final = b"1."
_HEAD_BYTES: Final = 4
# The longest cursor any valid vector encodes to: every partition at a 9-byte varint. The
# length check comes first so that a hostile value costs no base64 work; it must not refuse
# anything this module can produce, or a cursor handed out would come back as a 400.
_MAX_PAYLOAD: Final = _HEAD_BYTES + 2 + MAX_PARTITIONS * _MAX_VARINT_BYTES
MAX_CURSOR_CHARS: Final = len(_PREFIX) + (_MAX_PAYLOAD * 4 + 2) // 3

_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_B64URL_RE: Final = re.compile(rb"[A-Za-z0-9_-]*")
_LEGACY_RE: Final = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")
_SMALL: Final = tuple(bytes((v,)) for v in range(0x80))


class CursorError(ValueError):
    """A cursor that cannot be decoded (or a vector that cannot be encoded); ``detail`` says
    why, in words fit for a 400 answer."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _value_of(position: int | None) -> int:
    return 0 if position is None else position + 1


def _check_position(partition: int, position: int | None) -> None:
    if position is None:
        return
    if type(position) is not int or not 0 <= position <= MAX_POSITION:
        raise CursorError(f"partition {partition}: position {position!r} is out of range")


def _check_vector(epoch: int, positions: Sequence[int | None]) -> None:
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise CursorError(f"epoch {epoch!r} is not an unsigned 32-bit integer")
    if len(positions) > MAX_PARTITIONS:
        raise CursorError(f"{len(positions)} partitions, at most {MAX_PARTITIONS}")
    for partition, position in enumerate(positions):
        _check_position(partition, position)


def _check_partition(partition: int) -> None:
    if type(partition) is not int or not 0 <= partition < MAX_PARTITIONS:
        raise CursorError(f"partition {partition!r} is out of range")


def _b64(payload: bytes) -> bytes:
    return binascii.b2a_base64(payload, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def _encode(epoch: int, parts: Sequence[bytes]) -> bytes:
    payload = b"".join((epoch.to_bytes(4, "big"), _varint(len(parts)), *parts))
    return _PREFIX + _b64(payload)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A vector of positions (index = partition; ``None`` = no position) in one epoch.

    Construction checks the bounds (``CursorError``). Instances are immutable; ``advanced``
    and ``merged`` return new ones and never move a position backwards."""

    epoch: int
    positions: tuple[int | None, ...]

    def __post_init__(self) -> None:
        _check_vector(self.epoch, self.positions)

    @classmethod
    def _trusted(cls, epoch: int, positions: tuple[int | None, ...]) -> Cursor:
        # Skips the O(partitions) check for vectors built from already checked parts.
        cursor = object.__new__(cls)
        object.__setattr__(cursor, "epoch", epoch)
        object.__setattr__(cursor, "positions", positions)
        return cursor

    def position(self, partition: int) -> int | None:
        """The position in ``partition``; ``None`` beyond the vector's end as well."""
        if 0 <= partition < len(self.positions):
            return self.positions[partition]
        return None

    def advanced(self, partition: int, position: int) -> Cursor:
        """This cursor with ``partition`` at least at ``position`` (the vector grows with
        ``None`` as needed; a lower position leaves the cursor as it is)."""
        _check_partition(partition)
        _check_position(partition, position)
        positions = self.positions
        if partition < len(positions):
            current = positions[partition]
            if current is not None and current >= position:
                return self
            grown = (*positions[:partition], position, *positions[partition + 1 :])
        else:
            grown = (*positions, *(None,) * (partition - len(positions)), position)
        return Cursor._trusted(self.epoch, grown)

    def merged(self, other: Cursor) -> Cursor:
        """Componentwise maximum (``None`` below every position) of two cursors of one
        epoch; the result is as long as the longer of the two."""
        if other.epoch != self.epoch:
            raise ValueError(f"cannot merge cursors of epochs {self.epoch} and {other.epoch}")
        a, b = self.positions, other.positions
        if len(a) < len(b):
            a, b = b, a
        out = list(a)
        for partition, theirs in enumerate(b):
            mine = out[partition]
            if theirs is not None and (mine is None or theirs > mine):
                out[partition] = theirs
        return Cursor._trusted(self.epoch, tuple(out))

    def encode(self) -> bytes:
        """The cursor's text (ASCII, URL-safe), e.g. ``b"1.AAAAAQMCAwA"``."""
        return _encode(self.epoch, [_varint(_value_of(p)) for p in self.positions])

    def __str__(self) -> str:
        return self.encode().decode("ascii")


class CursorEncoder:
    """The hub's cursor: one vector moved one partition at a time and encoded once per
    event. Each partition's varint is kept, so ``encode`` is one join and one base64 pass,
    and it is cached until the next ``set`` that changes something."""

    __slots__ = ("_chunks", "_encoded", "_epoch", "_positions")

    def __init__(self, epoch: int, positions: Sequence[int | None]) -> None:
        _check_vector(epoch, positions)
        self._epoch = epoch
        self._positions: list[int | None] = list(positions)
        # [epoch, count, partition 0, partition 1, ...]: the payload is one join of this list.
        self._chunks: list[bytes] = [
            epoch.to_bytes(4, "big"),
            _varint(len(positions)),
            *(_varint(_value_of(p)) for p in positions),
        ]
        self._encoded: bytes | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def position(self, partition: int) -> int | None:
        if 0 <= partition < len(self._positions):
            return self._positions[partition]
        return None

    def set(self, partition: int, position: int) -> None:
        """Put ``partition`` at ``position`` (as given: the caller keeps it monotone)."""
        positions = self._positions
        if type(partition) is int and 0 <= partition < len(positions):
            if positions[partition] == position:
                return
            if type(position) is int and 0 <= position <= MAX_POSITION:  # once per event
                positions[partition] = position
                self._chunks[partition + 2] = _varint(position + 1)
                self._encoded = None
                return
        _check_partition(partition)
        _check_position(partition, position)
        chunks = self._chunks
        if partition >= len(positions):
            missing = partition + 1 - len(positions)
            positions.extend([None] * missing)
            chunks.extend([_SMALL[0]] * missing)
            chunks[1] = _varint(len(positions))
        positions[partition] = position
        chunks[partition + 2] = _varint(position + 1)
        self._encoded = None

    def encode(self) -> bytes:
        encoded = self._encoded
        if encoded is None:
            encoded = self._encoded = _PREFIX + _b64(b"".join(self._chunks))
        return encoded

    def cursor(self) -> Cursor:
        return Cursor._trusted(self._epoch, tuple(self._positions))


def is_legacy_id(text: str | bytes) -> bool:
    """Whether ``text`` is a stream id of the old single-stream layout (``<ms>-<seq>``): such
    a Last-Event-ID gets one ``reset`` (reason ``old_format``), not a 400."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    return _LEGACY_RE.fullmatch(raw) is not None


def decode_cursor(text: str | bytes) -> Cursor:
    """Decode a cursor's text (see the module documentation); raises ``CursorError``."""
    if len(text) > MAX_CURSOR_CHARS:
        raise CursorError(f"the cursor is longer than {MAX_CURSOR_CHARS} characters")
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise CursorError("the cursor is not ASCII") from None
    else:
        raw = bytes(text)
        if not raw.isascii():
            raise CursorError("the cursor is not ASCII")
    version, dot, body = raw.partition(b".")
    if not dot:
        raise CursorError("not a cursor: expected '1.' followed by base64url")
    if version != CURSOR_VERSION.encode():
        shown = version[:16].decode("ascii")
        raise CursorError(f"unsupported cursor version {shown!r} (this edge reads version 1)")
    payload = _unbase64(body)
    return _parse_payload(payload)


def _unbase64(body: bytes) -> bytes:
    if b"=" in body:
        raise CursorError("the cursor's base64 must not be padded with '='")
    if _B64URL_RE.fullmatch(body) is None:
        raise CursorError("the cursor holds a character outside the base64url alphabet")
    if len(body) % 4 == 1:
        raise CursorError("the cursor's base64 has an impossible length")
    padded = body.translate(_FROM_URLSAFE) + b"=" * (-len(body) % 4)
    try:
        payload = binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error:  # pragma: no cover - the checks above leave nothing for it
        raise CursorError("the cursor is not base64url") from None
    # Unused low bits of the last character must be zero, or two texts would name one cursor.
    if _b64(payload) != body:
        raise CursorError("the cursor's base64 is not in canonical form")
    return payload


def _read_varint(payload: bytes, at: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    end = len(payload)
    for n in range(_MAX_VARINT_BYTES):
        if at >= end:
            raise CursorError(f"{what}: the number is cut off by the end of the cursor")
        byte = payload[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and n > 0:
                raise CursorError(f"{what}: the number is not in its shortest form")
            return value, at
        shift += 7
    raise CursorError(f"{what}: the number is longer than {_MAX_VARINT_BYTES} bytes")


def _parse_payload(payload: bytes) -> Cursor:
    if len(payload) < _HEAD_BYTES + 1:
        raise CursorError("the cursor is too short to hold an epoch and a partition count")
    epoch = int.from_bytes(payload[:_HEAD_BYTES], "big")
    count, at = _read_varint(payload, _HEAD_BYTES, "partition count")
    if count > MAX_PARTITIONS:
        raise CursorError(f"the cursor names {count} partitions, at most {MAX_PARTITIONS}")
    end = len(payload)
    positions: list[int | None] = []
    append = positions.append
    for partition in range(count):
        if at >= end:
            raise CursorError(f"the cursor names {count} partitions but holds {partition}")
        byte = payload[at]
        if byte < 0x80:  # one-byte value: the common case for "no position" and small offsets
            at += 1
            append(None if byte == 0 else byte - 1)
            continue
        value, at = _read_varint(payload, at, f"partition {partition}")
        append(value - 1)
    if at != end:
        raise CursorError(f"{end - at} bytes after the last partition")
    return Cursor._trusted(epoch, tuple(positions))
