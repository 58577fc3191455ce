"""edge.params: query and header parsing; every bad value is an ApiError 400 with a code."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from multidict import CIMultiDict, MultiDict

from edge.params import (
    MAX_TYPES,
    MAX_TYPES_PARAM_LEN,
    LegacyId,
    Position,
    parse_history_params,
    parse_stream_params,
    parse_types,
)
from shared.cursor import MAX_CURSOR_CHARS, Cursor
from shared.httpkit import ApiError

DEFAULT_N = 100
MAX_N = 1000
Pairs = list[tuple[str, str]]


def history(pairs: Pairs) -> Callable[[], object]:
    return lambda: parse_history_params(MultiDict(pairs), DEFAULT_N, MAX_N)


def assert_400(call: Callable[[], object], code: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.status == 400
    assert info.value.code == code
    assert info.value.message
    return info.value


# --- history: n ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        pytest.param([], DEFAULT_N, id="absent-default"),
        pytest.param([("n", "1")], 1, id="one"),
        pytest.param([("n", "250")], 250, id="middle"),
        pytest.param([("n", str(MAX_N))], MAX_N, id="max"),
        pytest.param([("other", "x")], DEFAULT_N, id="unrelated-param"),
    ],
)
def test_history_n_accepted(pairs: Pairs, expected: int) -> None:
    got = parse_history_params(MultiDict(pairs), DEFAULT_N, MAX_N)

    assert got.n == expected
    assert got.after is None
    assert got.types is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("0", id="zero"),
        pytest.param("-1", id="negative"),
        pytest.param("abc", id="letters"),
        pytest.param("1e3", id="exponent"),
        pytest.param(str(MAX_N + 1), id="max-plus-one"),
        pytest.param("10**9", id="power-expression"),
        pytest.param("1000000000", id="ten-digits"),
        pytest.param("9" * 5000, id="huge"),
        pytest.param("\u0663", id="arabic-digit"),
        pytest.param("\uff15", id="fullwidth-digit"),
        pytest.param("", id="empty"),
        pytest.param(" 5", id="leading-space"),
        pytest.param("5\n", id="trailing-newline"),
        pytest.param("+5", id="plus-sign"),
        pytest.param("5.0", id="decimal"),
        pytest.param("0x10", id="hex"),
        pytest.param("1_0", id="underscore"),
    ],
)
def test_history_bad_n_is_invalid_n(raw: str) -> None:
    err = assert_400(history([("n", raw)]), "invalid_n")

    assert str(MAX_N) in err.message


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("n", "5"), ("n", "5")], id="n-twice"),
        pytest.param([("n", "5"), ("n", "abc")], id="n-twice-one-bad"),
        pytest.param([("after", "1.AAAAAQA"), ("after", "1.AAAAAQA")], id="after-twice"),
        pytest.param([("types", "A"), ("types", "B")], id="types-twice"),
    ],
)
def test_history_repeated_parameter_is_invalid_query(pairs: Pairs) -> None:
    err = assert_400(history(pairs), "invalid_query")

    assert pairs[0][0] in err.message


# --- history: after --------------------------------------------------------------------------

C = Cursor(7, (5, None, 1_000_000))
C_TEXT = C.encode().decode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("1.AAAAAQA", Cursor(1, ()), id="no-partitions"),
        pytest.param(C_TEXT, C, id="three-partitions"),
        # An id of the single-stream layout: one reset (old_format), not a 400.
        pytest.param("1732870000000-3", LegacyId("1732870000000-3"), id="legacy-id"),
        pytest.param("0-0", LegacyId("0-0"), id="legacy-zero"),
    ],
)
def test_history_after_accepted(raw: str, expected: Position) -> None:
    got = parse_history_params(MultiDict([("after", raw), ("n", "5")]), DEFAULT_N, MAX_N)

    assert got.after == expected
    assert got.n == 5


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="letters"),
        pytest.param("1-", id="legacy-no-seq"),
        pytest.param("1", id="ms-only"),
        pytest.param(C_TEXT + " ", id="trailing-space"),
        pytest.param("$", id="redis-dollar"),
        pytest.param("1" * 21 + "-0", id="legacy-21-digits"),
        pytest.param("2." + C_TEXT[2:], id="version-2"),
        pytest.param("1.", id="no-payload"),
        pytest.param(C_TEXT + "A", id="trailing-byte"),
        pytest.param(C_TEXT + "=", id="padded"),
        pytest.param("1.AAAAAQA/", id="not-url-safe"),
        pytest.param("1.AAAAAQH_", id="count-cut-off"),
        pytest.param("1." + "A" * MAX_CURSOR_CHARS, id="too-long"),
        pytest.param("1.AAAAé", id="non-ascii"),
    ],
)
def test_history_bad_after_is_invalid_cursor(raw: str) -> None:
    err = assert_400(history([("after", raw)]), "invalid_cursor")

    assert "after" in err.message


# --- types -----------------------------------------------------------------------------------

MANY = [f"T{i}" for i in range(MAX_TYPES + 1)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("A", {b"A"}, id="one"),
        pytest.param("ContactCreated,DealWon", {b"ContactCreated", b"DealWon"}, id="two"),
        pytest.param("Deal.Won:v2_x-y", {b"Deal.Won:v2_x-y"}, id="punctuation"),
        pytest.param("A,A", {b"A"}, id="duplicates-collapse"),
        pytest.param(",".join(MANY[:MAX_TYPES]), {t.encode() for t in MANY[:MAX_TYPES]}, id="64"),
        pytest.param(
            ",".join([*MANY[:MAX_TYPES], "T0"]),
            {t.encode() for t in MANY[:MAX_TYPES]},
            id="64-distinct-65-items",
        ),
    ],
)
def test_types_accepted(raw: str | None, expected: set[bytes] | None) -> None:
    got = parse_types(raw)

    assert got == (None if expected is None else frozenset(expected))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("A,,B", id="empty-item"),
        pytest.param("A,", id="trailing-comma"),
        pytest.param(",A", id="leading-comma"),
        pytest.param("A, B", id="space-after-comma"),
        pytest.param("A B", id="inner-space"),
        pytest.param("A;B", id="semicolon"),
        pytest.param("A\nB", id="inner-newline"),
        pytest.param("A\n", id="trailing-newline"),
        pytest.param("Kontakt\u00e4", id="non-ascii"),
        pytest.param("T" * 129, id="item-too-long"),
        pytest.param(",".join(MANY), id="65-distinct"),
        pytest.param("A," * (MAX_TYPES_PARAM_LEN // 2) + "A", id="param-too-long"),
    ],
)
def test_bad_types_are_invalid_types(raw: str) -> None:
    assert_400(lambda: parse_types(raw), "invalid_types")


@pytest.mark.parametrize("raw", ["A,,B", "A,", "A, B", ",".join(MANY)])
def test_bad_types_are_refused_by_both_endpoints(raw: str) -> None:
    assert_400(history([("types", raw)]), "invalid_types")
    assert_400(lambda: parse_stream_params(MultiDict([("types", raw)]), {}), "invalid_types")


def test_types_reach_both_endpoints() -> None:
    query = MultiDict([("types", "A,B")])

    assert parse_history_params(query, DEFAULT_N, MAX_N).types == frozenset({b"A", b"B"})
    assert parse_stream_params(query, {}).types == frozenset({b"A", b"B"})


# --- stream: Last-Event-ID and ?last_event_id= -----------------------------------------------

A = Cursor(1, (3,)).encode().decode()
B = Cursor(1, (5,)).encode().decode()
Z = Cursor(1, (9,)).encode().decode()


@pytest.mark.parametrize(
    ("pairs", "headers", "expected"),
    [
        pytest.param([], {}, None, id="neither"),
        pytest.param([], {"Last-Event-ID": B}, Cursor(1, (5,)), id="header-only"),
        pytest.param([("last_event_id", A)], {}, Cursor(1, (3,)), id="query-only"),
        pytest.param(
            [("last_event_id", A)], {"Last-Event-ID": B}, Cursor(1, (5,)), id="header-wins"
        ),
        pytest.param(
            [("last_event_id", Z)],
            {"Last-Event-ID": B},
            Cursor(1, (5,)),
            id="header-wins-even-if-older",
        ),
        pytest.param(
            [("last_event_id", A)], {"Last-Event-ID": ""}, Cursor(1, (3,)), id="empty-header"
        ),
        pytest.param(
            [("last_event_id", A)], {"Last-Event-ID": "   "}, Cursor(1, (3,)), id="blank-header"
        ),
        pytest.param([], {"Last-Event-ID": f" {B} "}, Cursor(1, (5,)), id="header-trimmed"),
        pytest.param([("last_event_id", "")], {}, None, id="empty-query"),
        pytest.param(
            [], CIMultiDict([("last-event-id", B)]), Cursor(1, (5,)), id="header-case-insensitive"
        ),
        pytest.param([], {"Last-Event-ID": "5-1"}, LegacyId("5-1"), id="legacy-header"),
    ],
)
def test_stream_position(
    pairs: Pairs, headers: Mapping[str, str], expected: Position | None
) -> None:
    got = parse_stream_params(MultiDict(pairs), headers)

    assert got.last_event_id == expected
    assert got.types is None


@pytest.mark.parametrize(
    ("pairs", "headers", "name"),
    [
        pytest.param([], {"Last-Event-ID": "abc"}, "Last-Event-ID", id="bad-header"),
        pytest.param(
            [("last_event_id", A)],
            {"Last-Event-ID": "abc"},
            "Last-Event-ID",
            id="bad-header-good-query",
        ),
        pytest.param(
            [("last_event_id", "abc")],
            {"Last-Event-ID": B},
            "last_event_id",
            id="bad-query-good-header",
        ),
        pytest.param([], {"Last-Event-ID": "5-"}, "Last-Event-ID", id="header-no-seq"),
        pytest.param([], {"Last-Event-ID": "1.AAAAAQ"}, "Last-Event-ID", id="header-cut-off"),
        pytest.param([("last_event_id", "x-y")], {}, "last_event_id", id="bad-query"),
        pytest.param([("last_event_id", " ")], {}, "last_event_id", id="blank-query"),
    ],
)
def test_malformed_position_is_invalid_cursor(
    pairs: Pairs, headers: Mapping[str, str], name: str
) -> None:
    err = assert_400(lambda: parse_stream_params(MultiDict(pairs), headers), "invalid_cursor")

    assert name in err.message


def test_repeated_last_event_id_is_invalid_query() -> None:
    query = MultiDict([("last_event_id", A), ("last_event_id", B)])

    assert_400(lambda: parse_stream_params(query, {}), "invalid_query")
