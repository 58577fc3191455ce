"""shared.cursor: the SSE id / history cursor. Round trip, one spelling per cursor, every
malformed class refused with CursorError (the edge's 400), a fuzz test, the ordering laws
of ``advanced``/``merged``, the hub's incremental encoder, and the size bound."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.cursor import (
    MAX_CURSOR_CHARS,
    MAX_EPOCH,
    MAX_PARTITIONS,
    MAX_POSITION,
    Cursor,
    CursorEncoder,
    CursorError,
    decode_cursor,
    is_legacy_id,
)

EPOCH = 0xDEADBEEF
positions_st = st.one_of(
    st.none(),
    st.integers(0, 2**14),
    st.integers(0, MAX_POSITION),
    st.sampled_from([0, 126, 127, 128, 2**21 - 2, 2**21 - 1, MAX_POSITION - 1, MAX_POSITION]),
)
epochs_st = st.integers(0, MAX_EPOCH)
vectors_st = st.lists(positions_st, max_size=80).map(tuple)
cursors_st = st.builds(Cursor, epochs_st, vectors_st)


@st.composite
def wide_cursors(draw: st.DrawFn) -> Cursor:
    """Up to MAX_PARTITIONS partitions (drawn from a seed: Hypothesis' lists stay small)."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    count = draw(st.sampled_from([0, 1, MAX_PARTITIONS])) if draw(st.booleans()) else None
    if count is None:
        count = draw(st.integers(0, MAX_PARTITIONS))
    top = draw(st.sampled_from([10**9, 2**35, MAX_POSITION]))
    vector = tuple(None if rng.random() < 0.1 else rng.randint(0, top) for _ in range(count))
    return Cursor(draw(epochs_st), vector)


def text_of(payload: bytes) -> str:
    return "1." + base64.urlsafe_b64encode(payload).decode().rstrip("=")


HEAD = EPOCH.to_bytes(4, "big")


# --- round trip and canonical form ------------------------------------------------------


@given(cursors_st)
def test_round_trip(cursor: Cursor) -> None:
    text = cursor.encode()
    assert text.isascii() and text.startswith(b"1.")
    assert decode_cursor(text) == cursor
    assert decode_cursor(text.decode()) == cursor
    assert len(text) <= MAX_CURSOR_CHARS


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_cursors())
def test_round_trip_up_to_the_partition_limit(cursor: Cursor) -> None:
    text = cursor.encode()
    assert decode_cursor(text) == cursor
    assert len(text) <= MAX_CURSOR_CHARS


def test_the_largest_cursor_decodes() -> None:
    """MAX_CURSOR_CHARS refuses nothing this module can hand out."""
    largest = Cursor(MAX_EPOCH, (MAX_POSITION,) * MAX_PARTITIONS)
    text = largest.encode()
    assert len(text) == MAX_CURSOR_CHARS
    assert decode_cursor(text) == largest
    with pytest.raises(CursorError, match="longer than"):
        decode_cursor(text + b"A")


def test_documented_examples() -> None:
    assert Cursor(1, (1, 2, None)).encode() == b"1.AAAAAQMCAwA"
    assert decode_cursor("1.AAAAAQMBAgM") == Cursor(1, (0, 1, 2))
    assert decode_cursor("1.AAAAAAA") == Cursor(0, ())
    assert str(Cursor(1, (1, 2, None))) == "1.AAAAAQMCAwA"


def test_none_zero_and_missing_partitions_are_told_apart() -> None:
    cursor = decode_cursor(Cursor(EPOCH, (None, 0, 5)).encode())
    assert cursor.positions == (None, 0, 5)
    assert cursor.position(0) is None and cursor.position(1) == 0 and cursor.position(2) == 5
    assert cursor.position(3) is None and cursor.position(10**6) is None
    assert cursor.position(-1) is None


@given(st.binary(max_size=64))
def test_every_accepted_text_has_one_spelling(payload: bytes) -> None:
    """Whatever decodes encodes back to the very same text."""
    text = text_of(payload)
    try:
        cursor = decode_cursor(text)
    except CursorError:
        return
    assert cursor.encode().decode() == text


# --- malformed input ------------------------------------------------------------------------


def _b64_last_char_with_stray_bits() -> str:
    good = text_of(HEAD + b"\x00")  # 5 bytes: the last character carries 4 unused bits
    return good[:-1] + chr(ord(good[-1]) + 1)


