"""The atomic Redis step against a real Redis: dedupe by offset, stream + dead + publish +
offsets in one script, the genesis marker, and the edge's reading of it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from edge.bus_redis import RedisBus, parse_live_payload
from edge.resume import Reset, Resume, check_position
from ingest.records import RawRecord, prepare
from ingest.writer import BatchWriter
from shared.ids import ZERO, parse_id
from shared.keys import RedisKeys
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


def batch(records: list[RawRecord]) -> list:
    return [prepare(r, max_bytes=1024, type_fields=("Type",)) for r in records]


async def test_redelivered_batch_is_skipped_entirely(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = batch([record(p, o, event(p * 100 + o)) for p in range(3) for o in range(5)])
    first = await writer.apply(records)
    assert (first.written, first.duplicates, first.dead) == (15, 0, 0)
    again = await writer.apply(records)
    assert (again.written, again.duplicates, again.dead) == (0, 15, 0)
    assert await redis.xlen(keys.stream) == 15
    assert [await writer.applied_offset(p) for p in range(3)] == [4, 4, 4]


async def test_overlapping_batch_writes_only_the_new_records(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    await writer.apply(batch([record(0, o, event(o)) for o in range(10)]))
    # A rebalance re-reads from offset 5 and goes on to 14.
    result = await writer.apply(batch([record(0, o, event(o)) for o in range(5, 15)]))
    assert (result.written, result.duplicates) == (5, 5)
    rows = await redis.xrange(keys.stream)
    seqs = [json.loads(fields[b"d"])["event"]["Seq"] for _, fields in rows]
    assert seqs == list(range(15))


async def test_dead_letters_and_events_in_one_step(redis: Redis, keys: RedisKeys) -> None:
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    records = batch([record(1, 0, event(0)), record(1, 1, b"{nope"), record(1, 2, event(2))])
    result = await writer.apply(records)
    assert (result.written, result.dead) == (2, 1)
    ((_dead_id, fields),) = await redis.xrange(keys.dead)
    assert fields[b"reason"] == b"not_json"
    assert fields[b"offset"] == b"1" and fields[b"partition"] == b"1"
    assert fields[b"value"] == b"{nope"
    assert await writer.applied_offset(1) == 2
    # A redelivery does not duplicate the dead letter either.
    await writer.apply(records)
    assert await redis.xlen(keys.dead) == 1


async def test_one_publish_per_batch_with_ids_matching_the_stream(
    redis: Redis, keys: RedisKeys
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live)
    await pubsub.get_message(timeout=2)  # the subscribe confirmation
    writer = BatchWriter(redis, keys, TOPIC, 1000, 100)
    await writer.apply(batch([record(2, o, event(o)) for o in range(4)]))
    message = None
    async with asyncio.timeout(5):
        while message is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    entries = parse_live_payload(message["data"])
    rows = await redis.xrange(keys.stream)
    assert [e.id_bytes for e in entries] == [row[0] for row in rows]
    assert [e.data for e in entries] == [row[1][b"d"] for row in rows]
    assert {e.type for e in entries} == {b"DealWon"}
    assert entries[0].frame == b"id: " + rows[0][0] + b"\ndata: " + rows[0][1][b"d"] + b"\n\n"
    await pubsub.aclose()


async def test_stream_info_genesis_and_trim_detection(redis: Redis, keys: RedisKeys) -> None:
    bus = RedisBus(redis, redis, keys, 1.0)
    info = await bus.info()
    assert not info.exists
    assert isinstance(check_position(parse_id("5-0"), info), Reset)

    writer = BatchWriter(redis, keys, TOPIC, 10, 100)  # MAXLEN ~ 10
    await writer.apply(batch([record(0, o, event(o)) for o in range(300)]))
    info = await bus.info()
    rows = await redis.xrange(keys.stream, count=1)
    assert info.exists and info.first_id == parse_id(rows[0][0].decode())
    assert info.genesis is not None and info.genesis < info.first_id
    assert info.length < 300
    assert info.entries_added == 300, "Redis counts what was added, so trimming is visible"

    decision = check_position(info.genesis, info)
    assert isinstance(decision, Reset) and decision.reason == "trimmed"
    assert isinstance(check_position(info.last_id, info), Resume)
    assert isinstance(check_position(decision.after, info), Resume)
    assert check_position(ZERO, info) != Resume(ZERO)

    # Redis loses everything; the next write starts a new incarnation.
    old_last = info.last_id
    await redis.delete(keys.stream, keys.genesis, keys.offsets)
    await writer.apply(batch([record(0, 0, event(0))]))
    info = await bus.info()
    lost = check_position(old_last, info)
    assert isinstance(lost, Reset) and lost.reason == "stream_lost"
