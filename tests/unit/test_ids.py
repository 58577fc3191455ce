"""shared.ids: stream id parsing, ordering, predecessor and formatting."""

from __future__ import annotations

import pytest

from shared.ids import ZERO, InvalidStreamId, StreamId, parse_id, parse_id_bytes

U64_MAX = 2**64 - 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0-0", StreamId(0, 0), id="zero"),
        pytest.param("1-0", StreamId(1, 0), id="one"),
        pytest.param("1732870000000-0", StreamId(1732870000000, 0), id="realistic"),
        pytest.param("1732870000000-42", StreamId(1732870000000, 42), id="with-seq"),
        pytest.param(f"1-{U64_MAX}", StreamId(1, U64_MAX), id="seq-u64-max"),
        pytest.param(f"{U64_MAX}-{U64_MAX}", StreamId(U64_MAX, U64_MAX), id="both-u64-max"),
        pytest.param("007-01", StreamId(7, 1), id="leading-zeros"),
    ],
)
def test_parse_id_accepts(text: str, expected: StreamId) -> None:
    assert parse_id(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(" ", id="space"),
        pytest.param(" 1-0", id="leading-space"),
        pytest.param("1-0 ", id="trailing-space"),
        pytest.param("1 -0", id="inner-space"),
        pytest.param("1-", id="no-seq"),
        pytest.param("-1", id="no-ms"),
        pytest.param("1", id="ms-only"),
        pytest.param("a-b", id="letters"),
        pytest.param("1-a", id="letter-seq"),
        pytest.param("0x1-0", id="hex"),
        pytest.param("+1-0", id="plus-sign"),
        pytest.param("-1-0", id="negative"),
        pytest.param("1.5-0", id="decimal"),
        pytest.param("1--0", id="double-dash"),
        pytest.param("1-0-0", id="three-parts"),
        pytest.param("1_0-0", id="underscore"),
        pytest.param("*", id="redis-auto-id"),
        pytest.param("$", id="redis-dollar"),
        pytest.param(">", id="redis-gt"),
        pytest.param("1" * 21 + "-0", id="ms-21-digits"),
        pytest.param("0-" + "1" * 21, id="seq-21-digits"),
        pytest.param(f"{U64_MAX + 1}-0", id="ms-above-u64"),
        pytest.param(f"0-{U64_MAX + 1}", id="seq-above-u64"),
        pytest.param("9" * 20 + "-" + "9" * 20, id="both-20-nines"),
        pytest.param("1" * 10_000, id="huge"),
        pytest.param("1-0\r", id="trailing-cr"),
        pytest.param("1-0\n", id="trailing-lf"),
        pytest.param("\n1-0", id="leading-lf"),
        pytest.param("\u0663-\u0660", id="arabic-digits"),
        pytest.param("\uff11-\uff10", id="fullwidth-digits"),
    ],
)
def test_parse_id_rejects(text: str) -> None:
    with pytest.raises(InvalidStreamId):
        parse_id(text)


def test_invalid_stream_id_is_a_value_error() -> None:
    assert issubclass(InvalidStreamId, ValueError)


def test_ids_order_as_number_tuples_not_strings() -> None:
    texts = ["10-0", "2-0", "2-10", "2-9", f"1-{U64_MAX}", "0-0", "0-1"]

    ordered = sorted(parse_id(t) for t in texts)

    assert [str(i) for i in ordered] == ["0-0", "0-1", f"1-{U64_MAX}", "2-0", "2-9", "2-10", "10-0"]


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        pytest.param("1-0", "1-1", id="seq"),
        pytest.param("1-999", "2-0", id="ms-beats-seq"),
        pytest.param("9-0", "10-0", id="not-lexicographic"),
        pytest.param("0-0", "0-1", id="zero"),
    ],
)
def test_comparison(smaller: str, larger: str) -> None:
    a, b = parse_id(smaller), parse_id(larger)

    assert a < b
    assert b > a
    assert a != b
    assert max(a, b) == b


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        pytest.param(StreamId(5, 3), StreamId(5, 2), id="seq-down"),
        pytest.param(StreamId(5, 1), StreamId(5, 0), id="to-seq-zero"),
        pytest.param(StreamId(5, 0), StreamId(4, U64_MAX), id="across-seq-zero"),
        pytest.param(StreamId(1, 0), StreamId(0, U64_MAX), id="to-ms-zero"),
        pytest.param(StreamId(0, 1), ZERO, id="to-zero"),
        pytest.param(ZERO, ZERO, id="zero-is-its-own"),
    ],
)
def test_predecessor(current: StreamId, expected: StreamId) -> None:
    assert current.predecessor() == expected


@pytest.mark.parametrize(
    "current", [StreamId(5, 3), StreamId(5, 0), StreamId(1, 0), StreamId(0, 1)], ids=str
)
def test_predecessor_is_the_largest_id_before(current: StreamId) -> None:
    before = current.predecessor()

    assert before < current
    # Nothing fits between: the next id after the predecessor is the current one.
    after_before = (
        StreamId(before.ms, before.seq + 1) if before.seq < U64_MAX else StreamId(before.ms + 1, 0)
    )
    assert after_before == current


@pytest.mark.parametrize(
    "stream_id",
    [ZERO, StreamId(1, 0), StreamId(1732870000000, 42), StreamId(U64_MAX, U64_MAX)],
    ids=str,
)
def test_str_encode_and_parse_round_trip(stream_id: StreamId) -> None:
    assert str(stream_id) == f"{stream_id.ms}-{stream_id.seq}"
    assert stream_id.encode() == str(stream_id).encode("ascii")
    assert parse_id(str(stream_id)) == stream_id
    assert parse_id_bytes(stream_id.encode()) == stream_id


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"0-0", ZERO, id="zero"),
        pytest.param(b"1732870000000-5", StreamId(1732870000000, 5), id="realistic"),
        pytest.param(b"%d-%d" % (U64_MAX, U64_MAX), StreamId(U64_MAX, U64_MAX), id="u64-max"),
    ],
)
def test_parse_id_bytes(raw: bytes, expected: StreamId) -> None:
    parsed = parse_id_bytes(raw)

    assert parsed == expected
    assert isinstance(parsed, StreamId)


def test_zero() -> None:
    assert (ZERO.ms, ZERO.seq) == (0, 0)
    assert str(ZERO) == "0-0"