MALFORMED = [
    pytest.param("", "not a cursor", id="empty"),
    pytest.param("AAAAAQA", "not a cursor", id="no-version"),
    pytest.param("2." + text_of(HEAD + b"\x00")[2:], "unsupported cursor version '2'", id="v2"),
    pytest.param("01." + text_of(HEAD + b"\x00")[2:], "version '01'", id="v01"),
    pytest.param(".AAAAAQA", "version ''", id="no-version-digits"),
    pytest.param("1.AAAA*QA", "base64url alphabet", id="bad-char"),
    pytest.param("1.AAA+AQA", "base64url alphabet", id="std-b64-plus"),
    pytest.param("1.AAA/AQA", "base64url alphabet", id="std-b64-slash"),
    pytest.param("1.AAAA AQA", "base64url alphabet", id="space"),
    pytest.param("1.AAAA.AQA", "base64url alphabet", id="second-dot"),
    pytest.param(text_of(HEAD + b"\x00") + "=", "padded", id="padding"),
    pytest.param("1.AAAAAQAA=", "padded", id="padding-2"),
    pytest.param("1.AAAAA", "impossible length", id="b64-length"),
    pytest.param(_b64_last_char_with_stray_bits(), "canonical", id="b64-stray-bits"),
    pytest.param("1.", "too short", id="no-payload"),
    pytest.param(text_of(HEAD), "too short", id="no-count"),
    pytest.param(text_of(b"\x00\x00\x01"), "too short", id="short-epoch"),
    pytest.param(text_of(HEAD + b"\x80"), "partition count: the number is cut off", id="cut-count"),
    pytest.param(text_of(HEAD + b"\x01\x80"), "partition 0: the number is cut off", id="cut-value"),
    pytest.param(
        text_of(HEAD + b"\x02\x01\xff\xff"), "partition 1: the number is cut off", id="cut-value-2"
    ),
    pytest.param(
        text_of(HEAD + b"\x01" + b"\xff" * 9 + b"\x01"), "longer than 9 bytes", id="overlong"
    ),
    pytest.param(
        text_of(HEAD + b"\x01" + b"\x80" * 9 + b"\x00"), "longer than 9 bytes", id="overlong-zero"
    ),
    pytest.param(
        text_of(HEAD + b"\x01\x81\x00"), "partition 0: .* shortest form", id="non-minimal"
    ),
    pytest.param(text_of(HEAD + b"\x01\x80\x00"), "shortest form", id="non-minimal-zero"),
    pytest.param(
        text_of(HEAD + b"\x81\x00\x01"), "partition count: .* shortest form", id="non-minimal-count"
    ),
    pytest.param(text_of(HEAD + b"\x03\x01\x01"), "names 3 partitions but holds 2", id="count>"),
    pytest.param(text_of(HEAD + b"\x01"), "names 1 partitions but holds 0", id="count-empty"),
    pytest.param(text_of(HEAD + b"\x01\x01\x05"), "1 bytes after the last", id="trailing"),
    pytest.param(text_of(HEAD + b"\x00\x00"), "1 bytes after the last", id="trailing-zero"),
    pytest.param(text_of(HEAD + b"\x81\x20"), "4097 partitions, at most 4096", id="too-many"),
    pytest.param(
        text_of(HEAD + b"\xff\xff\xff\xff\x0f"), "partitions, at most 4096", id="way-too-many"
    ),
    pytest.param("1." + "A" * MAX_CURSOR_CHARS, "longer than", id="too-long"),
    pytest.param("1.AAAAAQé", "not ASCII", id="non-ascii-str"),
    pytest.param(b"1.AAAAAQ\xff", "not ASCII", id="non-ascii-bytes"),
    pytest.param("1.AAAAAQ\u0661", "not ASCII", id="arabic-digit"),
    pytest.param("1764410400123-0", "not a cursor", id="legacy-id"),
]


@pytest.mark.parametrize(("text", "detail"), MALFORMED)
def test_malformed_cursors_are_refused_saying_why(text: str | bytes, detail: str) -> None:
    with pytest.raises(CursorError, match=detail) as caught:
        decode_cursor(text)
    assert caught.value.detail == str(caught.value)


