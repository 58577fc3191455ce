"""shared.events.decode_record: Kafka record value -> envelope or dead letter (pure)."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest

from shared.events import (
    Dead,
    DeadReason,
    Envelope,
    RecordFields,
    decode_record,
    decode_with_stdlib,
    encode_event,
    spliceable,
)
from shared.settings import DEFAULT_TYPE_FIELDS

MAX_BYTES = 1024
KEY = b"contact-42"
PARTITION = 1
OFFSET = 17
TS_MS = 1_764_410_400_000


FIELDS = RecordFields(
    key=KEY,
    partition=PARTITION,
    offset=OFFSET,
    timestamp_ms=TS_MS,
    max_bytes=MAX_BYTES,
    type_fields=DEFAULT_TYPE_FIELDS,
)


def decode(
    value: bytes | None,
    *,
    key: bytes | None = KEY,
    max_bytes: int = MAX_BYTES,
    type_fields: tuple[str, ...] = DEFAULT_TYPE_FIELDS,
) -> Envelope | Dead:
    return decode_record(
        value,
        key=key,
        partition=PARTITION,
        offset=OFFSET,
        timestamp_ms=TS_MS,
        max_bytes=max_bytes,
        type_fields=type_fields,
    )


def envelope_of(value: bytes, **kwargs: Any) -> tuple[Envelope, dict[str, Any]]:
    out = decode(value, **kwargs)
    assert isinstance(out, Envelope), out
    return out, json.loads(out.data)


def ordered(obj: Any) -> Any:
    """The value with every dict turned into its list of items, so key order counts."""
    if isinstance(obj, dict):
        return [(k, ordered(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [ordered(v) for v in obj]
    return obj


def strict_loads(data: bytes) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=reject)


# --- valid events --------------------------------------------------------------------------


def test_valid_pascal_case_event_becomes_an_envelope() -> None:
    value = b'{"Type":"ContactCreated","Ts":"2026-11-29T10:00:00Z","ContactId":42}'

    out, parsed = envelope_of(value)

    assert out.type == "ContactCreated"
    assert list(parsed) == ["type", "key", "partition", "offset", "timestamp_ms", "event"]
    assert parsed == {
        "type": "ContactCreated",
        "key": "contact-42",
        "partition": PARTITION,
        "offset": OFFSET,
        "timestamp_ms": TS_MS,
        "event": {"Type": "ContactCreated", "Ts": "2026-11-29T10:00:00Z", "ContactId": 42},
    }


@pytest.mark.parametrize(
    ("event", "type_fields", "expected"),
    [
        pytest.param(
            {"Type": "A", "type": "B", "eventType": "C"}, DEFAULT_TYPE_FIELDS, "A", id="Type-first"
        ),
        pytest.param({"type": "B", "eventType": "C"}, DEFAULT_TYPE_FIELDS, "B", id="type-second"),
        pytest.param({"eventType": "C"}, DEFAULT_TYPE_FIELDS, "C", id="eventType-third"),
        pytest.param(
            {"eventType": "C", "type": "B"},
            DEFAULT_TYPE_FIELDS,
            "B",
            id="field-order-not-key-order",
        ),
        pytest.param({"kind": "K", "Type": "A"}, ("kind",), "K", id="configured-field"),
        pytest.param({"Type": "A", "kind": "K"}, ("kind", "Type"), "K", id="configured-order-wins"),
        pytest.param(
            {"Type": "Deal.Won:v2_x-y"}, DEFAULT_TYPE_FIELDS, "Deal.Won:v2_x-y", id="punctuation"
        ),
        pytest.param({"Type": "T" * 128}, DEFAULT_TYPE_FIELDS, "T" * 128, id="128-chars-ok"),
    ],
)
def test_type_is_read_from_the_first_configured_field_present(
    event: dict[str, Any], type_fields: tuple[str, ...], expected: str
) -> None:
    out, parsed = envelope_of(json.dumps(event).encode(), type_fields=type_fields)

    assert out.type == expected
    assert parsed["type"] == expected
    assert parsed["event"] == event


# --- dead letters ----------------------------------------------------------------------------

DEAD_CASES = [
    # empty
    pytest.param(None, DeadReason.EMPTY, id="empty-none-tombstone"),
    pytest.param(b"", DeadReason.EMPTY, id="empty-bytes"),
    # not_utf8
    pytest.param(b'{"Type":"A","x":"\xff"}', DeadReason.NOT_UTF8, id="not_utf8-ff"),
    pytest.param(b"\xc3\x28", DeadReason.NOT_UTF8, id="not_utf8-bad-continuation"),
    pytest.param(b'{"Type":"\xc0\xaf"}', DeadReason.NOT_UTF8, id="not_utf8-overlong"),
    pytest.param(b'{"Type":"A","x":"\xed\xa0\x80"}', DeadReason.NOT_UTF8, id="not_utf8-surrogate"),
    pytest.param(b'{"Type":"A","x":"\xe2\x82"}', DeadReason.NOT_UTF8, id="not_utf8-truncated"),
    # not_json
    pytest.param(b"{", DeadReason.NOT_JSON, id="not_json-unclosed"),
    pytest.param(b"   ", DeadReason.NOT_JSON, id="not_json-whitespace"),
    pytest.param(b"{'Type':'A'}", DeadReason.NOT_JSON, id="not_json-single-quotes"),
    pytest.param(b'{"Type":"A"} trailing', DeadReason.NOT_JSON, id="not_json-trailing-garbage"),
    pytest.param(b'{"Type":"A","x":"a\nb"}', DeadReason.NOT_JSON, id="not_json-raw-newline"),
    pytest.param(b'{"Type":"A",}', DeadReason.NOT_JSON, id="not_json-trailing-comma"),
    pytest.param(b'{"Type":"A","x":NaN}', DeadReason.NOT_JSON, id="not_json-NaN"),
    pytest.param(b'{"Type":"A","x":Infinity}', DeadReason.NOT_JSON, id="not_json-Infinity"),
    pytest.param(b'{"Type":"A","x":[-Infinity]}', DeadReason.NOT_JSON, id="not_json-neg-Infinity"),
    pytest.param(b"NaN", DeadReason.NOT_JSON, id="not_json-bare-NaN"),
    pytest.param(b"[" * 100_000, DeadReason.NOT_JSON, id="not_json-deep-unclosed"),
    # not_object
    pytest.param(b"[]", DeadReason.NOT_OBJECT, id="not_object-empty-array"),
    pytest.param(b'[{"Type":"A"}]', DeadReason.NOT_OBJECT, id="not_object-array-of-events"),
    pytest.param(b'"ContactCreated"', DeadReason.NOT_OBJECT, id="not_object-string"),
    pytest.param(b"42", DeadReason.NOT_OBJECT, id="not_object-number"),
    pytest.param(b"null", DeadReason.NOT_OBJECT, id="not_object-null"),
    pytest.param(b"true", DeadReason.NOT_OBJECT, id="not_object-bool"),
    # missing_type
    pytest.param(b"{}", DeadReason.MISSING_TYPE, id="missing_type-empty-object"),
    pytest.param(b'{"Kind":"A"}', DeadReason.MISSING_TYPE, id="missing_type-other-field"),
    pytest.param(b'{"TYPE":"A"}', DeadReason.MISSING_TYPE, id="missing_type-case-sensitive"),
    pytest.param(b'{"Type":null}', DeadReason.MISSING_TYPE, id="missing_type-null"),
    pytest.param(b'{"x":{"Type":"A"}}', DeadReason.MISSING_TYPE, id="missing_type-nested-only"),
    # bad_type
    pytest.param(b'{"Type":42}', DeadReason.BAD_TYPE, id="bad_type-number"),
    pytest.param(b'{"Type":true}', DeadReason.BAD_TYPE, id="bad_type-bool"),
    pytest.param(b'{"Type":["A"]}', DeadReason.BAD_TYPE, id="bad_type-array"),
    pytest.param(b'{"Type":{"Name":"A"}}', DeadReason.BAD_TYPE, id="bad_type-object"),
    pytest.param(b'{"Type":""}', DeadReason.BAD_TYPE, id="bad_type-empty"),
    pytest.param(b'{"Type":"Contact Created"}', DeadReason.BAD_TYPE, id="bad_type-space"),
    pytest.param(b'{"Type":"Contact\\nCreated"}', DeadReason.BAD_TYPE, id="bad_type-newline"),
    pytest.param(b'{"Type":"Contact\\rCreated"}', DeadReason.BAD_TYPE, id="bad_type-cr"),
    pytest.param(b'{"Type":"\\nContact"}', DeadReason.BAD_TYPE, id="bad_type-leading-newline"),
    # A trailing "\n" once passed TYPE_RE.match ('$' matches before a final newline) and
    # would have split the "<id> <type> <ts> <envelope>" line published to the edges.
    pytest.param(
        b'{"Type":"ContactCreated\\n"}', DeadReason.BAD_TYPE, id="bad_type-trailing-newline"
    ),
    pytest.param(b'{"Type":"Contact\\u0000"}', DeadReason.BAD_TYPE, id="bad_type-nul"),
    pytest.param(b'{"Type":"Contact/Created"}', DeadReason.BAD_TYPE, id="bad_type-slash"),
    pytest.param('{"Type":"Kontaktä"}'.encode(), DeadReason.BAD_TYPE, id="bad_type-non-ascii"),
    pytest.param(b'{"Type":"' + b"T" * 129 + b'"}', DeadReason.BAD_TYPE, id="bad_type-129-chars"),
    pytest.param(b'{"Type":5,"type":"B"}', DeadReason.BAD_TYPE, id="bad_type-first-field-decides"),
]


@pytest.mark.parametrize(("value", "reason"), DEAD_CASES)
def test_invalid_values_are_dead_letters_with_a_reason(
    value: bytes | None, reason: DeadReason
) -> None:
    out = decode(value, max_bytes=200_000)

    assert isinstance(out, Dead), out
    assert out.reason is reason
    assert out.detail
    assert "\n" not in out.detail


def test_configured_type_fields_replace_the_defaults() -> None:
    out = decode(b'{"Type":"A"}', type_fields=("kind",))

    assert isinstance(out, Dead)
    assert out.reason is DeadReason.MISSING_TYPE
    assert "kind" in out.detail


def _value_of_size(size: int) -> bytes:
    base = b'{"Type":"A","pad":""}'
    value = base[:-2] + b"x" * (size - len(base)) + base[-2:]
    assert len(value) == size
    return value


def test_value_of_exactly_max_bytes_is_accepted() -> None:
    out = decode(_value_of_size(MAX_BYTES))

    assert isinstance(out, Envelope)


def test_value_of_max_plus_one_bytes_is_too_large() -> None:
    out = decode(_value_of_size(MAX_BYTES + 1))

    assert isinstance(out, Dead)
    assert out.reason is DeadReason.TOO_LARGE
    assert str(MAX_BYTES + 1) in out.detail
    assert str(MAX_BYTES) in out.detail


def test_size_is_checked_before_decoding() -> None:
    out = decode(b"\xff" * (MAX_BYTES + 1))

    assert isinstance(out, Dead)
    assert out.reason is DeadReason.TOO_LARGE


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'{"Type":"A","x":1e400}', id="overflow-positive"),
        pytest.param(b'{"Type":"A","x":[-1e400]}', id="overflow-negative"),
    ],
)
def test_number_overflowing_a_float_never_yields_infinity(value: bytes) -> None:
    out = decode(value)

    if isinstance(out, Dead):
        assert out.reason is DeadReason.NOT_JSON
    else:
        strict_loads(out.data)


def _deepest_parsable(wrap: bytes) -> int:
    """The deepest nesting ``json.loads`` accepts from here (binary search)."""
    lo, hi = 1, sys.getrecursionlimit() + 10
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            json.loads(wrap[:-1] + b"[" * mid + b"]" * mid + wrap[-1:])  # like decode
        except RecursionError:
            hi = mid
        else:
            lo = mid
    return lo


def test_deep_nesting_never_raises() -> None:
    # Nesting just under the parser's limit parses, but the envelope adds two levels when
    # encoded. Probe around the limit as seen from this stack depth.
    wrap = b'{"Type":"A","x":}'

    def nested(depth: int) -> bytes:
        return wrap[:-1] + b"[" * depth + b"]" * depth + wrap[-1:]

    limit = _deepest_parsable(wrap)
    assert isinstance(decode(nested(limit - 20), max_bytes=1 << 20), Envelope)
    for depth in range(limit - 20, limit + 5):
        out = decode(nested(depth), max_bytes=1 << 20)
        assert isinstance(out, Envelope | Dead)


# --- the envelope's shape ----------------------------------------------------------------------

EVENTS = [
    pytest.param(b'{"Type":"A"}', id="minimal"),
    pytest.param(
        b'{"Zeta":1,"Type":"A","alpha":[{"b":1,"a":2}],"Mid":{"z":null,"y":true}}', id="order"
    ),
    pytest.param(
        b'{\n  "Type": "A",\n  "Amount": 12.5,\n  "Tags": [ "x" , "y" ]\n}\r\n', id="pretty-printed"
    ),
    pytest.param(
        b'{"Type":"A","Big":1180591620717411303424,"Neg":-3,"F":0.1,"E":1e-07}', id="numbers"
    ),
    pytest.param(b'{"Type":"A","Max":1.7976931348623157e308,"Tiny":5e-324}', id="double-limits"),
    pytest.param('{"Type":"A","Name":"Zoë Ødegård 日本語 😀"}'.encode(), id="unicode"),
    pytest.param(b'{"Type":"A","Esc":"\\u00e9\\ud83d\\ude00"}', id="unicode-escapes"),
    pytest.param(b'{"Type":"A","Quote":"say \\"hi\\" \\\\ / \\/"}', id="quotes-backslashes"),
    pytest.param(b'{"Type":"A","Type":"B"}', id="duplicate-key-last-wins"),
    pytest.param(b'{ "Type" : "A" ,\t"x" : [ 1 , 2 ] }', id="spaces-and-tabs"),
    pytest.param(b'{"Type":"A","Deep":' + b"[" * 300 + b"]" * 300 + b"}", id="nested-300"),
    pytest.param(b'{"Type":"A","Deep":' + b"[" * 520 + b"]" * 520 + b"}", id="nested-520"),
]


def envelope_head(type_: str) -> bytes:
    return (
        b'{"type":"%s","key":"contact-42","partition":%d,"offset":%d,"timestamp_ms":%d,"event":'
        % (type_.encode(), PARTITION, OFFSET, TS_MS)
    )


@pytest.mark.parametrize("value", EVENTS)
def test_envelope_is_one_line_holding_the_original_event(value: bytes) -> None:
    out, parsed = envelope_of(value, max_bytes=1 << 20)

    assert b"\n" not in out.data
    assert b"\r" not in out.data
    strict_loads(out.data)
    # json.dumps keeps key order: equal dumps, equal keys, order and values.
    assert json.dumps(parsed["event"]) == json.dumps(json.loads(value))
    assert parsed["type"] == out.type
    if spliceable(value):
        # One line already: the producer's bytes are used as they are.
        assert out.data == envelope_head(out.type) + value + b"}"
    else:
        recompacted = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
        assert out.data == recompacted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b'{"Type":"A"}', True, id="compact"),
        pytest.param(b'{ "Type": "A",\t"x": 1 }', True, id="spaces-tabs-inside"),
        pytest.param(b'{"Type":"A"}\n', False, id="trailing-newline"),
        pytest.param(b' {"Type":"A"}', False, id="leading-space"),
        pytest.param(b'{"Type":"A",\r\n"x":1}', False, id="crlf"),
        pytest.param(b'{"Type":"A",\r"x":1}', False, id="cr"),
        pytest.param(b'{"Type":"A",\n"x":1}', False, id="lf"),
        pytest.param(b'[{"Type":"A"}]', False, id="array"),
        pytest.param(b'{"x":' + b"[" * 511 + b"]" * 511 + b"}", True, id="512-openers"),
        pytest.param(b'{"x":' + b"[" * 512 + b"]" * 512 + b"}", False, id="513-openers"),
        pytest.param(b'{"x":"' + b"{" * 1100 + b'"}', False, id="openers-in-strings-count-too"),
        pytest.param(b'{"x":"' + b"{" * 600 + b'"}', True, id="short-values-are-not-counted"),
    ],
)
def test_splice_rule(value: bytes, expected: bool) -> None:
    assert spliceable(value) is expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'{"Type":"A","x":"\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"Type":"A","x":1e400}', id="overflow"),
        pytest.param(b'{"Type":"A","x":NaN}', id="nan"),
        pytest.param(b'{"Type":"A","x":"\xff"}', id="not-utf8"),
    ],
)
def test_values_orjson_refuses_are_never_spliced(value: bytes) -> None:
    out = decode(value)

    # The standard-library path decides, exactly as before the fast path existed.
    assert out == decode_with_stdlib(value, **FIELDS)
    if isinstance(out, Envelope):
        out.data.decode("utf-8")
        strict_loads(out.data)


def test_spliced_and_stdlib_envelopes_parse_to_the_same_value() -> None:
    value = b'{"Type":"A","Big":1180591620717411303424,"Esc":"\\u00e9","E":1E5,"Z":-0}'
    out = encode_event(value, **FIELDS)
    reference = decode_with_stdlib(value, **FIELDS)
    assert isinstance(out, tuple) and isinstance(reference, Envelope)
    assert value in out[1]
    assert ordered(json.loads(out[1])) == ordered(json.loads(reference.data))
    assert json.loads(out[1])["event"]["Big"] == 1180591620717411303424


def test_unicode_is_kept_as_utf8_not_escaped() -> None:
    text = "Zoë Ødegård 日本語 😀"
    out, parsed = envelope_of(json.dumps({"Type": "A", "Name": text}, ensure_ascii=False).encode())

    assert text.encode("utf-8") in out.data
    assert parsed["event"]["Name"] == text


def test_unicode_escapes_from_the_producer_give_back_the_same_text() -> None:
    text = "Zoë Ødegård 日本語 😀"
    out, parsed = envelope_of(json.dumps({"Type": "A", "Name": text}).encode())

    assert parsed["event"]["Name"] == text
    out.data.decode("utf-8")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'{"Type":"A","x":"\\ud800"}', id="lone-high"),
        pytest.param(b'{"Type":"A","x":"\\udfff tail"}', id="lone-low"),
        pytest.param('{"Type":"A","\\ud800":"Zoë"}'.encode(), id="lone-in-key-with-unicode"),
    ],
)
def test_lone_surrogate_escape_still_gives_valid_utf8_json(value: bytes) -> None:
    out, _ = envelope_of(value)

    text = out.data.decode("utf-8")  # strict: raises if the bytes are not UTF-8
    assert ordered(json.loads(text)["event"]) == ordered(json.loads(value))
    assert "\n" not in text


@pytest.mark.parametrize(
    ("key", "field", "expected"),
    [
        pytest.param(b"contact-42", "key", "contact-42", id="utf8"),
        pytest.param("kontakt-ö".encode(), "key", "kontakt-ö", id="utf8-non-ascii"),
        pytest.param(None, "key", None, id="none"),
        pytest.param(b"", "key", "", id="empty"),
        pytest.param(
            b"\xff\xfe\x00id", "key_b64", base64.b64encode(b"\xff\xfe\x00id").decode(), id="binary"
        ),
    ],
)
def test_record_key_is_text_or_base64(key: bytes | None, field: str, expected: str | None) -> None:
    _, parsed = envelope_of(b'{"Type":"A"}', key=key)

    assert parsed[field] == expected
    assert ({"key", "key_b64"} - {field}).isdisjoint(parsed)
    if field == "key_b64":
        assert base64.b64decode(parsed["key_b64"]) == key


CONTROL_CHARS = ["\r", "\n", "\r\n", "\x00", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", CONTROL_CHARS, ids=[f"U+{ord(c[0]):04X}" for c in CONTROL_CHARS])
@pytest.mark.parametrize("where", ["value", "object-key", "record-key"])
def test_control_characters_never_reach_the_data_line_raw(char: str, where: str) -> None:
    event: dict[str, Any] = {"Type": "A"}
    record_key = b"k"
    if where == "value":
        event["Note"] = f"a{char}b"
    elif where == "object-key":
        event[f"a{char}b"] = 1
    else:
        record_key = f"k{char}".encode()
    value = json.dumps(event).encode()  # ASCII with \uXXXX escapes, as producers send

    out, parsed = envelope_of(value, key=record_key)

    assert b"\r" not in out.data
    assert b"\n" not in out.data
    assert b"\x00" not in out.data
    assert parsed["event"] == event
    assert parsed["key"] == record_key.decode()
