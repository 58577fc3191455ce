"""Redis stream ids: parsing, formatting and ordering (pure functions).

A stream id is ``<milliseconds>-<sequence>``, both unsigned 64-bit integers. Clients treat
ids as opaque strings; the edge compares them as ``(ms, seq)`` tuples.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_U64_MAX = 2**64 - 1
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


class StreamId(NamedTuple):
    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    def encode(self) -> bytes:
        return b"%d-%d" % (self.ms, self.seq)

    def predecessor(self) -> StreamId:
        """The largest id that sorts before this one (``0-0`` has none and maps to itself)."""
        if self.seq > 0:
            return StreamId(self.ms, self.seq - 1)
        if self.ms > 0:
            return StreamId(self.ms - 1, _U64_MAX)
        return self


ZERO = StreamId(0, 0)


class InvalidStreamId(ValueError):
    pass


def parse_id(text: str) -> StreamId:
    """Parse a full ``ms-seq`` id as sent by a client; raises ``InvalidStreamId``."""
    if len(text) > 41:
        raise InvalidStreamId("stream id is too long")
    m = _ID_RE.fullmatch(text)
    if m is None:
        raise InvalidStreamId("stream id must look like '<ms>-<seq>', e.g. '1732870000000-0'")
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms > _U64_MAX or seq > _U64_MAX:
        raise InvalidStreamId("stream id is out of range")
    return StreamId(ms, seq)


def parse_id_bytes(raw: bytes) -> StreamId:
    """Parse an id that came from Redis itself (trusted, hot path)."""
    ms, _, seq = raw.partition(b"-")
    return StreamId(int(ms), int(seq))
