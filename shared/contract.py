"""The ingest <-> edge contract in Redis, in one place: key names, entry, state and meta field
names, entry ids, the live line (its encoder and its parser), and the epoch.

Ingest writes through a Lua script, which cannot import Python: the writer passes the field
names below as script arguments, so the script names no field itself. The edge reads with
the checking parsers below, because the channels and streams are shared with anyone who can
reach Redis, and one malformed line must never stop an edge (or inject SSE fields into a
client's stream).

Every position is a Kafka position: the record's offset + 1 (the "next offset", as in a
committed offset); 0 means nothing seen. Per partition N (``{pN}`` stands for the partition's
Redis Cluster hash tag ``{p<N>.<salt>}``, e.g. ``{p0.43}``: one partition's keys share a slot,
so one script can write them all, and the salt spreads partitions evenly over the slots; see
``partition_tag``)::

    <prefix>:{pN}:stream   capped stream; the record at offset o has id <o+1>-0 and fields
                           t <type>  ts <kafka ts ms>  m <match token>  pv <prev position>
                           d <envelope JSON>
    <prefix>:{pN}:state    hash: applied <offset>  last <position>  base <position>
    <prefix>:{pN}:dead     capped stream of dead letters (auto ids)
    <prefix>:{pN}:wait     string written only so that WAIT has a write on N's master
    <prefix>:{pN}:live     channel; one message per script call, lines joined by \\n:
                           <offset> <pv> <type> <kafka ts ms> <match token> <envelope JSON>
    <prefix>:meta          hash: topic <name>  partitions <count>  epoch <8 lowercase hex>

``pv`` is the position right after the previous event entry written to the same stream in
this incarnation (the previous entry's id), or the incarnation's ``base`` for its first
entry. A reader at position c whose next retained entry E has ``pv(E) <= c`` missed
nothing; ``pv(E) > c`` means the positions in [c, pv(E)) are gone (trimmed, or before a
refill). ARCHITECTURE.md ("Positions, resume and reset") has the whole rule set.

Offsets, positions, types, timestamps and match tokens hold no spaces; the envelope is one
line of JSON and the last field of a live line, so it may hold spaces.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

import orjson
from redis.crc import key_slot

from shared.cursor import MAX_POSITION
from shared.events import NO_MATCH

__all__ = [
    "CLUSTER_SLOTS",
    "COMMIT_METADATA_PREFIX",
    "DEAD_FIELDS",
    "EVENT_FIELDS",
    "FIELD_DATA",
    "FIELD_MATCH",
    "FIELD_PREV",
    "FIELD_TS",
    "FIELD_TYPE",
    "LEGACY_KEY_SUFFIXES",
    "LIVE_FIELD_COUNT",
    "LIVE_LINE",
    "MAX_OFFSET",
    "META_EPOCH",
    "META_FIELDS",
    "META_PARTITIONS",
    "META_TOPIC",
    "NO_MATCH",
    "STATE_APPLIED",
    "STATE_BASE",
    "STATE_FIELDS",
    "STATE_LAST",
    "ContractError",
    "LiveLine",
    "Meta",
    "PartitionState",
    "RedisKeys",
    "check_json",
    "encode_live_line",
    "encode_live_payload",
    "entry_id",
    "format_commit_metadata",
    "format_epoch",
    "new_epoch",
    "parse_commit_metadata",
    "parse_epoch",
    "parse_event_fields",
    "parse_live_line",
    "parse_meta",
    "parse_state",
    "partition_slot",
    "partition_tag",
    "position_of",
    "split_live_payload",
]


class ContractError(ValueError):
    """Something read from Redis does not follow the contract; ``detail`` says how."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# --- keys -------------------------------------------------------------------------------

LEGACY_KEY_SUFFIXES: Final = ("stream", "offsets", "genesis", "live", "dead")
"""The single-stream layout's keys (``<prefix>:<suffix>``), left alone by the upgrade."""


def _check_partition(partition: int) -> int:
    if type(partition) is not int or partition < 0:
        raise ValueError(f"partition {partition!r} is not a partition number")
    return partition