def test_the_longest_accepted_and_the_first_refused_length() -> None:
    # Length is checked before any decoding work: a huge value fails fast with the length.
    with pytest.raises(CursorError, match="longer than"):
        decode_cursor("1." + "A" * 10**6)
    with pytest.raises(CursorError, match="longer than"):
        decode_cursor(b"\xff" * (MAX_CURSOR_CHARS + 1))


# --- fuzz ---------------------------------------------------------------------------------------


def _only_cursor_errors(text: str | bytes) -> None:
    try:
        cursor = decode_cursor(text)
    except CursorError as exc:
        assert exc.detail
        return
    raw = text.encode() if isinstance(text, str) else text
    assert cursor.encode() == raw


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_fuzz_random_input_raises_only_cursor_errors(text: str | bytes) -> None:
    _only_cursor_errors(text)


@settings(max_examples=400)
@given(st.from_regex(r"\A[0-9]?\.?[A-Za-z0-9_=+/-]{0,60}\Z"))
def test_fuzz_near_cursors_raises_only_cursor_errors(text: str) -> None:
    _only_cursor_errors(text)


@settings(max_examples=300)
@given(cursors_st, st.data())
def test_fuzz_mutated_cursors_raise_only_cursor_errors(cursor: Cursor, data: st.DataObject) -> None:
    raw = bytearray(cursor.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(raw)))
        if action == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    _only_cursor_errors(bytes(raw))


# --- construction bounds -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "positions"),
    [
        (-1, ()),
        (2**32, ()),
        (0, (-1,)),
        (0, (MAX_POSITION + 1,)),
        (0, (1, "2")),
        (0, (True,)),
        (0, (None,) * (MAX_PARTITIONS + 1)),
    ],
)
def test_out_of_range_vectors_are_refused(epoch: int, positions: tuple[object, ...]) -> None:
    with pytest.raises(CursorError):
        Cursor(epoch, positions)  # type: ignore[arg-type]
    with pytest.raises(CursorError):
        CursorEncoder(epoch, positions)  # type: ignore[arg-type]


def test_advanced_refuses_out_of_range() -> None:
    cursor = Cursor(EPOCH, ())
    for partition, position in [(-1, 1), (MAX_PARTITIONS, 1), (0, -1), (0, MAX_POSITION + 1)]:
        with pytest.raises(CursorError):
            cursor.advanced(partition, position)
        with pytest.raises(CursorError):
            CursorEncoder(EPOCH, []).set(partition, position)
        with pytest.raises(CursorError):
            CursorEncoder(EPOCH, [1] * 8).set(partition, position)  # an existing partition
    with pytest.raises(CursorError):
        CursorEncoder(EPOCH, [1]).set(True, 5)


# --- ordering laws -----------------------------------------------------------------------------


def _at_least(a: int | None, b: int | None) -> bool:
    """a >= b with None below every position."""
    return b is None or (a is not None and a >= b)


partitions_st = st.integers(0, 90)
small_positions_st = st.integers(0, 10**12)


@given(cursors_st, partitions_st, small_positions_st)
def test_advanced_is_monotone_and_grows(cursor: Cursor, partition: int, position: int) -> None:
    after = cursor.advanced(partition, position)
    assert after.epoch == cursor.epoch
    assert len(after.positions) == max(len(cursor.positions), partition + 1)
    for p in range(len(after.positions)):
        assert _at_least(after.position(p), cursor.position(p))
        if p != partition:
            assert after.position(p) == cursor.position(p)
    assert after.position(partition) == max(position, cursor.position(partition) or 0)
    assert decode_cursor(after.encode()) == after


@given(cursors_st, partitions_st, small_positions_st)
def test_advanced_is_idempotent(cursor: Cursor, partition: int, position: int) -> None:
    once = cursor.advanced(partition, position)
    assert once.advanced(partition, position) == once


@given(cursors_st, partitions_st, small_positions_st, partitions_st, small_positions_st)
def test_advanced_commutes(cursor: Cursor, p: int, x: int, q: int, y: int) -> None:
    assert cursor.advanced(p, x).advanced(q, y) == cursor.advanced(q, y).advanced(p, x)


def test_advanced_never_moves_back() -> None:
    cursor = Cursor(EPOCH, (10, None))
    assert cursor.advanced(0, 3) is cursor
    assert cursor.advanced(0, 10) is cursor
    assert cursor.advanced(1, 0).positions == (10, 0)
    assert cursor.advanced(3, 7).positions == (10, None, None, 7)


