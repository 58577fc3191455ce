"""The ingest <-> edge contract has one home (shared/contract.py): the script takes its field
names from it, the edge parses with it, and ARCHITECTURE.md's examples and module table
agree with the code."""

from __future__ import annotations

import base64
import re
from importlib.resources import files
from pathlib import Path

import pytest
from redis.crc import key_slot

from shared.contract import (
    CLUSTER_SLOTS,
    DEAD_FIELDS,
    EVENT_FIELDS,
    MAX_OFFSET,
    META_FIELDS,
    STATE_FIELDS,
    ContractError,
    LiveLine,
    Meta,
    PartitionState,
    RedisKeys,
    check_json,
    encode_live_line,
    encode_live_payload,
    entry_id,
    format_commit_metadata,
    format_epoch,
    new_epoch,
    parse_commit_metadata,
    parse_epoch,
    parse_event_fields,
    parse_live_line,
    parse_meta,
    parse_state,
    partition_slot,
    partition_tag,
    position_of,
    split_live_payload,
)
from shared.cursor import MAX_POSITION, Cursor, decode_cursor
from shared.events import parse_match
from shared.keys import RedisKeys as ReexportedKeys

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
LUA = files("shared").joinpath("apply_partition.lua").read_text(encoding="utf-8")
ENVELOPE = b'{"type":"ContactCreated","event":{"Type":"ContactCreated","Note":"a b"}}'
KEYS = RedisKeys("crm-events")


def documented(label: str) -> bytes:
    (line,) = [ln for ln in ARCHITECTURE.splitlines() if ln.startswith(label + ":")]
    return line.split(":", 1)[1].strip().encode()


def documented_hash(label: str) -> tuple[str, dict[bytes, bytes]]:
    key, *tokens = documented(label).split(b" ")
    return key.decode(), dict(zip(tokens[::2], tokens[1::2], strict=True))


# --- the documented examples --------------------------------------------------------------


def test_the_documented_live_line_parses() -> None:
    line = documented("live line")
    parsed = parse_live_line(line)
    assert (parsed.offset, parsed.prev, parsed.position) == (17, 15, 18)
    assert parsed.type == b"ContactCreated" and parsed.ts_ms == 1764410400000
    assert parse_match(parsed.match) == frozenset({("TenantId", "acme")})
    assert parsed.envelope.startswith(b'{"type":"ContactCreated"')
    assert b'"partition":1,"offset":17,' in parsed.envelope
    assert encode_live_line(*parsed) == line


def test_the_documented_stream_entry_parses_with_the_contracts_field_names() -> None:
    key, id_b, rest = documented("stream entry").split(b" ", 2)
    assert key.decode() == KEYS.stream(1)
    tokens = rest.split(b" ", 2 * len(EVENT_FIELDS) - 1)
    fields = dict(zip(tokens[::2], tokens[1::2], strict=True))
    assert [k.decode() for k in fields] == list(EVENT_FIELDS)
    type_, ts, match, prev, envelope = parse_event_fields(fields)
    assert (type_, ts, match, prev) == (b"ContactCreated", 1764410400000, b"TenantId=acme", 15)
    # The same event on both paths: the id is the live line's offset + 1, pv agrees.
    live = parse_live_line(documented("live line"))
    assert id_b == entry_id(live.offset) and position_of(id_b) == live.position
    assert (envelope, prev) == (live.envelope, live.prev)


def test_the_documented_state_meta_commit_and_cursor_agree() -> None:
    key, fields = documented_hash("state")
    assert key == KEYS.state(1) and [k.decode() for k in fields] == list(STATE_FIELDS)
    state = parse_state(fields)
    live = parse_live_line(documented("live line"))
    assert state == PartitionState(applied=live.offset, last=live.position, base=0)

    key, fields = documented_hash("meta")
    assert key == KEYS.meta and [k.decode() for k in fields] == list(META_FIELDS)
    meta = parse_meta(fields)
    assert meta == Meta("aetherlink.events", 3, 0x5F3A9C01)

    commit = documented("commit metadata").decode()
    assert commit == format_commit_metadata(meta.epoch)
    assert parse_commit_metadata(commit) == meta.epoch

    cursor = decode_cursor(documented("cursor"))
    assert cursor == Cursor(meta.epoch, (None, live.position, 130))
    assert cursor.encode() == documented("cursor")