CLUSTER_SLOTS: Final = 16384
_TAG_ORDER: Final = (6, 2, 11, 5, 9, 0, 3, 8, 4, 10, 7, 1)
"""Which twelfth of the slot space partitions 0-11 (and each later dozen) land in. Every
prefix of this order is balanced within one partition over 2, 3, 4 and 6 equal slot ranges,
which is how ``redis-cli --cluster create`` splits the slots between masters: 3 partitions
on 3 masters get one each, 12 get 4 each, 12 on 4 masters get 3 each."""


def _mirrored(n: int) -> tuple[int, int]:
    """n's binary digits mirrored after the point, as a fraction ``a / 2**bits``
    (1 -> 1/2, 2 -> 1/4, 3 -> 3/4, 4 -> 1/8, ...)."""
    bits = n.bit_length()
    return int(format(n, f"0{bits}b")[::-1], 2), bits


@lru_cache(maxsize=4096)
def partition_tag(partition: int) -> str:
    """The Redis Cluster hash tag of ``partition``'s keys and live channel: ``{p<N>.<salt>}``
    with the smallest salt whose slot lands near the partition's target slot.

    CRC16 of ``{p<N>}`` alone puts partitions where it happens to (12 partitions on 3 equal
    slot ranges: 6/3/3). The target spreads them instead: dozen ``r`` of the partitions puts
    one partition in each twelfth of the slot space, in the order ``_TAG_ORDER``, at offset
    ``mirrored(r + 1)`` of the twelfth (1/2, 1/4, 3/4, 1/8, ...), within a quarter twelfth of
    it for the first dozen, halved with each power of two of ``r + 1``, never below 1/64 of a
    twelfth (21 slots: about 800 tries on average, whatever the partition). Tags depend on
    the partition number alone, never on the partition count or the cluster's layout, so
    adding partitions or resharding moves no existing key; whether the masters really own
    equal shares is the cluster's layout (``make status`` shows it). This function is part
    of the contract: changing it renames every key."""
    r, i = divmod(_check_partition(partition), len(_TAG_ORDER))
    a, bits = _mirrored(r + 1)
    twelfths = len(_TAG_ORDER) << bits
    # Integer arithmetic only, so that another implementation finds the same tags.
    target = ((_TAG_ORDER[i] << bits) + a) * CLUSTER_SLOTS // twelfths
    tolerance = max(CLUSTER_SLOTS // (len(_TAG_ORDER) * 64), CLUSTER_SLOTS * 2 // twelfths // 4)
    salt = 0
    while True:
        inner = f"p{partition}.{salt}"
        if abs(key_slot(inner.encode()) - target) <= tolerance:
            return f"{{{inner}}}"
        salt += 1


def partition_slot(partition: int) -> int:
    """The Redis Cluster slot of every key of ``partition``."""
    return key_slot(partition_tag(partition).encode())


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Every Redis name of one deployment, derived from one prefix so that deployments and
    tests never share state by accident."""

    prefix: str

    @property
    def meta(self) -> str:
        """Hash: ``topic``, ``partitions``, ``epoch`` (no hash tag: read on its own)."""
        return f"{self.prefix}:meta"

    def tag(self, partition: int) -> str:
        """The partition's Redis Cluster hash tag, ``{p<N>.<salt>}`` (``partition_tag``)."""
        return partition_tag(partition)

    def stream(self, partition: int) -> str:
        """Capped stream of the partition's events, ids ``<offset+1>-0``."""
        return f"{self.prefix}:{self.tag(partition)}:stream"

    def state(self, partition: int) -> str:
        """Hash: ``applied``, ``last``, ``base`` (see ``PartitionState``)."""
        return f"{self.prefix}:{self.tag(partition)}:state"

    def dead(self, partition: int) -> str:
        """Capped stream of the partition's dead letters."""
        return f"{self.prefix}:{self.tag(partition)}:dead"

    def live(self, partition: int) -> str:
        """Channel carrying each script call's applied events of the partition."""
        return f"{self.prefix}:{self.tag(partition)}:live"

    def wait(self, partition: int) -> str:
        """String written by ingest only to give ``WAIT`` a write on the partition's master
        (Redis Cluster); its value means nothing."""
        return f"{self.prefix}:{self.tag(partition)}:wait"

    def partition_keys(self, partition: int) -> tuple[str, str, str, str]:
        """The partition's stored keys (stream, state, dead, wait), e.g. to wipe them."""
        return (
            self.stream(partition),
            self.state(partition),
            self.dead(partition),
            self.wait(partition),
        )

    def live_partition(self, channel: str | bytes) -> int:
        """The partition of one of this deployment's live channels; ``ContractError``
        for any other name."""
        name = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
        head = f"{self.prefix}:{{p"
        if name.startswith(head) and name.endswith("}:live"):
            digits = name[len(head) : -len("}:live")].partition(".")[0]
            if (
                digits.isdigit()
                and digits.isascii()
                and str(int(digits)) == digits
                and name == self.live(int(digits))
            ):
                return int(digits)
        raise ContractError(f"{name[:80]!r} is not a live channel of {self.prefix!r}")

    @property
    def legacy(self) -> tuple[str, ...]:
        """The keys of the single-stream layout (before positions were Kafka positions)."""
        return tuple(f"{self.prefix}:{suffix}" for suffix in LEGACY_KEY_SUFFIXES)


# --- field names --------------------------------------------------------------------------

FIELD_TYPE: Final = "t"
FIELD_TS: Final = "ts"
FIELD_MATCH: Final = "m"
FIELD_PREV: Final = "pv"
FIELD_DATA: Final = "d"
EVENT_FIELDS: Final = (FIELD_TYPE, FIELD_TS, FIELD_MATCH, FIELD_PREV, FIELD_DATA)
"""An event's stream fields, in the order the script writes them."""
DEAD_FIELDS: Final = ("topic", "partition", "offset", "reason", "detail", "value")
"""A dead letter's stream fields (``<prefix>:{pN}:dead``), in the order the script writes them."""

STATE_APPLIED: Final = "applied"
"""Last Kafka offset applied to the partition (any record kind: event or dead letter)."""
STATE_LAST: Final = "last"
"""Position of the last event entry written (the next entry's ``pv``); ``base`` when none."""
STATE_BASE: Final = "base"
"""Position from which this incarnation of the partition's stream is complete."""
STATE_FIELDS: Final = (STATE_APPLIED, STATE_LAST, STATE_BASE)

META_TOPIC: Final = "topic"
META_PARTITIONS: Final = "partitions"
META_EPOCH: Final = "epoch"
META_FIELDS: Final = (META_TOPIC, META_PARTITIONS, META_EPOCH)

_T, _TS, _M, _PV, _D = (name.encode() for name in EVENT_FIELDS)
_APPLIED, _LAST, _BASE = (name.encode() for name in STATE_FIELDS)
_MTOPIC, _MPARTITIONS, _MEPOCH = (name.encode() for name in META_FIELDS)

_MAX_DIGITS = 20  # a 64-bit number
MAX_OFFSET: Final = MAX_POSITION - 1
"""The largest offset the edge serves: its position must fit a cursor. Kafka's offsets
are signed 64-bit, so only a corrupt or hostile value is refused."""


def _natural(raw: bytes, what: str, most: int = MAX_POSITION) -> int:
    if not raw.isdigit() or len(raw) > _MAX_DIGITS:
        raise ContractError(f"the {what} is not a non-negative integer")
    value = int(raw)
    if value > most:
        raise ContractError(f"the {what} is above {most}, beyond what a cursor holds")
    return value


# --- entry ids ------------------------------------------------------------------------------


def entry_id(offset: int) -> bytes:
    """The stream id of the record at ``offset``: ``<offset+1>-0`` (its ms part is the
    position right after the record)."""
    return b"%d-0" % (offset + 1)


def position_of(entry_id: bytes) -> int:
    """The position right after the entry (its id's ms part); ``ContractError`` for an id
    that is not ``<position>-0`` with position >= 1."""
    ms, sep, seq = entry_id.partition(b"-")
    if sep and seq == b"0" and ms.isdigit() and len(ms) <= _MAX_DIGITS:
        position = int(ms)
        if 1 <= position <= MAX_POSITION:
            return position
    raise ContractError(f"the id is not <offset+1>-0 with a position in 1..{MAX_POSITION}")


# --- the live line ---------------------------------------------------------------------------

LIVE_FIELD_COUNT: Final = 6
LIVE_SEPARATOR: Final = b" "
LINE_SEPARATOR: Final = b"\n"


class LiveLine(NamedTuple):
    offset: int
    prev: int
    type: bytes
    ts_ms: int
    match: bytes
    envelope: bytes

    @property
    def position(self) -> int:
        return self.offset + 1


LIVE_LINE: Final = b"%d %d %b %b %b %b"
"""offset, pv, type, Kafka timestamp ms (digits), match token, envelope: ingest formats the
lines with this (ingest/records.py pack) and the script publishes them or remakes a head."""


def encode_live_line(
    offset: int, prev: int, type_: bytes, ts_ms: int, match: bytes, envelope: bytes
) -> bytes:
    """One live line."""
    return LIVE_LINE % (offset, prev, type_, b"%d" % ts_ms, match, envelope)


def encode_live_payload(lines: Iterable[bytes]) -> bytes:
    return LINE_SEPARATOR.join(lines)


def split_live_payload(payload: bytes) -> list[bytes]:
    return payload.split(LINE_SEPARATOR)


def _check_ts(raw: bytes) -> int:
    # Kafka writes -1 for a record without a timestamp (old message format).
    digits = raw[1:] if raw[:1] == b"-" else raw
    if not digits.isdigit() or len(digits) > _MAX_DIGITS:
        raise ContractError("the timestamp is not an integer")
    return int(raw)


def _check_common(type_: bytes, match: bytes, envelope: bytes) -> None:
    if not type_:
        raise ContractError("the type is empty")
    if not match.isascii():
        raise ContractError("the match token is not ASCII")
    # The envelope becomes an SSE data: line as is; a CR or LF in it would end the line
    # and let the rest be read as SSE fields.
    if envelope[:1] != b"{" or envelope[-1:] != b"}":
        raise ContractError("the envelope is not a JSON object")
    if b"\r" in envelope or b"\n" in envelope:
        raise ContractError("the envelope holds a line break")


def parse_live_line(line: bytes) -> LiveLine:
    """One live line, checked; raises ``ContractError`` saying what is wrong."""
    parts = line.split(LIVE_SEPARATOR, LIVE_FIELD_COUNT - 1)
    if len(parts) != LIVE_FIELD_COUNT:
        raise ContractError(
            f"{len(parts)} space-separated fields, expected {LIVE_FIELD_COUNT} "
            "(<offset> <pv> <type> <ts> <match> <envelope>)"
        )
    offset_b, prev_b, type_b, ts_b, match, envelope = parts
    offset = _natural(offset_b, "offset", MAX_OFFSET)
    prev = _natural(prev_b, "previous position (pv)")
    if prev > offset:
        raise ContractError("the previous position (pv) is above the offset")
    ts = _check_ts(ts_b)
    _check_common(type_b, match, envelope)
    return LiveLine(offset, prev, type_b, ts, match, envelope)


def check_json(envelope: bytes) -> None:
    """``ContractError`` unless ``envelope`` is valid UTF-8 JSON. ``_check_common`` looks at
    its first and last bytes only (enough to keep SSE framing intact); a reader that splices
    the envelope into a larger JSON document (a history body) needs the whole of it valid,
    or one entry breaks every answer that covers it. About 1 µs for 256 bytes."""
    try:
        orjson.loads(envelope)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"the envelope is not valid JSON ({str(exc)[:80]})") from None