same_epoch_pairs = st.tuples(vectors_st, vectors_st, vectors_st).map(
    lambda vs: tuple(Cursor(EPOCH, v) for v in vs)
)


@given(same_epoch_pairs)
def test_merged_laws(cursors: tuple[Cursor, Cursor, Cursor]) -> None:
    a, b, c = cursors
    ab = a.merged(b)
    assert ab == b.merged(a)  # commutative
    assert a.merged(a) == a  # idempotent
    assert ab.merged(c) == a.merged(b.merged(c))  # associative
    assert ab.merged(a) == ab  # absorbs its parts
    assert len(ab.positions) == max(len(a.positions), len(b.positions))
    for p in range(len(ab.positions)):  # the least upper bound
        assert _at_least(ab.position(p), a.position(p))
        assert _at_least(ab.position(p), b.position(p))
        assert ab.position(p) in (a.position(p), b.position(p))


def test_merged_refuses_another_epoch() -> None:
    with pytest.raises(ValueError, match="epochs"):
        Cursor(1, ()).merged(Cursor(2, ()))


# --- the hub's incremental encoder --------------------------------------------------------------


@given(
    epochs_st,
    vectors_st,
    st.lists(st.tuples(partitions_st, st.one_of(small_positions_st, positions_st)), max_size=60),
)
def test_encoder_agrees_with_cursor_encode(
    epoch: int, start: tuple[int | None, ...], steps: list[tuple[int, int | None]]
) -> None:
    encoder = CursorEncoder(epoch, start)
    expected = list(start)
    assert encoder.encode() == Cursor(epoch, start).encode()
    for partition, position in steps:
        if position is None:
            continue
        encoder.set(partition, position)
        expected += [None] * (partition + 1 - len(expected))
        expected[partition] = position
        cursor = Cursor(epoch, tuple(expected))
        assert encoder.cursor() == cursor
        assert encoder.encode() == cursor.encode()
        assert encoder.encode() == cursor.encode()  # the cached text
        assert encoder.position(partition) == position
    assert decode_cursor(encoder.encode()) == encoder.cursor()
    assert encoder.epoch == epoch


def test_encoder_keeps_its_text_until_something_changes() -> None:
    encoder = CursorEncoder(EPOCH, [5, None])
    first = encoder.encode()
    encoder.set(0, 5)
    assert encoder.encode() is first
    encoder.set(1, 0)
    assert encoder.encode() != first
    assert decode_cursor(encoder.encode()).positions == (5, 0)


# --- size ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [3, 12, 64])
def test_size_is_within_12_bytes_per_partition(partitions: int) -> None:
    rng = random.Random(partitions)
    realistic = Cursor(EPOCH, tuple(rng.randint(10**6, 10**9) for _ in range(partitions)))
    high = Cursor(EPOCH, (10**9,) * partitions)
    low = Cursor(EPOCH, (10**6,) * partitions)
    worst = Cursor(EPOCH, (MAX_POSITION,) * partitions)
    sizes = {
        name: len(c.encode())
        for name, c in [("1e6", low), ("random 1e6..1e9", realistic), ("1e9", high)]
    }
    print(
        f"\ncursor size at {partitions} partitions: "
        + ", ".join(f"{name}: {n} B ({n / partitions:.2f}/partition)" for name, n in sizes.items())
        + f", every offset at 2**63: {len(worst.encode())} B"
    )
    for n in sizes.values():
        assert n <= 12 * partitions + 16
        assert n <= 7 * partitions + 10  # realistic offsets: 5-byte varints, base64'd
    # Even the largest possible offsets stay within about 12 bytes per partition.
    assert len(worst.encode()) <= 12 * partitions + 12


# --- the old format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "legacy"),
    [
        ("1764410400123-0", True),
        (b"0-0", True),
        ("18446744073709551615-18446744073709551615", True),
        ("1.AAAAAQMCAwA", False),
        ("", False),
        ("12", False),
        ("1-2-3", False),
        ("-1", False),
        ("1-", False),
        ("\u0661-1", False),
        ("123456789012345678901-0", False),
    ],
)
def test_legacy_ids_are_recognised(text: str | bytes, legacy: bool) -> None:
    assert is_legacy_id(text) is legacy