def test_the_documented_cursor_bytes() -> None:
    text = documented("cursor").decode()
    (breakdown,) = re.findall(rf"`{re.escape(text)}`, is the payload `([0-9a-f |]+)`", ARCHITECTURE)
    payload = bytes.fromhex(breakdown.replace("|", ""))
    assert base64.urlsafe_b64encode(payload).decode().rstrip("=") == text[2:]
    # The documented sizes: every offset at 1e9, at 3, 12 and 64 partitions.
    a, b, c = (len(Cursor(1, (10**9,) * n).encode()) for n in (3, 12, 64))
    assert f"measured: {a} characters at 3 partitions, {b} at 12, {c} at 64" in ARCHITECTURE


def test_the_documented_bounds_are_the_codes() -> None:
    from shared.cursor import MAX_CURSOR_CHARS, MAX_PARTITIONS

    section = ARCHITECTURE.split("#### The cursor", 1)[1]
    assert f"more than {MAX_CURSOR_CHARS:,} characters" in section
    assert f"a count above {MAX_PARTITIONS}" in section
    assert "`<prefix>:offsets`, `<prefix>:genesis`" in ARCHITECTURE  # the upgrade note
    assert {f"crm-events:{s}" for s in ("stream", "offsets", "genesis", "live", "dead")} == set(
        KEYS.legacy
    )


# --- keys -----------------------------------------------------------------------------------


def test_every_key_of_a_partition_shares_its_hash_tag() -> None:
    assert ReexportedKeys is RedisKeys
    for p in (0, 7, 4095):
        names = [KEYS.stream(p), KEYS.state(p), KEYS.dead(p), KEYS.wait(p), KEYS.live(p)]
        assert re.fullmatch(rf"\{{p{p}\.\d+\}}", KEYS.tag(p))
        assert all(n.startswith(f"crm-events:{KEYS.tag(p)}:") for n in names)
        assert len({key_slot(n.encode()) for n in names}) == 1
        assert len(set(names)) == 5
        assert KEYS.live_partition(KEYS.live(p)) == p
        assert KEYS.live_partition(KEYS.live(p).encode()) == p
        assert KEYS.partition_keys(p) == (
            KEYS.stream(p),
            KEYS.state(p),
            KEYS.dead(p),
            KEYS.wait(p),
        )
    assert KEYS.meta == "crm-events:meta"
    assert "{" not in KEYS.meta  # read on its own; never in a script with a partition's keys
    assert RedisKeys("other").stream(0) != KEYS.stream(0)


@pytest.mark.parametrize(
    "channel",
    [
        "crm-events:{p}:live",
        "crm-events:{p01}:live",
        "crm-events:{p1.33}:stream",
        "other:{p1.33}:live",
        "crm-events:{p1}:live",  # the tag without its salt (the layout before issue 13)
        "crm-events:{p1.0}:live",  # another salt: another slot
        "crm-events:{p1.33.1}:live",
    ],
)
def test_foreign_channels_have_no_partition(channel: str) -> None:
    with pytest.raises(ContractError):
        KEYS.live_partition(channel)


def test_tags_are_pinned_because_changing_them_renames_every_key() -> None:
    # The examples in ARCHITECTURE.md and the runbooks use these.
    assert [partition_tag(p) for p in range(4)] == ["{p0.43}", "{p1.33}", "{p2.44}", "{p3.1}"]
    assert "crm-events:{p1.33}:stream" in ARCHITECTURE
    assert partition_slot(0) == key_slot(b"crm-events:{p0.43}:stream")