def parse_event_fields(
    fields: Mapping[bytes, bytes], *, validate_json: bool = False
) -> tuple[bytes, int, bytes, int, bytes]:
    """An event's stream fields as ``(type, ts_ms, match, prev, envelope)``, checked;
    ``validate_json`` also parses the envelope (``check_json``)."""
    try:
        type_b, ts_b, prev_b, envelope = fields[_T], fields[_TS], fields[_PV], fields[_D]
    except KeyError as exc:
        raise ContractError(f"field {exc.args[0]!r} is missing") from None
    match = fields.get(_M, NO_MATCH)
    ts = _check_ts(ts_b)
    prev = _natural(prev_b, "previous position (pv)")
    _check_common(type_b, match, envelope)
    if validate_json:
        check_json(envelope)
    return type_b, ts, match, prev, envelope


# --- the state and meta hashes ---------------------------------------------------------------


class PartitionState(NamedTuple):
    applied: int
    """Last applied Kafka offset; -1 when none yet."""
    last: int
    base: int


def parse_state(fields: Mapping[bytes, bytes]) -> PartitionState | None:
    """A partition's state hash (HGETALL), checked; ``None`` when it does not exist."""
    if not fields:
        return None
    try:
        applied_b, last_b, base_b = fields[_APPLIED], fields[_LAST], fields[_BASE]
    except KeyError as exc:
        raise ContractError(f"state field {exc.args[0]!r} is missing") from None
    applied = -1 if applied_b == b"-1" else _natural(applied_b, "applied offset", MAX_OFFSET)
    last = _natural(last_b, "last position")
    base = _natural(base_b, "base position")
    if last < base:
        raise ContractError("the state's last position is below its base")
    return PartitionState(applied, last, base)


