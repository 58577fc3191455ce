"""Kafka records -> the packed argument of the atomic Redis step (pure).

The hot path uses plain tuples: one ``Prepared`` per record, one ``Packed`` per partition of
a batch (one script call per partition): the records' heads and dead letters, and the events'
live lines ready to publish."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from shared.contract import LINE_SEPARATOR, LIVE_LINE
from shared.events import Dead, DeadReason, encode_record


class RecordLike(Protocol):
    """The fields of a Kafka record that ingest uses (an aiokafka ConsumerRecord fits)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record built by hand (tests, tools)."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


EVENT = b"e"
DEAD = b"d"

Prepared = tuple[int, int, bytes, bytes, bytes, bytes, bytes]
"""``(partition, offset, kind, f1, f2, f3, f4)``; kind ``e`` (event): f1 type, f2 Kafka
timestamp ms, f3 envelope, f4 match token; kind ``d`` (dead letter): f1 reason, f2 detail,
f3 value (possibly truncated), f4 empty."""


def prepare(
    record: RecordLike,
    *,
    max_bytes: int,
    type_fields: tuple[str, ...],
    match_fields: tuple[str, ...] = (),
) -> Prepared:
    outcome = encode_record(
        record.value,
        record.key,
        record.partition,
        record.offset,
        record.timestamp,
        max_bytes,
        type_fields,
        match_fields,
    )
    if isinstance(outcome, Dead):
        # Keep what fits; the full record stays in Kafka at topic/partition/offset.
        value = (record.value or b"")[:max_bytes]
        return (
            record.partition,
            record.offset,
            DEAD,
            outcome.reason.value.encode(),
            outcome.detail.encode("utf-8", "replace"),
            value,
            b"",
        )
    type_bytes, data, match = outcome
    return (
        record.partition,
        record.offset,
        EVENT,
        type_bytes,
        b"%d" % record.timestamp,
        data,
        match,
    )


def dead_reason(p: Prepared) -> DeadReason | None:
    return DeadReason(p[3].decode()) if p[2] == DEAD else None


RECORD_HEAD = struct.Struct(">cqqIIIII")
"""Per record in the blob: kind (1 byte), offset (i64), pv (i64), then five lengths (u32
each). Read in Lua with ``struct.unpack('>c1i8i8I4I4I4I4I4', blob, pos)``. An event's text is
its live line in ``Packed.lines`` (l0 the line's "<offset> <pv> " head, l1 type, l2 Kafka
timestamp, l3 match token, l4 envelope, in the line's order); a dead letter's text follows
its head in the blob (l1 reason, l2 detail, l3 value; l0 = l4 = 0, pv 0). The partition is
not in the blob: one blob holds one partition's records (one script call per partition)."""


class Packed(NamedTuple):
    """One partition's records as the script takes them."""

    blob: bytes
    lines: bytes
    """The events' live lines (shared/contract.py), what the script publishes as it stands
    when Redis's pv chain is the one assumed here."""
    prev: int
    """The pv after these records: the position after their last event (the ``prev`` given
    when they hold none)."""


def pack(records: Iterable[Prepared], prev: int = -1) -> Packed:
    """One partition's records (``group`` makes such lists) packed for one script call.
    ``prev`` is the pv the first event should get, the position after the partition's last
    event in Redis as far as ingest knows (-1: not known; the script then remakes the first
    line's head, so a wrong guess costs time, never correctness)."""
    heads: list[bytes] = []
    lines: list[bytes] = []
    head = RECORD_HEAD.pack
    line_of = LIVE_LINE
    for _partition, offset, kind, f1, f2, f3, f4 in records:
        if kind == EVENT:
            line = line_of % (offset, prev, f1, f2, f4, f3)
            l1, l2, l3, l4 = len(f1), len(f2), len(f4), len(f3)
            l0 = len(line) - l1 - l2 - l3 - l4 - 3
            heads.append(head(kind, offset, prev, l0, l1, l2, l3, l4))
            lines.append(line)
            prev = offset + 1
        else:
            heads.extend((head(kind, offset, 0, 0, len(f1), len(f2), len(f3), 0), f1, f2, f3))
    return Packed(b"".join(heads), LINE_SEPARATOR.join(lines), prev)


def unpack(packed: Packed, partition: int) -> list[Prepared]:
    """The inverse of ``pack`` (for tests and diagnostics; the script does this in Lua)."""
    blob, lines = packed.blob, packed.lines
    out: list[Prepared] = []
    pos = line = 0
    while pos < len(blob):
        kind, offset, _pv, l0, l1, l2, l3, l4 = RECORD_HEAD.unpack_from(blob, pos)
        pos += RECORD_HEAD.size
        if kind == EVENT:
            at = line + l0
            f1, f2, f4, f3 = (
                lines[at : at + l1],
                lines[at + l1 + 1 : at + l1 + 1 + l2],
                lines[at + l1 + l2 + 2 : at + l1 + l2 + 2 + l3],
                lines[at + l1 + l2 + l3 + 3 : at + l1 + l2 + l3 + 3 + l4],
            )
            line = at + l1 + l2 + l3 + l4 + 4
        else:
            f1, f2 = blob[pos : pos + l1], blob[pos + l1 : pos + l1 + l2]
            f3, f4 = blob[pos + l1 + l2 : pos + l1 + l2 + l3], b""
            pos += l1 + l2 + l3
        out.append((partition, offset, kind, f1, f2, f3, f4))
    return out


def group(records: Iterable[Prepared]) -> dict[int, list[Prepared]]:
    """Records by partition, each list in the order given (Kafka's order within a
    partition): one script call per partition."""
    out: dict[int, list[Prepared]] = {}
    for p in records:
        bucket = out.get(p[0])
        if bucket is None:
            bucket = out[p[0]] = []
        bucket.append(p)
    return out
