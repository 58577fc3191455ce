"""Kafka records -> the packed argument of the atomic Redis step (pure).

The hot path uses plain tuples: one ``Prepared`` per record, one packed blob per partition
of a batch (one script call per partition)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from shared.events import Dead, DeadReason, encode_event


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
    outcome = encode_event(
        record.value,
        key=record.key,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        max_bytes=max_bytes,
        type_fields=type_fields,
        match_fields=match_fields,
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


RECORD_HEAD = struct.Struct(">cqIIII")
"""Per record in the blob: kind (1 byte), offset (i64), then the lengths of f1..f4 (u32
each), followed by f1..f4 themselves. Read in Lua with
``struct.unpack('>c1i8I4I4I4I4', blob, pos)``. The partition is not in the blob: one blob
holds one partition's records (one script call per partition)."""


def pack(records: Iterable[Prepared]) -> bytes:
    """One blob for one partition's records: a few script arguments instead of six per
    record. Every record must be of the same partition (``group`` makes such lists)."""
    parts: list[bytes] = []
    extend = parts.extend
    head = RECORD_HEAD.pack
    for _partition, offset, kind, f1, f2, f3, f4 in records:
        extend((head(kind, offset, len(f1), len(f2), len(f3), len(f4)), f1, f2, f3, f4))
    return b"".join(parts)


def unpack(blob: bytes, partition: int) -> list[Prepared]:
    """The inverse of ``pack`` (for tests and diagnostics; the script does this in Lua)."""
    out: list[Prepared] = []
    pos = 0
    while pos < len(blob):
        kind, offset, *lengths = RECORD_HEAD.unpack_from(blob, pos)
        pos += RECORD_HEAD.size
        fields = []
        for n in lengths:
            fields.append(blob[pos : pos + n])
            pos += n
        f1, f2, f3, f4 = fields
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
