"""ingest.records: Kafka records -> the 6 script arguments per record of the Redis step."""

from __future__ import annotations

import pytest

from ingest.records import Prepared, RawRecord, prepare, script_args
from shared.events import DeadReason, Envelope, decode_record, parse_match
from shared.settings import DEFAULT_TYPE_FIELDS

MAX_BYTES = 256
TS_MS = 1_764_410_400_000


def record(
    value: bytes | None, *, partition: int = 2, offset: int = 41, ts: int = TS_MS
) -> RawRecord:
    return RawRecord(
        partition=partition, offset=offset, timestamp=ts, key=b"contact-42", value=value
    )


def run(rec: RawRecord) -> Prepared:
    return prepare(rec, max_bytes=MAX_BYTES, type_fields=DEFAULT_TYPE_FIELDS)


@pytest.mark.parametrize(
    ("ts", "f2"),
    [
        pytest.param(TS_MS, b"1764410400000", id="realistic"),
        pytest.param(0, b"0", id="zero"),
    ],
)
def test_event_becomes_kind_e_with_type_timestamp_and_envelope(ts: int, f2: bytes) -> None:
    rec = record(b'{"Type":"ContactCreated","Id":7}', ts=ts)

    got = run(rec)

    expected = decode_record(
        rec.value,
        key=rec.key,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=ts,
        max_bytes=MAX_BYTES,
        type_fields=DEFAULT_TYPE_FIELDS,
    )
    assert isinstance(expected, Envelope)
    assert got == Prepared(2, 41, b"e", b"ContactCreated", f2, expected.data, b"-", None)
    assert got.f2.isdigit()
    # The published line is "<id> <type> <ts> <envelope>": none of them may break it.
    assert b" " not in got.f1 + got.f2
    assert b"\n" not in got.f1 + got.f2 + got.f3


@pytest.mark.parametrize(
    ("value", "reason", "stored"),
    [
        pytest.param(None, DeadReason.EMPTY, b"", id="tombstone"),
        pytest.param(b"", DeadReason.EMPTY, b"", id="empty"),
        pytest.param(b"not json", DeadReason.NOT_JSON, b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", DeadReason.NOT_UTF8, b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[1]", DeadReason.NOT_OBJECT, b"[1]", id="not-object"),
        pytest.param(b'{"x":1}', DeadReason.MISSING_TYPE, b'{"x":1}', id="missing-type"),
        pytest.param(b'{"Type":"a b"}', DeadReason.BAD_TYPE, b'{"Type":"a b"}', id="bad-type"),
        pytest.param(
            b"x" * (MAX_BYTES + 100),
            DeadReason.TOO_LARGE,
            b"x" * MAX_BYTES,
            id="too-large-truncated",
        ),
        pytest.param(
            b"\xff" * (MAX_BYTES + 1),
            DeadReason.TOO_LARGE,
            b"\xff" * MAX_BYTES,
            id="too-large-binary",
        ),
    ],
)
def test_dead_record_becomes_kind_d(value: bytes | None, reason: DeadReason, stored: bytes) -> None:
    got = run(record(value))

    assert got.kind == b"d"
    assert (got.partition, got.offset) == (2, 41)
    assert got.f1 == reason.value.encode()
    assert got.dead_reason is reason
    assert got.f2  # a human-readable detail
    got.f2.decode("utf-8")  # strict: the detail is valid UTF-8
    assert got.f3 == stored
    assert len(got.f3) <= MAX_BYTES


def test_dead_detail_with_a_lone_surrogate_type_is_still_utf8() -> None:
    got = run(record(b'{"Type":"\\ud800"}'))

    assert got.dead_reason is DeadReason.BAD_TYPE
    got.f2.decode("utf-8")


def test_script_args_are_seven_values_per_record_in_order() -> None:
    event = run(record(b'{"Type":"A"}', partition=0, offset=5))
    dead = run(record(b"nope", partition=1, offset=9))

    args = script_args([event, dead])

    assert args == [
        0, 5, b"e", event.f1, event.f2, event.f3, b"-",
        1, 9, b"d", b"not_json", dead.f2, b"nope", b"",
    ]  # fmt: skip


def test_script_args_of_nothing_is_empty() -> None:
    assert script_args([]) == []


def test_script_args_accepts_any_iterable() -> None:
    prepared = [run(record(b'{"Type":"A"}', offset=i)) for i in range(3)]

    args = script_args(p for p in prepared)

    assert len(args) == 21
    assert args[1::7] == [0, 1, 2]


def test_match_fields_travel_as_one_token() -> None:
    got = prepare(
        record(b'{"Type":"A","TenantId":"t 1/&x","Region":"eu","N":7,"Flag":true}'),
        max_bytes=MAX_BYTES,
        type_fields=DEFAULT_TYPE_FIELDS,
        match_fields=("TenantId", "N", "Flag", "Missing"),
    )
    # Percent-encoded so the token never holds a space, '&' or '=' of its own; booleans and
    # absent fields are left out.
    assert got.f4 == b"TenantId=t%201%2F%26x&N=7"
    assert parse_match(got.f4) == {("TenantId", "t 1/&x"), ("N", "7")}
