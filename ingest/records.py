"""Kafka records -> arguments of the atomic Redis step (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.events import Dead, DeadReason, decode_record


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The fields of a Kafka record that ingest uses (an aiokafka ConsumerRecord fits)."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Prepared:
    partition: int
    offset: int
    kind: bytes
    """``e`` (event) or ``d`` (dead letter)."""
    f1: bytes
    f2: bytes
    f3: bytes
    f4: bytes = b""
    dead_reason: DeadReason | None = None


def prepare(
    record: RawRecord,
    *,
    max_bytes: int,
    type_fields: tuple[str, ...],
    match_fields: tuple[str, ...] = (),
) -> Prepared:
    outcome = decode_record(
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
        return Prepared(
            record.partition,
            record.offset,
            b"d",
            outcome.reason.value.encode(),
            outcome.detail.encode("utf-8", "replace"),
            value,
            dead_reason=outcome.reason,
        )
    return Prepared(
        record.partition,
        record.offset,
        b"e",
        outcome.type.encode(),
        b"%d" % record.timestamp,
        outcome.data,
        outcome.match,
    )


def script_args(records: Iterable[Prepared]) -> list[bytes | int]:
    args: list[bytes | int] = []
    for r in records:
        args.extend((r.partition, r.offset, r.kind, r.f1, r.f2, r.f3, r.f4))
    return args
