"""The atomic per-partition step (shared/apply_partition.lua) against a real Redis: entry ids
from Kafka offsets, a redelivery is a no-op, the ``pv`` chain (also across dead letters and
offset holes), ``base`` of a fresh fill, the ``lost``/``rolled_back`` answers, trimming with
an exact ``pv`` check, and the live message the edge parses."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from ingest.records import Prepared, RawRecord, pack, prepare
from ingest.writer import BatchWriter, PartitionBatch
from shared.contract import (
    EVENT_FIELDS,
    RedisKeys,
    encode_live_line,
    encode_live_payload,
    entry_id,
    parse_event_fields,
    parse_live_line,
    parse_state,
    position_of,
    split_live_payload,
)
from shared.errors import RedisUnavailable
from tests.harness.backends import Backends

TOPIC = "aetherlink.events"


@pytest.fixture
async def redis(backends: Backends) -> AsyncIterator[Redis]:
    client = Redis.from_url(backends.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys(f"crm-test-{uuid.uuid4().hex[:10]}")


def record(partition: int, offset: int, value: bytes) -> RawRecord:
    return RawRecord(partition, offset, 1_764_410_400_000 + offset, b"key", value)


def event(seq: int) -> bytes:
    return json.dumps({"Type": "DealWon", "Seq": seq}).encode()


def batch(records: list[RawRecord]) -> list[Prepared]:
    return [prepare(r, max_bytes=1024, type_fields=("Type",)) for r in records]


def events(partition: int, offsets: list[int] | range) -> list[Prepared]:
    return batch([record(partition, o, event(o)) for o in offsets])


async def entries(redis: Redis, keys: RedisKeys, p: int) -> list[tuple[bytes, int, int]]:
    """(id, pv, seq) of every entry of partition p's stream."""
    out = []
    for id_, fields in await redis.xrange(keys.stream(p)):
        _, _, _, prev, envelope = parse_event_fields(fields)
        out.append((id_, prev, json.loads(envelope)["event"]["Seq"]))
    return out


async def state(redis: Redis, keys: RedisKeys, p: int) -> tuple[int, int, int] | None:
    parsed = parse_state(await redis.hgetall(keys.state(p)))
    return None if parsed is None else (parsed.applied, parsed.last, parsed.base)


async def next_message(pubsub: PubSub) -> dict[str, Any]:
    """The next published message (not a subscribe confirmation), within 5 s."""
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                return message


async def test_ids_come_from_offsets_and_a_redelivery_is_a_no_op(
    redis: Redis, keys: RedisKeys
) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    # Offsets are not contiguous (transaction markers, compaction): 0, 1, 4, 5, 9.
    offsets = [0, 1, 4, 5, 9]
    first = await writer.apply_records(3, events(3, offsets))
    assert (first.status, first.written, first.duplicates, first.applied) == ("ok", 5, 0, 9)
    rows = await entries(redis, keys, 3)
    assert [r[0] for r in rows] == [entry_id(o) for o in offsets]
    assert [position_of(r[0]) for r in rows] == [o + 1 for o in offsets]
    assert [r[2] for r in rows] == offsets

    again = await writer.apply_records(3, events(3, offsets), expect=9)
    assert (again.status, again.written, again.duplicates, again.applied) == ("ok", 0, 5, 9)
    assert await entries(redis, keys, 3) == rows
    assert await state(redis, keys, 3) == (9, 10, 0)