class Meta(NamedTuple):
    topic: str
    partitions: int
    epoch: int


def parse_meta(fields: Mapping[bytes, bytes]) -> Meta | None:
    """The ``<prefix>:meta`` hash (HGETALL), checked; ``None`` when it does not exist."""
    if not fields:
        return None
    try:
        topic_b, partitions_b, epoch_b = fields[_MTOPIC], fields[_MPARTITIONS], fields[_MEPOCH]
    except KeyError as exc:
        raise ContractError(f"meta field {exc.args[0]!r} is missing") from None
    partitions = _natural(partitions_b, "partition count")
    if not 1 <= partitions <= 4096:
        raise ContractError("the partition count is not in 1..4096")
    try:
        topic = topic_b.decode("utf-8")
    except UnicodeDecodeError:
        raise ContractError("the topic is not UTF-8") from None
    return Meta(topic, partitions, parse_epoch(epoch_b))


# --- the epoch -----------------------------------------------------------------------------

COMMIT_METADATA_PREFIX: Final = "crm-events"
_EPOCH_RE: Final = re.compile(r"[0-9a-f]{8}")


def new_epoch() -> int:
    """A random epoch (a new incarnation of the topic)."""
    return secrets.randbits(32)


def format_epoch(epoch: int) -> str:
    """8 lowercase hex digits."""
    if type(epoch) is not int or not 0 <= epoch < 2**32:
        raise ValueError(f"epoch {epoch!r} is not an unsigned 32-bit integer")
    return f"{epoch:08x}"


def parse_epoch(text: str | bytes) -> int:
    """8 lowercase hex digits; ``ContractError`` otherwise."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if _EPOCH_RE.fullmatch(raw) is None:
        raise ContractError("the epoch is not 8 lowercase hex digits")
    return int(raw, 16)


def format_commit_metadata(epoch: int) -> str:
    """The metadata string of every Kafka offset commit: ``crm-events epoch=<hex8>``."""
    return f"{COMMIT_METADATA_PREFIX} epoch={format_epoch(epoch)}"


def parse_commit_metadata(text: str | None) -> int | None:
    """The epoch in a commit's metadata; ``None`` when there is none (no commit, or one
    written by another tool)."""
    if not text:
        return None
    words = text.split(" ")
    if words[0] != COMMIT_METADATA_PREFIX:
        return None
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if sep and key == "epoch" and _EPOCH_RE.fullmatch(value):
            return int(value, 16)
    return None
