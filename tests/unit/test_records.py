"""ingest.records: Kafka records -> prepared tuples -> the packed argument of the Redis step."""

from __future__ import annotations

import pytest

from ingest.records import (
    DEAD,
    EVENT,
    Packed,
    Prepared,
    RawRecord,
    dead_reason,
    group,
    pack,
    prepare,
    unpack,
)
from shared.contract import encode_live_line, encode_live_payload
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
    assert got == (2, 41, EVENT, b"ContactCreated", f2, expected.data, b"-")
    assert dead_reason(got) is None
    _, _, _, f1, f2_, f3, _ = got
    assert f2_.isdigit()
    # The published line is "<id> <type> <ts> <envelope>": none of them may break it.
    assert b" " not in f1 + f2_
    assert b"\n" not in f1 + f2_ + f3


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

    partition, offset, kind, f1, f2, f3, f4 = got
    assert kind == DEAD
    assert (partition, offset) == (2, 41)
    assert f1 == reason.value.encode()
    assert dead_reason(got) is reason
    assert f2  # a human-readable detail
    f2.decode("utf-8")  # strict: the detail is valid UTF-8
    assert f3 == stored
    assert len(f3) <= MAX_BYTES
    assert f4 == b""


def test_dead_detail_with_a_lone_surrogate_type_is_still_utf8() -> None:
    got = run(record(b'{"Type":"\\ud800"}'))

    assert dead_reason(got) is DeadReason.BAD_TYPE
    got[4].decode("utf-8")


def test_pack_then_unpack_gives_one_partitions_records_back() -> None:
    event = run(record(b'{"Type":"A"}', partition=7, offset=5))
    dead = run(record(b"nope", partition=7, offset=9))
    big = run(record(b'{"Type":"B","x":"' + b"y" * 200 + b'"}', partition=7, offset=2**40))

    assert unpack(pack([event, dead, big]), 7) == [event, dead, big]


def test_pack_layout_is_what_the_script_reads() -> None:
    # '>c1i8i8I4I4I4I4I4' in Lua: kind, offset, pv, five lengths. An event's text is its
    # live line; a dead letter's follows its head. One blob holds one partition's records,
    # so the partition is not repeated per record.
    packed = pack(
        [
            (3, 2**33 + 1, EVENT, b"T", b"17", b"{}", b"-"),
            (3, 2**33 + 2, DEAD, b"not_json", b"why", b"raw", b""),
            (3, 2**33 + 3, EVENT, b"U", b"18", b"{ }", b"a=1"),
        ],
        prev=5,
    )

    def u32(*ns: int) -> bytes:
        return b"".join(n.to_bytes(4, "big") for n in ns)

    def i64(n: int) -> bytes:
        return n.to_bytes(8, "big", signed=True)

    assert packed.blob == (
        b"e" + i64(2**33 + 1) + i64(5) + u32(len(b"8589934593 5 "), 1, 2, 1, 2)
        + b"d" + i64(2**33 + 2) + i64(0) + u32(0, 8, 3, 3, 0) + b"not_jsonwhyraw"
        + b"e" + i64(2**33 + 3) + i64(2**33 + 2) + u32(len(b"8589934595 8589934594 "), 1, 2, 3, 3)
    )  # fmt: skip
    # The lines are what the script publishes as they stand: the live line format.
    assert packed.lines == encode_live_payload(
        [
            encode_live_line(2**33 + 1, 5, b"T", 17, b"-", b"{}"),
            encode_live_line(2**33 + 3, 2**33 + 2, b"U", 18, b"a=1", b"{ }"),
        ]
    )
    # The pv chain: each event's pv is the position after the one before (dead letters do
    # not move it), and ``prev`` after the records is where the next batch starts.
    assert packed.prev == 2**33 + 4


def test_pack_without_events_keeps_the_chain_where_it_was() -> None:
    packed = pack([(0, 7, DEAD, b"empty", b"why", b"", b"")], prev=3)

    assert packed.lines == b""
    assert packed.prev == 3


def test_pack_of_nothing_is_empty() -> None:
    assert pack([]) == Packed(b"", b"", -1)
    assert unpack(Packed(b"", b"", -1), 0) == []


def test_pack_accepts_any_iterable() -> None:
    prepared = [run(record(b'{"Type":"A"}', offset=i)) for i in range(3)]

    assert unpack(pack(p for p in prepared), 2) == prepared


def test_group_splits_a_batch_by_partition_keeping_each_partitions_order() -> None:
    mixed = [
        run(record(b'{"Type":"A"}', partition=p, offset=o))
        for o, p in [(10, 1), (3, 0), (11, 1), (4, 0), (12, 1), (0, 2)]
    ]

    grouped = group(mixed)

    assert list(grouped) == [1, 0, 2]
    assert {p: [r[1] for r in rs] for p, rs in grouped.items()} == {
        1: [10, 11, 12],
        0: [3, 4],
        2: [0],
    }
    assert all(r[0] == p for p, rs in grouped.items() for r in rs)
    assert group([]) == {}


def test_match_fields_travel_as_one_token() -> None:
    got = prepare(
        record(b'{"Type":"A","TenantId":"t 1/&x","Region":"eu","N":7,"Flag":true}'),
        max_bytes=MAX_BYTES,
        type_fields=DEFAULT_TYPE_FIELDS,
        match_fields=("TenantId", "N", "Flag", "Missing"),
    )
    # Percent-encoded so the token never holds a space, '&' or '=' of its own; booleans and
    # absent fields are left out.
    assert got[6] == b"TenantId=t%201%2F%26x&N=7"
    assert parse_match(got[6]) == {("TenantId", "t 1/&x"), ("N", "7")}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'{"Type":"A","TenantId":"\\ud800","N":7}', id="lone-surrogate-value"),
        pytest.param(b'{"Type":"A","TenantId":"x\\udfffy","N":7}', id="lone-low-surrogate"),
    ],
)
def test_match_field_that_is_not_text_is_left_out(value: bytes) -> None:
    got = prepare(
        record(value),
        max_bytes=MAX_BYTES,
        type_fields=DEFAULT_TYPE_FIELDS,
        match_fields=("TenantId", "N"),
    )
    # A lone surrogate cannot be percent-encoded as UTF-8; no claim can name it either.
    assert got[2] == EVENT
    assert got[6] == b"N=7"