async def test_overlapping_batch_writes_only_the_new_records(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    await writer.apply_records(0, events(0, range(10)))
    # A rebalance re-reads from offset 5 and goes on to 14.
    result = await writer.apply_records(0, events(0, range(5, 15)), expect=9)
    assert (result.written, result.duplicates, result.applied) == (5, 5, 14)
    assert [r[2] for r in await entries(redis, keys, 0)] == list(range(15))


async def test_partitions_are_independent_in_one_round_trip(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    mixed = [r for o in range(4) for p in range(3) for r in events(p, [o * (p + 1)])]
    results = await writer.apply_grouped(mixed)
    assert {p: (r.status, r.written, r.applied) for p, r in results.items()} == {
        0: ("ok", 4, 3),
        1: ("ok", 4, 6),
        2: ("ok", 4, 9),
    }
    for p in range(3):
        assert [r[2] for r in await entries(redis, keys, p)] == [o * (p + 1) for o in range(4)]
        # Every key of a partition carries its hash tag (one Cluster slot).
        assert keys.tag(p) in keys.stream(p) and keys.tag(p) in keys.state(p)


async def test_pv_chains_events_and_skips_dead_letters(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = batch(
        [
            record(1, 20, event(20)),
            record(1, 21, b"{nope"),  # dead letter: does not move pv
            record(1, 23, event(23)),  # offset 22 is a hole (a transaction marker)
        ]
    )
    first = await writer.apply_records(1, records, expect=-1, base=20)
    assert (first.written, first.dead, first.applied) == (2, 1, 21 + 2)
    second = await writer.apply_records(1, batch([record(1, 24, b"[1]")]), expect=23)
    assert (second.written, second.dead, second.applied) == (0, 1, 24)
    third = await writer.apply_records(1, events(1, [30]), expect=24)
    assert third.written == 1

    rows = await entries(redis, keys, 1)
    # (id, pv, seq): the first pv is the fill's base, each later one the previous event's id.
    assert rows == [(b"21-0", 20, 20), (b"24-0", 21, 23), (b"31-0", 24, 30)]
    # A reader at position 21 (saw offset 20) reads offset 23 next with pv 21 <= 21: exact,
    # although offsets 21 and 22 were never stream entries.
    assert await state(redis, keys, 1) == (30, 31, 20)


async def test_a_fresh_fill_records_its_base(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    result = await writer.apply_records(2, events(2, range(500, 503)), expect=-1, base=500)
    assert result.status == "ok"
    assert await state(redis, keys, 2) == (502, 503, 500)
    rows = await entries(redis, keys, 2)
    assert rows[0] == (b"501-0", 500, 500)
    # base is only recorded when the state is created: a later call does not move it.
    await writer.apply_records(2, events(2, [503]), expect=502, base=999)
    assert await state(redis, keys, 2) == (503, 504, 500)


async def test_lost_and_rolled_back_write_nothing(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    # Ingest believes Redis has offset 4 of partition 0, Redis has no state: lost.
    lost = await writer.apply_records(0, events(0, [5, 6]), expect=4)
    assert (lost.status, lost.written, lost.applied) == ("lost", 0, -1)
    assert await redis.exists(keys.stream(0), keys.state(0)) == 0

    await writer.apply_records(0, events(0, range(10)))
    # Ingest believes 19, Redis has 9 (a failover to a replica that missed 10..19).
    rolled = await writer.apply_records(0, events(0, [20, 21]), expect=19)
    assert (rolled.status, rolled.written, rolled.applied) == ("rolled_back", 0, 9)
    assert [r[2] for r in await entries(redis, keys, 0)] == list(range(10))
    assert await state(redis, keys, 0) == (9, 10, 0)

    # Redis ahead of what ingest believes (another worker applied more): fine, dedupe.
    ahead = await writer.apply_records(0, events(0, range(5, 12)), expect=4)
    assert (ahead.status, ahead.written, ahead.duplicates, ahead.applied) == ("ok", 2, 5, 11)


async def test_a_refused_id_is_a_duplicate_not_an_error(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    await writer.apply_records(0, events(0, range(10)))
    # The state is lost but the stream kept (deleted by hand): a fresh fill from 5 meets
    # ids at or below the stream's top, which Redis refuses.
    await redis.delete(keys.state(0))
    refill = await writer.apply_records(0, events(0, range(5, 13)), expect=-1, base=5)
    assert (refill.status, refill.written, refill.duplicates, refill.applied) == ("ok", 3, 5, 12)
    rows = await entries(redis, keys, 0)
    assert [r[2] for r in rows] == list(range(13))
    assert rows[10] == (b"11-0", 10, 10), "the chain goes on from the refused entries"
    assert await state(redis, keys, 0) == (12, 13, 5)


async def test_any_other_xadd_error_fails_the_call_and_moves_nothing(
    redis: Redis, keys: RedisKeys
) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    # Something that is not a stream sits at the stream's name: XADD answers WRONGTYPE,
    # which must not pass for a duplicate (the events would count as applied and be lost).
    await redis.set(keys.stream(0), b"not a stream")
    with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
        await writer.apply_records(0, events(0, range(3)))
    assert await redis.exists(keys.state(0)) == 0, "applied must not move"
    # Once the key is fixed, the held batch is sent again and applies in full.
    await redis.delete(keys.stream(0))
    again = await writer.apply_records(0, events(0, range(3)))
    assert (again.status, again.written, again.duplicates, again.applied) == ("ok", 3, 0, 2)
    assert [r[2] for r in await entries(redis, keys, 0)] == [0, 1, 2]


async def test_dead_letters_go_to_the_partitions_dead_stream_once(
    redis: Redis, keys: RedisKeys
) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = batch([record(1, 0, event(0)), record(1, 1, b"{nope"), record(1, 2, event(2))])
    result = await writer.apply_records(1, records)
    assert (result.written, result.dead) == (2, 1)
    ((_dead_id, fields),) = await redis.xrange(keys.dead(1))
    assert fields[b"reason"] == b"not_json"
    assert fields[b"offset"] == b"1" and fields[b"partition"] == b"1"
    assert fields[b"topic"] == TOPIC.encode()
    assert fields[b"value"] == b"{nope"
    assert await redis.exists(keys.dead(0), keys.dead(2)) == 0
    # A redelivery does not duplicate the dead letter either.
    await writer.apply_records(1, records, expect=2)
    assert await redis.xlen(keys.dead(1)) == 1


async def test_one_publish_per_partition_call_parsing_with_the_contract(
    redis: Redis, keys: RedisKeys
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live(0), keys.live(2))
    for _ in range(2):
        await pubsub.get_message(timeout=2)  # the subscribe confirmations
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = [
        *events(0, range(4)),
        *batch([record(2, 7, b"{nope")]),  # a call with nothing to publish
        *events(2, [8, 9]),
    ]
    await writer.apply_grouped(records)
    messages: dict[bytes, bytes] = {}
    async with asyncio.timeout(5):
        while len(messages) < 2:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                assert message["channel"] not in messages, "one message per partition call"
                messages[message["channel"]] = message["data"]
    for p in (0, 2):
        lines = [
            parse_live_line(line) for line in split_live_payload(messages[keys.live(p).encode()])
        ]
        rows = await redis.xrange(keys.stream(p))
        assert [entry_id(line.offset) for line in lines] == [row[0] for row in rows]
        for line, (_, fields) in zip(lines, rows, strict=True):
            assert [k.decode() for k in fields] == list(EVENT_FIELDS)
            assert (line.type, line.ts_ms, line.match, line.prev, line.envelope) == (
                fields[b"t"],
                int(fields[b"ts"]),
                fields[b"m"],
                int(fields[b"pv"]),
                fields[b"d"],
            )
    assert [
        parse_live_line(x).prev for x in split_live_payload(messages[keys.live(2).encode()])
    ] == [
        0,
        9,
    ]
    await pubsub.aclose()


async def test_trimming_is_detected_exactly_by_pv(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 10, 100)  # MAXLEN ~ 10
    # Holes every 7th offset, as transaction markers leave them.
    offsets = [o for o in range(400) if o % 7]
    for i in range(0, len(offsets), 50):
        chunk = offsets[i : i + 50]
        expect = offsets[i - 1] if i else -1
        assert (await writer.apply_records(0, events(0, chunk), expect=expect)).status == "ok"
    rows = await entries(redis, keys, 0)
    assert 10 <= len(rows) < len(offsets), "trimmed, near the cap"
    first_id, first_pv, first_seq = rows[0]
    previous = offsets[offsets.index(first_seq) - 1]
    assert first_pv == previous + 1, "pv names the trimmed predecessor"
    # Exactness: a reader at position c whose next entry E has pv(E) <= c missed nothing.
    # At the predecessor's position that holds, and XRANGE (c-0 + gives exactly every
    # record after it; one position earlier the predecessor itself is gone: reset.
    after = await redis.xrange(keys.stream(0), f"({first_pv}-0", "+")
    assert [position_of(i) - 1 for i, _ in after] == [o for o in offsets if o > previous]
    earlier = await redis.xrange(keys.stream(0), f"({first_pv - 1}-0", "+", count=1)
    assert int(earlier[0][1][b"pv"]) > first_pv - 1
    # Every retained entry's pv is its predecessor's id, across the offset holes.
    for (prev_id, _, _), (_, pv, _) in itertools.pairwise(rows):
        assert pv == position_of(prev_id)
    assert position_of(first_id) == first_seq + 1


async def test_wait_without_replicas_reports_fewer_acks(redis: Redis, keys: RedisKeys) -> None:
    info = await redis.info("replication")
    if int(info.get("connected_slaves", 0)):
        pytest.fail("the shared test Redis is expected to have no replica")
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100, wait_replicas=1, wait_timeout_ms=20)
    packed = pack(events(0, [0]))
    result = await writer.apply([PartitionBatch(0, packed, 1, -1, 0)])
    assert result.partitions[0].status == "ok"
    assert (result.acked, result.replicas) == (False, 0)
    assert await writer.wait_acked() is False
    plain = BatchWriter(redis, keys, TOPIC, 1000, 100)
    assert (await plain.apply([PartitionBatch(0, pack(events(0, [1])), 1, 0, 0)])).acked


async def test_the_payload_is_the_written_entries_whatever_pv_ingest_assumed(
    redis: Redis, keys: RedisKeys
) -> None:
    """Ingest sends the live lines ready, with the pv it expects; the script publishes them
    as they stand only while Redis's chain agrees. Whatever the guess (right, stale, unknown)
    and whatever else happens in the call (redelivered records, ids the stream refuses after
    a lost state, dead letters anywhere, offset holes), every published message is exactly
    the entries that call wrote, as live lines."""
    rng = random.Random(1302)
    writer = BatchWriter(redis, keys, TOPIC, 100_000, 1000)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live(0))
    await pubsub.get_message(timeout=2)
    kafka = [o for o in range(3000) if rng.random() > 0.1]  # holes, as transaction markers
    expect, at, chain = -1, 0, 0
    published = 0
    for _ in range(120):
        if rng.random() < 0.1:
            # The state is lost while the stream stays: a fresh fill re-reads records the
            # stream already holds (refused ids, counted as duplicates).
            await redis.delete(keys.state(0))
            expect, at = -1, max(0, at - rng.randint(1, 30))
        start = max(0, at - (rng.randint(1, 20) if rng.random() < 0.3 else 0))  # redelivery
        chunk = kafka[start : start + rng.randint(1, 40)]
        if not chunk:
            break
        records = batch(
            [record(0, o, b"{nope" if rng.random() < 0.15 else event(o)) for o in chunk]
        )
        guess = rng.choice([chain, chain, -1, chain + rng.randint(1, 5)])
        before = {i for i, _ in await redis.xrange(keys.stream(0))}
        result = await writer.apply_records(
            0, records, expect=expect, base=kafka[start], prev=guess
        )
        assert result.status == "ok"
        rows = [(i, f) for i, f in await redis.xrange(keys.stream(0)) if i not in before]
        assert result.written == len(rows)
        if rows:
            message = await next_message(pubsub)
            assert message["data"] == encode_live_payload(
                encode_live_line(
                    position_of(i) - 1, int(f[b"pv"]), f[b"t"], int(f[b"ts"]), f[b"m"], f[b"d"]
                )
                for i, f in rows
            )
            published += 1
        expect, at = result.applied, kafka.index(chunk[-1]) + 1
        got = await state(redis, keys, 0)
        assert got is not None and result.last == got[1]
        chain = result.last
    assert published > 50
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    await pubsub.aclose()


async def test_one_call_with_many_records_still_keeps_the_stream_near_its_cap(
    redis: Redis, keys: RedisKeys
) -> None:
    # The stream is trimmed once per call: that trim must remove everything beyond the cap,
    # however much the call wrote (an approximate trim removes at most 100 nodes by default).
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    expect = -1
    for start in range(0, 50_000, 25_000):
        result = await writer.apply_records(
            0, events(0, range(start, start + 25_000)), expect=expect
        )
        assert result.written == 25_000
        expect = result.applied
        assert 1000 <= await redis.xlen(keys.stream(0)) < 1000 + 200


async def test_records_out_of_offset_order_publish_only_what_was_written(
    redis: Redis, keys: RedisKeys
) -> None:
    # Kafka never gives them; a caller that does must still get a payload that is exactly
    # the entries written (the second record at offset 5 is a duplicate).
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live(0))
    await pubsub.get_message(timeout=2)
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = [*events(0, [5]), *events(0, [5]), *events(0, [6])]
    result = await writer.apply_records(0, records, expect=-1, base=5, prev=5)
    assert (result.written, result.duplicates) == (2, 1)
    message = await next_message(pubsub)
    assert [parse_live_line(x).offset for x in split_live_payload(message["data"])] == [5, 6]
    await pubsub.aclose()
