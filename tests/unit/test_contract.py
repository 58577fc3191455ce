"""The ingest <-> edge contract has one home (shared/contract.py): the script takes its field
names from it, the edge parses with it, and ARCHITECTURE.md's examples and module table
agree with the code."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest

from edge.bus import parse_live_payload
from shared.contract import (
    DEAD_FIELDS,
    EVENT_FIELDS,
    ContractError,
    encode_live_line,
    encode_live_payload,
    parse_event_fields,
    parse_live_line,
)

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
LUA = files("shared").joinpath("apply_batch.lua").read_text(encoding="utf-8")
ENVELOPE = b'{"type":"ContactCreated","event":{"Type":"ContactCreated","Note":"a b"}}'


def documented(label: str) -> bytes:
    (line,) = [ln for ln in ARCHITECTURE.splitlines() if ln.startswith(label + ":")]
    return line.split(":", 1)[1].strip().encode()


def test_the_documented_live_line_parses() -> None:
    line = documented("live line")
    parsed = parse_live_line(line)
    assert parsed.id == b"1764410400123-0"
    assert parsed.type == b"ContactCreated" and parsed.ts_ms == 1764410400000
    assert parsed.match == b"TenantId=acme"
    assert parsed.envelope.startswith(b'{"type":"ContactCreated"')
    assert encode_live_line(*parsed) == line
    (entry,) = parse_live_payload(line)
    assert entry.match == frozenset({("TenantId", "acme")})


def test_the_documented_stream_entry_parses_with_the_contracts_field_names() -> None:
    tokens = documented("stream entry").split(b" ", 2 * len(EVENT_FIELDS) - 1)
    fields = dict(zip(tokens[::2], tokens[1::2], strict=True))
    assert [k.decode() for k in fields] == list(EVENT_FIELDS)
    type_, ts, match, envelope = parse_event_fields(fields)
    assert (type_, ts, match) == (b"ContactCreated", 1764410400000, b"TenantId=acme")
    # The same event on both paths.
    assert envelope == parse_live_line(documented("live line")).envelope


def test_encoder_and_parser_round_trip_an_envelope_with_spaces() -> None:
    line = encode_live_line(b"1-2", b"DealWon", 5, b"-", ENVELOPE)
    assert tuple(parse_live_line(line)) == (b"1-2", b"DealWon", 5, b"-", ENVELOPE)
    lines = [line, encode_live_line(b"1-3", b"DealWon", -1, b"-", ENVELOPE)]
    assert [e.id_bytes for e in parse_live_payload(encode_live_payload(lines))] == [b"1-2", b"1-3"]


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (b"1-2 DealWon 5 " + ENVELOPE.replace(b" ", b""), "4 space-separated fields"),
        (b"", "1 space-separated fields"),
        (b"x-2 DealWon 5 - " + ENVELOPE, "id"),
        (b"12 DealWon 5 - " + ENVELOPE, "id"),
        (b"1-2 DealWon five - " + ENVELOPE, "timestamp"),
        (b"1-2  5 - " + ENVELOPE, "type"),
        (b"1-2 DealWon 5 \xff " + ENVELOPE, "match"),
        (b"1-2 DealWon 5 - [1]", "JSON object"),
        (b'1-2 DealWon 5 - {"a":"\r\ndata: injected"}', "line break"),
    ],
)
def test_the_parser_says_what_is_wrong(line: bytes, detail: str) -> None:
    with pytest.raises(ContractError, match=detail):
        parse_live_line(line)


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({b"foo": b"bar"}, "'t' is missing"),
        ({b"t": b"A", b"d": ENVELOPE}, "'ts' is missing"),
        ({b"t": b"A", b"ts": b"1"}, "'d' is missing"),
        ({b"t": b"A", b"ts": b"1", b"d": b"{\n}"}, "line break"),
    ],
)
def test_bad_stream_entries_are_refused(fields: dict[bytes, bytes], detail: str) -> None:
    with pytest.raises(ContractError, match=detail):
        parse_event_fields(fields)


def test_the_script_names_no_field_and_takes_the_contracts_in_order() -> None:
    code = "\n".join(line.split("--", 1)[0] for line in LUA.splitlines())
    for name in (*EVENT_FIELDS, *DEAD_FIELDS):
        assert f"'{name}'" not in code and f'"{name}"' not in code, name
    taken = re.search(r"local f_type, f_ts, f_match, f_data = (.*)", code)
    assert taken is not None and taken.group(1) == "ARGV[7], ARGV[8], ARGV[9], ARGV[10]"
    from ingest.writer import _FIELD_NAMES

    assert (*EVENT_FIELDS, *DEAD_FIELDS) == _FIELD_NAMES
    assert EVENT_FIELDS == ("t", "ts", "m", "d")


def _modules() -> list[str]:
    found = []
    for package in ("shared", "ingest", "edge", "devtools"):
        folder = ROOT / package
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in (".py", ".lua") and path.name != "__init__.py":
                found.append(f"{package}/{path.name}")
    return found


def test_the_architecture_table_names_every_module() -> None:
    table = ARCHITECTURE.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    package = ""
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or cells[1].strip().startswith("---"):
            continue
        package = cells[1].strip().strip("`").rstrip("/") or package
        rows.setdefault(package, set()).update(re.findall(r"`([\w.]+)`", cells[2]))
    missing = [m for m in _modules() if m.split("/")[1] not in rows.get(m.split("/")[0], set())]
    assert len(_modules()) > 40
    assert not missing, f"not in ARCHITECTURE.md's module table: {missing}"
