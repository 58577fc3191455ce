"""The local Kafka broker (deploy/kafka, Kafka 4.1) speaks everything aiokafka 0.14 needs.

Kafka 4 removed old protocol versions (KIP-896) and aiokafka's own CI stops at older brokers,
so this checks the exact client paths ingest and the producer use, end to end: topic creation
through the admin client, keyed produce spreading over 3 partitions, consume in a group with
``getmany``, explicit commits honoured by the next member of the group, a rebalance between
two members, and the sample producer.

Needs a broker at CRM_EVENTS_TEST_KAFKA (default 127.0.0.1:9092; ``make test`` starts one).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.producer import ProducerSettings, run
from tests.waiting import eventually

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture
def bootstrap() -> str:
    return os.environ.get("CRM_EVENTS_TEST_KAFKA", "127.0.0.1:9092")


def unique(kind: str) -> str:
    return f"crm-test-{kind}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def topic(bootstrap: str) -> AsyncIterator[str]:
    name = unique("topic")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(admin.start(), 20)
    except (OSError, TimeoutError) as exc:
        pytest.fail(f"no Kafka broker at {bootstrap} (CRM_EVENTS_TEST_KAFKA): {exc!r}")
    try:
        resp = await admin.create_topics(
            [NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)]
        )
        assert [int(e[1]) for e in resp.topic_errors] == [0], resp

        async def leaders_known() -> bool:
            [desc] = await admin.describe_topics([name])
            parts = desc["partitions"]
            return len(parts) == PARTITIONS and all(p["leader"] >= 0 for p in parts)

        await eventually(leaders_known, 15, f"leaders for the partitions of {name}")
        yield name
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, n: int, **kwargs: object) -> dict[int, list[int]]:
    """Send ``n`` keyed records; returns the offsets written per partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kwargs)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=f"v{i}".encode(), key=f"agg-{i % 17}".encode())
            for i in range(n)
        ]
        written: dict[int, list[int]] = defaultdict(list)
        for fut in futures:
            md = await fut
            written[md.partition].append(md.offset)
        return written
    finally:
        await producer.stop()


def consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def take(c: AIOKafkaConsumer, n: int, timeout_s: float = 30.0) -> list[Any]:
    """getmany until ``n`` records arrived (ingest's read pattern)."""
    got: list[Any] = []

    async def batch() -> bool:
        for records in (await c.getmany(timeout_ms=200, max_records=7)).values():
            got.extend(records)
        return len(got) >= n

    await eventually(batch, timeout_s, f"{n} records (got {len(got)})")
    return got


async def test_admin_created_topic_has_three_partitions(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert topic in await admin.list_topics()
        [desc] = await admin.describe_topics([topic])
        assert sorted(p["partition"] for p in desc["partitions"]) == [0, 1, 2]
    finally:
        await admin.close()


async def test_keyed_records_spread_over_all_partitions(bootstrap: str, topic: str) -> None:
    written = await produce(bootstrap, topic, 60)
    assert sorted(written) == [0, 1, 2]
    for offsets in written.values():
        assert offsets == list(range(len(offsets)))


async def test_idempotent_gzip_producer(bootstrap: str, topic: str) -> None:
    written = await produce(bootstrap, topic, 30, enable_idempotence=True, compression_type="gzip")
    assert sum(len(v) for v in written.values()) == 30
    c = consumer(bootstrap, topic, unique("group"))
    await c.start()
    try:
        got = await take(c, 30)
        assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(30))
    finally:
        await c.stop()


async def test_group_commit_is_honoured_after_restart(bootstrap: str, topic: str) -> None:
    written = await produce(bootstrap, topic, 60)
    group = unique("group")

    first = consumer(bootstrap, topic, group)
    await first.start()
    try:
        got = await take(first, 60)
        by_part: dict[int, list[int]] = defaultdict(list)
        for r in got:
            by_part[r.partition].append(r.offset)
        # Per-partition order is what ingest relies on.
        for p, offsets in by_part.items():
            assert offsets == written[p]
        # Commit only half of each partition, as if the worker died before the rest was applied.
        commit = {TopicPartition(topic, p): len(offs) // 2 for p, offs in written.items()}
        await first.commit(commit)
    finally:
        await first.stop()

    second = consumer(bootstrap, topic, group)
    await second.start()
    try:
        for tp, offset in commit.items():
            assert await second.committed(tp) == offset
        expected = sum(len(offs) - len(offs) // 2 for offs in written.values())
        rest = await take(second, expected)
        assert len(rest) == expected
        for r in rest:
            p, off = r.partition, r.offset
            assert off >= commit[TopicPartition(topic, p)]
        # Nothing more: the committed records are not delivered again.
        extra = await second.getmany(timeout_ms=500)
        assert sum(len(v) for v in extra.values()) == 0
    finally:
        await second.stop()


async def test_two_members_split_the_partitions(bootstrap: str, topic: str) -> None:
    group = unique("group")
    a, b = consumer(bootstrap, topic, group), consumer(bootstrap, topic, group)
    await a.start()
    await b.start()
    try:

        async def balanced() -> bool:
            await asyncio.gather(a.getmany(timeout_ms=200), b.getmany(timeout_ms=200))
            pa, pb = a.assignment(), b.assignment()
            return bool(pa) and bool(pb) and not (pa & pb) and len(pa | pb) == PARTITIONS

        await eventually(balanced, 30, "both members to hold partitions")
    finally:
        await a.stop()
        await b.stop()


async def test_sample_producer_writes_outbox_events(bootstrap: str, topic: str) -> None:
    settings = ProducerSettings(bootstrap=bootstrap, topic=topic, rate_per_s=500, count=90, seed=7)
    acked = await asyncio.wait_for(run(settings, asyncio.Event()), 60)
    assert acked == 90

    c = consumer(bootstrap, topic, unique("group"))
    await c.start()
    try:
        got = await take(c, 90)
    finally:
        await c.stop()
    assert {r.partition for r in got} == {0, 1, 2}
    for r in got:
        event = json.loads(r.value)
        assert {"Type", "Ts", "EventId", "TenantId", "AggregateId", "Data"} <= event.keys()
        assert r.key == event["AggregateId"].encode()
        assert event["Ts"].endswith("Z")
    types = {json.loads(r.value)["Type"] for r in got}
    assert {"ContactCreated", "DealCreated", "TicketOpened"} <= types