@pytest.mark.parametrize("partitions", [3, 6, 12, 24, 36, 48, 96])
@pytest.mark.parametrize("masters", [2, 3, 4, 6])
def test_tags_spread_partitions_evenly(partitions: int, masters: int) -> None:
    """Over ``masters`` equal contiguous slot ranges, as ``redis-cli --cluster create`` makes."""
    owned = [0] * masters
    for p in range(partitions):
        owned[partition_slot(p) * masters // CLUSTER_SLOTS] += 1
    assert max(owned) - min(owned) <= (0 if partitions % masters == 0 else 1), owned


def test_finding_a_tag_stays_cheap_for_any_partition() -> None:
    """Each tag is a search over salts; the tolerance floor bounds it (4,096 partitions: at
    most 1,776 tries for one, about 300 on average)."""
    salts = [int(partition_tag(p)[1:-1].split(".")[1]) for p in range(4096)]
    assert max(salts) < 5000
    assert sum(salts) / len(salts) < 1000


def test_plain_partition_numbers_as_tags_would_not_spread() -> None:
    """Why the salt: CRC16 of ``{pN}`` puts 6 of 12 partitions on one of 3 masters."""
    owned = [0, 0, 0]
    for p in range(12):
        owned[key_slot(f"{{p{p}}}".encode()) * 3 // CLUSTER_SLOTS] += 1
    assert sorted(owned) == [3, 3, 6]


def test_keys_refuse_a_negative_partition() -> None:
    with pytest.raises(ValueError):
        KEYS.stream(-1)


# --- entry ids ------------------------------------------------------------------------------


def test_entry_ids_are_offset_plus_one() -> None:
    assert entry_id(0) == b"1-0" and entry_id(41) == b"42-0"
    # The largest position a cursor holds; one more could never be handed to a client.
    assert position_of(entry_id(MAX_OFFSET)) == MAX_POSITION
    with pytest.raises(ContractError, match="offset"):
        position_of(entry_id(MAX_OFFSET + 1))


@pytest.mark.parametrize("raw", [b"0-0", b"5-1", b"5", b"-0", b"x-0", b"5-", b"1" * 21 + b"-0"])
def test_ids_not_made_from_an_offset_are_refused(raw: bytes) -> None:
    with pytest.raises(ContractError, match="offset"):
        position_of(raw)


# --- the live line --------------------------------------------------------------------------


def test_encoder_and_parser_round_trip_an_envelope_with_spaces() -> None:
    line = encode_live_line(2, 1, b"DealWon", 5, b"-", ENVELOPE)
    assert parse_live_line(line) == LiveLine(2, 1, b"DealWon", 5, b"-", ENVELOPE)
    lines = [line, encode_live_line(3, 3, b"DealWon", -1, b"-", ENVELOPE)]
    payload = encode_live_payload(lines)
    assert [parse_live_line(ln).offset for ln in split_live_payload(payload)] == [2, 3]


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (b"2 1 DealWon 5 " + ENVELOPE.replace(b" ", b""), "5 space-separated fields"),
        (b"", "1 space-separated fields"),
        (b"x 1 DealWon 5 - " + ENVELOPE, "offset"),
        (b"-2 1 DealWon 5 - " + ENVELOPE, "offset"),
        (b"2-0 1 DealWon 5 - " + ENVELOPE, "offset"),
        (b"2 x DealWon 5 - " + ENVELOPE, "pv"),
        (b"2 3 DealWon 5 - " + ENVELOPE, "pv.* above the offset"),
        (b"2 1 DealWon five - " + ENVELOPE, "timestamp"),
        (b"2 1  5 - " + ENVELOPE, "type"),
        (b"2 1 DealWon 5 \xff " + ENVELOPE, "match"),
        (b"2 1 DealWon 5 - [1]", "JSON object"),
        (b'2 1 DealWon 5 - {"a":"\r\ndata: injected"}', "line break"),
        (b"1" * 21 + b" 1 DealWon 5 - " + ENVELOPE, "offset"),
    ],
)
def test_the_parser_says_what_is_wrong(line: bytes, detail: str) -> None:
    with pytest.raises(ContractError, match=detail) as caught:
        parse_live_line(line)
    assert caught.value.detail == str(caught.value)


GOOD = {b"t": b"A", b"ts": b"1", b"pv": b"0", b"d": ENVELOPE}


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({b"foo": b"bar"}, "'t' is missing"),
        ({**GOOD, b"ts": b"x"}, "timestamp"),
        ({k: v for k, v in GOOD.items() if k != b"ts"}, "'ts' is missing"),
        ({k: v for k, v in GOOD.items() if k != b"pv"}, "'pv' is missing"),
        ({k: v for k, v in GOOD.items() if k != b"d"}, "'d' is missing"),
        ({**GOOD, b"pv": b"-1"}, "pv"),
        ({**GOOD, b"d": b"{\n}"}, "line break"),
    ],
)
def test_bad_stream_entries_are_refused(fields: dict[bytes, bytes], detail: str) -> None:
    with pytest.raises(ContractError, match=detail):
        parse_event_fields(fields)


@pytest.mark.parametrize(
    "envelope", [b"{not json}", b'{"a":1} {"b":2}', b'{"a":"\xff"}', b'{"a":1,}', b"{}}"]
)
def test_stream_reads_validate_the_whole_envelope(envelope: bytes) -> None:
    """The first/last-byte check keeps SSE framing intact, not JSON: a reader that splices
    envelopes into a JSON body asks for the full parse."""
    fields = {**GOOD, b"d": envelope}
    assert parse_event_fields(fields)[4] == envelope  # the live path's cheap check
    with pytest.raises(ContractError, match="not valid JSON"):
        parse_event_fields(fields, validate_json=True)
    with pytest.raises(ContractError, match="not valid JSON"):
        check_json(envelope)


