"""shared.events.encode_event (orjson + splice) against the standard-library path: the same
dead letters with the same reasons and details, and envelopes that parse to the same value."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from shared.events import Dead, Envelope, decode_with_stdlib, encode_event

TYPE_FIELDS = ("Type", "type", "eventType")
MATCH_FIELDS = ("TenantId", "N")
MAX_BYTES = 4096
COMMON = {"partition": 2, "offset": 99, "timestamp_ms": 1_764_410_400_000, "max_bytes": MAX_BYTES}

STRINGS = [
    "",
    "plain",
    "Zoë 日本語 😀",
    "tab\there",
    "nl\nhere",
    "cr\rhere",
    'quote"back\\slash/',
    "\u2028\u2029\x85\x7f\x00",
]
ESCAPES = ["\\u00e9", "\\ud83d\\ude00", "\\ud800", "\\udfff", "\\u0000", "\\/", "\\n", "\\r"]
NUMBERS = [
    "0",
    "-0",
    "1",
    "-3",
    "0.1",
    "1e-07",
    "1E5",
    "2.5e-324",
    "1e-400",
    "1.7976931348623157e308",
    "1.7976931348623159e308",
    "1e400",
    "-1e400",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1180591620717411303424",
    "1" * 400,
    "NaN",
    "Infinity",
    "-Infinity",
]
TYPES = ['"ContactCreated"', '"Deal.Won:v2_x-y"', '"a b"', '"T\\n"', "42", "null", '["A"]', '""']


VALID_NUMBERS = [n for n in NUMBERS if n not in ("1.7976931348623159e308", "1e400", "-1e400")]
VALID_NUMBERS = [n for n in VALID_NUMBERS if "N" not in n and "I" not in n]


def _scalar(rng: random.Random) -> str:
    pick = rng.random()
    if rng.random() < 0.7:  # mostly valid, so that the fast path is exercised
        return rng.choice([*VALID_NUMBERS, '"text"', json.dumps("Zoë", ensure_ascii=False)])
    if pick < 0.3:
        return json.dumps(rng.choice(STRINGS), ensure_ascii=rng.random() < 0.5)
    if pick < 0.45:
        return '"' + "".join(rng.choice(ESCAPES) for _ in range(rng.randint(1, 3))) + '"'
    if pick < 0.85:
        return rng.choice(NUMBERS)
    return rng.choice(["true", "false", "null"])


def _value(rng: random.Random, depth: int) -> str:
    if depth > 3 or rng.random() < 0.6:
        return _scalar(rng)
    if rng.random() < 0.5:
        return "[" + ",".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return _object(rng, depth + 1, with_type=False)


def _object(rng: random.Random, depth: int, *, with_type: bool) -> str:
    members = []
    if with_type and rng.random() < 0.9:
        types = TYPES[:2] if rng.random() < 0.7 else TYPES
        members.append(f'"{rng.choice(TYPE_FIELDS)}":{rng.choice(types)}')
    for _ in range(rng.randint(0, 4)):
        name = rng.choice([*MATCH_FIELDS, "x", "Type", "Zeta", "k\\u00e9"])
        members.append(f'"{name}":{_value(rng, depth)}')
    rng.shuffle(members)
    sep = rng.choice([",", ",", ",", ", ", ",\t", ",\n  ", " ,\r\n"])
    colon = rng.choice([":", ": ", " : "])
    body = sep.join(m.replace('":', '"' + colon, 1) for m in members)
    return rng.choice(["{", "{", "{ ", "{\n"]) + body + rng.choice(["}", "}", " }", "\n}"])


MUTATIONS = [b'"', b"\\", b"{", b"}", b"[", b"\n", b"\r", b"\t", b"\x00", b"\xff", b"\xc3", b"\xed"]
MUTATIONS += [b"e", b"-", b".", b"0", b"N", b",", b":", b" ", "é".encode(), b"\xef\xbb\xbf"]


def _mutate(rng: random.Random, value: bytes) -> bytes:
    at = rng.randrange(len(value) + 1)
    op = rng.random()
    if op < 0.33 and value:
        return value[:at] + value[at + 1 :]
    if op < 0.66:
        return value[:at] + rng.choice(MUTATIONS) + value[at:]
    return value[:at] + rng.choice(MUTATIONS) + value[at + 1 :]


def corpus(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    values = []
    for _ in range(count):
        value = _object(rng, 0, with_type=True).encode("utf-8", "surrogatepass")
        if rng.random() < 0.25:
            for _ in range(rng.randint(1, 3)):
                value = _mutate(rng, value)
        values.append(value)
    return values


def canonical(data: bytes) -> str:
    """The parsed value as text: same text, same keys, key order and values."""
    return json.dumps(json.loads(data))


def check_same_verdict(value: bytes, key: bytes | None) -> None:
    fast = encode_event(
        value, key=key, type_fields=TYPE_FIELDS, match_fields=MATCH_FIELDS, **COMMON
    )
    slow = decode_with_stdlib(
        value, key=key, type_fields=TYPE_FIELDS, match_fields=MATCH_FIELDS, **COMMON
    )
    if isinstance(slow, Dead):
        assert fast == slow, value
        return
    assert isinstance(slow, Envelope)
    assert isinstance(fast, tuple), (value, fast)
    type_bytes, data, match = fast
    assert type_bytes == slow.type.encode()
    assert match == slow.match
    assert b"\n" not in data and b"\r" not in data
    data.decode("utf-8")  # strict
    json.loads(data, parse_constant=_reject)
    assert canonical(data) == canonical(slow.data), value


def _reject(name: str) -> Any:
    raise ValueError(name)


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_gives_the_same_verdicts_as_the_standard_library(seed: int) -> None:
    for i, value in enumerate(corpus(1500, seed)):
        check_same_verdict(value, key=None if i % 3 == 0 else b"k\xc3\xa9-%d" % i)


@pytest.mark.parametrize(
    "key",
    [None, b"", b"contact-42", 'kontakt-ö\n"'.encode(), b"\xff\xfe\x00id"],
)
def test_keys_are_encoded_alike(key: bytes | None) -> None:
    check_same_verdict(b'{"Type":"A","TenantId":"t-1"}', key)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'{"Type":"A","TenantId":1180591620717411303424}', id="big-int-match"),
        pytest.param(b'{"Type":"A","N":0.1}', id="float-match"),
        pytest.param(b'{"Type":"A","N":-9223372036854775809}', id="below-int64-match"),
        pytest.param(b'{"Type":"A","N":18446744073709551615}', id="uint64-match"),
    ],
)
def test_match_tokens_do_not_depend_on_the_path(value: bytes) -> None:
    check_same_verdict(value, None)