@pytest.mark.parametrize("envelope", [ENVELOPE, b"{}", b"{ }", b'{"a":[1,{"b":null}]}'])
def test_valid_envelopes_pass_the_full_check(envelope: bytes) -> None:
    assert parse_event_fields({**GOOD, b"d": envelope}, validate_json=True)[4] == envelope


def test_an_entry_without_a_match_field_matches_nothing_in_particular() -> None:
    assert parse_event_fields(GOOD) == (b"A", 1, b"-", 0, ENVELOPE)


# --- state, meta and the epoch -----------------------------------------------------------------


def test_state_and_meta_parse_and_say_what_is_wrong() -> None:
    assert parse_state({}) is None and parse_meta({}) is None
    fresh = {b"applied": b"-1", b"last": b"500", b"base": b"500"}
    assert parse_state(fresh) == PartitionState(-1, 500, 500)
    for bad, detail in [
        ({b"applied": b"3", b"last": b"2"}, "'base' is missing"),
        ({b"applied": b"x", b"last": b"2", b"base": b"1"}, "applied"),
        ({b"applied": b"3", b"last": b"1", b"base": b"2"}, "below its base"),
    ]:
        with pytest.raises(ContractError, match=detail):
            parse_state(bad)
    meta = {b"topic": b"t", b"partitions": b"3", b"epoch": b"0000002a"}
    assert parse_meta(meta) == Meta("t", 3, 42)
    for bad, detail in [
        ({**meta, b"epoch": b"2A"}, "epoch"),
        ({**meta, b"partitions": b"0"}, "partition count"),
        ({k: v for k, v in meta.items() if k != b"topic"}, "'topic' is missing"),
    ]:
        with pytest.raises(ContractError, match=detail):
            parse_meta(bad)


@pytest.mark.parametrize("epoch", [0, 1, 0x5F3A9C01, 2**32 - 1])
def test_epochs_round_trip_as_8_hex_digits_and_in_commit_metadata(epoch: int) -> None:
    text = format_epoch(epoch)
    assert len(text) == 8 and text == text.lower()
    assert parse_epoch(text) == parse_epoch(text.encode()) == epoch
    assert parse_commit_metadata(format_commit_metadata(epoch)) == epoch


@pytest.mark.parametrize("text", ["", "2a", "0000002A", "00000002a", "-0000002", "0x00002a"])
def test_malformed_epochs_are_refused(text: str) -> None:
    with pytest.raises(ContractError):
        parse_epoch(text)


@pytest.mark.parametrize("epoch", [-1, 2**32])
def test_out_of_range_epochs_are_not_formatted(epoch: int) -> None:
    with pytest.raises(ValueError):
        format_epoch(epoch)


@pytest.mark.parametrize(
    ("metadata", "epoch"),
    [
        (None, None),
        ("", None),
        ("some other tool", None),
        ("crm-events", None),
        ("crm-events epoch=XYZ", None),
        ("crm-events epoch=0000002A", None),
        ("crm-events epoch=0000002a", 42),
        ("crm-events later=1 epoch=0000002a", 42),
        ("other epoch=0000002a", None),
    ],
)
def test_commit_metadata_of_other_writers_holds_no_epoch(metadata: str | None, epoch: int) -> None:
    assert parse_commit_metadata(metadata) == epoch


def test_new_epochs_are_u32_and_vary() -> None:
    drawn = {new_epoch() for _ in range(64)}
    assert all(0 <= e < 2**32 for e in drawn) and len(drawn) > 1


# --- the script and the module table -----------------------------------------------------------


def test_the_script_names_no_field_and_takes_the_contracts_in_order() -> None:
    code = "\n".join(line.split("--", 1)[0] for line in LUA.splitlines())
    for name in (*EVENT_FIELDS, *DEAD_FIELDS, *STATE_FIELDS):
        assert f"'{name}'" not in code and f'"{name}"' not in code, name
    taken = re.search(r"local f_type, f_ts, f_match, f_prev, f_data = (.*)", code)
    assert taken is not None
    assert taken.group(1) == "ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]"
    taken = re.search(r"local s_applied, s_last, s_base = (.*)", code)
    assert taken is not None and taken.group(1) == "ARGV[21], ARGV[22], ARGV[23]"
    from ingest.writer import _FIELD_NAMES

    assert (*EVENT_FIELDS, *DEAD_FIELDS, *STATE_FIELDS) == _FIELD_NAMES
    assert EVENT_FIELDS == ("t", "ts", "m", "pv", "d")


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
