"""Redis is a rebuildable cache of Kafka's tail: the ingest worker (real Kafka, real Redis)
refills a wiped Redis and a rolled-back one with the very same entry ids, two workers
sharing the partitions through a rebalance apply every record exactly once, and with
``WAIT`` a batch's offsets are committed only once a real replica holds it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from devtools.supervisor import ProcessSpec, Supervisor
from ingest.app import WORKER
from ingest.app import create_app as create_ingest_app
from ingest.worker import IngestWorker
from shared.contract import (
    META_EPOCH,
    RedisKeys,
    parse_commit_metadata,
    parse_epoch,
    parse_state,
    position_of,
)
from shared.settings import IngestSettings, RedisSettings
from tests.harness.backends import Backends
from tests.harness.cluster import crm_event
from tests.harness.redis_server import private_redis
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)

Rows = list[tuple[bytes, dict[bytes, bytes]]]


@dataclasses.dataclass
class Deployment:
    """One topic, group and prefix of a test's own over a Kafka and a Redis."""

    kafka: str
    redis_url: str
    partitions: int = 3
    env: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.topic = f"crm-test-{tag}"
        self.group = f"crm-test-group-{tag}"
        self.keys = RedisKeys(f"crm-test-{tag}")
        self.last: dict[int, int] = {}
        """Highest produced offset per partition."""
        self.produced: dict[int, list[tuple[int, int]]] = defaultdict(list)
        """(offset, seq) per partition, in offset order."""

    def settings(self, node: str) -> IngestSettings:
        return IngestSettings(
            redis=RedisSettings(url=self.redis_url, prefix=self.keys.prefix),
            node_id=node,
            kafka_bootstrap=self.kafka,
            kafka_topic=self.topic,
            kafka_group=self.group,
            kafka_partitions=self.partitions,
            backoff_max_s=0.5,
            **self.env,
        )

    async def produce(self, seqs: range, chunk: int = 50) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all")
        await producer.start()
        try:
            for start in range(seqs.start, seqs.stop, chunk):
                part = range(start, min(start + chunk, seqs.stop))
                futures = [
                    (s, await producer.send(self.topic, crm_event(s), key=f"k{s % 30}".encode()))
                    for s in part
                ]
                for seq, future in futures:
                    meta = await future
                    self.produced[meta.partition].append((meta.offset, seq))
                    self.last[meta.partition] = max(self.last.get(meta.partition, -1), meta.offset)
        finally:
            await producer.stop()

    async def committed(self) -> dict[int, tuple[int, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka)
        await admin.start()
        try:
            got = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        return {tp.partition: (m.offset, m.metadata) for tp, m in got.items() if m.offset >= 0}


@contextlib.asynccontextmanager
async def ingest(d: Deployment, node: str = "ingest-1") -> AsyncIterator[Ingest]:
    registry = CollectorRegistry()
    app = create_ingest_app(d.settings(node), registry=registry)
    server = TestServer(app)
    await server.start_server()
    try:
        yield Ingest(app[WORKER], registry)
    finally:
        await server.close()


@dataclasses.dataclass
class Ingest:
    worker: IngestWorker
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def states(redis: Redis, d: Deployment) -> dict[int, Any]:
    return {p: parse_state(await redis.hgetall(d.keys.state(p))) for p in range(d.partitions)}


async def caught_up(redis: Redis, d: Deployment) -> bool:
    got = await states(redis, d)
    return all((s := got[p]) is not None and s.applied >= last for p, last in d.last.items())


async def rows(redis: Redis, d: Deployment, p: int) -> Rows:
    return list(await redis.xrange(d.keys.stream(p)))


async def committed_all(d: Deployment) -> bool:
    got = await d.committed()
    return all(got.get(p, (-1, ""))[0] == last + 1 for p, last in d.last.items())


async def produce_applied_and_committed(
    ing: Ingest, d: Deployment, redis: Redis, seqs: range
) -> None:
    """Once ``ing`` is ready: produce ``seqs``, and wait until Redis holds them and their
    offsets are committed."""
    await eventually(lambda: ing.worker.ready, 60, "ingest ready")
    await d.produce(seqs)
    await eventually(lambda: caught_up(redis, d), 30, "the events in Redis")
    await eventually(lambda: committed_all(d), 30, "the offsets committed")


@pytest.fixture
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervisor, ProcessSpec]]:
    sup, spec = private_redis(Path(tmp_path_factory.mktemp("redis-refill")), appendonly=False)
    sup.start(spec)
    try:
        yield sup, spec
    finally:
        sup.stop(spec.name)


async def test_a_wiped_redis_is_refilled_from_kafka_with_the_same_ids(
    backends: Backends, private: tuple[Supervisor, ProcessSpec]
) -> None:
    _, spec = private
    url = f"redis://127.0.0.1:{spec.port}/0"
    d = Deployment(backends.kafka_bootstrap, url, env={"stream_maxlen": 50})
    redis = Redis.from_url(url)
    try:
        async with ingest(d) as ing:
            await eventually(lambda: ing.worker.ready, 60, "ingest ready")
            await d.produce(range(600))
            await eventually(lambda: caught_up(redis, d), 60, "the 600 events in Redis")
            await eventually(lambda: committed_all(d), 30, "the offsets committed")
            committed = {p: o for p, (o, _) in (await d.committed()).items()}
            before = {p: await rows(redis, d, p) for p in range(d.partitions)}
            epoch = await redis.hget(d.keys.meta, META_EPOCH)

            assert await redis.flushall()
            # No new record is needed: the worker notices the loss of idle partitions.
            await eventually(lambda: caught_up(redis, d), 30, "every partition refilled")
            assert await redis.hget(d.keys.meta, META_EPOCH) == epoch, "same epoch back"

            got = await states(redis, d)
            refilled = 0
            for p in range(d.partitions):
                base = max(0, committed[p] - 50)
                assert got[p].base == base, "the refill window: committed - stream maxlen"
                after = await rows(redis, d, p)
                kept = [r for r in before[p] if position_of(r[0]) > base]
                assert kept, "the comparison covers entries"
                assert [r[0] for r in after] == [r[0] for r in kept], "the same ids"
                # Same fields; only the first refilled entry's pv differs: it is the base
                # (the stream is complete from there), not the trimmed predecessor.
                assert after[1:] == kept[1:]
                first = dict(kept[0][1])
                assert after[0][1][b"pv"] == str(base).encode()
                first[b"pv"] = after[0][1][b"pv"]
                assert after[0][1] == first
                assert ing.metric("crm_events_refills_total", partition=str(p), reason="lost") == 1
                refilled += d.last[p] + 1 - base
            assert (
                sum(
                    ing.metric("crm_events_refilled_records_total", partition=str(p))
                    for p in range(d.partitions)
                )
                == refilled
            )

            # And it goes on: new events after the refilled window.
            await d.produce(range(600, 630))
            await eventually(lambda: caught_up(redis, d), 30, "new events after the refill")
            for p in range(d.partitions):
                seqs = [json.loads(f[b"d"])["event"]["Seq"] for _, f in await rows(redis, d, p)]
                assert seqs == [s for o, s in d.produced[p] if o >= got[p].base]
    finally:
        await redis.aclose()


async def test_a_new_worker_on_a_wiped_redis_takes_the_epoch_from_kafka(
    backends: Backends, private: tuple[Supervisor, ProcessSpec]
) -> None:
    # Unlike the test above, no worker survives the wipe with the epoch in memory: the only
    # copy left is the metadata of the group's commits in Kafka.
    _, spec = private
    url = f"redis://127.0.0.1:{spec.port}/0"
    d = Deployment(backends.kafka_bootstrap, url, partitions=2)
    redis = Redis.from_url(url)
    try:
        async with ingest(d, "ingest-before") as ing:
            await produce_applied_and_committed(ing, d, redis, range(40))
            epoch = await redis.hget(d.keys.meta, META_EPOCH)
        assert epoch is not None
        assert {parse_commit_metadata(m) for _, m in (await d.committed()).values()} == {
            parse_epoch(epoch)
        }

        assert await redis.flushall()
        async with ingest(d, "ingest-after") as ing:
            await eventually(lambda: ing.worker.ready, 60, "the new worker ready")
            assert await redis.hget(d.keys.meta, META_EPOCH) == epoch, "the epoch from Kafka"
            assert ing.worker.epoch == parse_epoch(epoch)
            await eventually(lambda: caught_up(redis, d), 30, "the partitions refilled")
    finally:
        await redis.aclose()


async def test_a_rolled_back_redis_is_detected_and_refilled_to_the_same_ids(
    backends: Backends,
) -> None:
    d = Deployment(backends.kafka_bootstrap, backends.redis_url, partitions=1)
    redis = Redis.from_url(backends.redis_url)
    try:
        async with ingest(d) as ing:
            await eventually(lambda: ing.worker.ready, 60, "ingest ready")
            await d.produce(range(100))
            await eventually(lambda: caught_up(redis, d), 30, "the first 100 events")
            # An older copy of the partition, as a lagging replica would hold it.
            old_stream = await redis.dump(d.keys.stream(0))
            old_state = await redis.dump(d.keys.state(0))
            await d.produce(range(100, 200))
            await eventually(lambda: caught_up(redis, d), 30, "the next 100 events")
            await eventually(lambda: committed_all(d), 30, "the offsets committed")
            full = await rows(redis, d, 0)
            assert len(full) == 200

            # The failover: Redis now holds the older copy, and ingest has committed past it.
            async with redis.pipeline(transaction=True) as pipe:
                pipe.restore(d.keys.stream(0), 0, old_stream, replace=True)
                pipe.restore(d.keys.state(0), 0, old_state, replace=True)
                await pipe.execute()
            assert (await states(redis, d))[0].applied == 99

            await eventually(lambda: caught_up(redis, d), 30, "the rolled-back events refilled")
            assert await rows(redis, d, 0) == full, "the same ids and fields, pv included"
            reasons = {
                r: ing.metric("crm_events_refills_total", partition="0", reason=r)
                for r in ("lost", "rolled_back", "assigned")
            }
            assert reasons == {"lost": 0, "rolled_back": 1, "assigned": 0}
            assert ing.metric("crm_events_refilled_records_total", partition="0") == 100
            assert ing.metric("crm_events_ingest_records_total", outcome="written") == 300

            await d.produce(range(200, 210))
            await eventually(lambda: caught_up(redis, d), 30, "events after the refill")
            seqs = [json.loads(f[b"d"])["event"]["Seq"] for _, f in await rows(redis, d, 0)]
            assert seqs == list(range(210))
    finally:
        await redis.delete(*d.keys.partition_keys(0), d.keys.meta)
        await redis.aclose()


async def test_a_recreated_topic_drops_every_partition_and_takes_one_new_epoch(
    backends: Backends,
) -> None:
    d = Deployment(backends.kafka_bootstrap, backends.redis_url, partitions=3)
    redis = Redis.from_url(backends.redis_url)
    old_epoch = b"0badc0de"
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=d.kafka)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(d.topic, d.partitions, 1)])
        finally:
            await admin.close()
        await d.produce(range(90))
        assert all(d.last.get(p, -1) >= 1 for p in range(d.partitions))
        # What Redis still holds of the topic's previous incarnation: partition 0 got far
        # past anything the new topic has (that is how the recreation shows), partitions
        # 1 and 2 look like a plausible prefix of the new ones but hold old events.
        await redis.hset(
            d.keys.meta, mapping={"topic": d.topic, "partitions": 3, "epoch": old_epoch}
        )
        old_event = json.dumps({"event": {"Seq": -1}}).encode()
        for p, applied in ((0, 100_000), (1, 0), (2, 0)):
            await redis.xadd(
                d.keys.stream(p),
                {b"t": b"Old", b"ts": b"1", b"m": b"-", b"pv": b"0", b"d": old_event},
                id=f"{applied + 1}-0",
            )
            await redis.hset(
                d.keys.state(p), mapping={"applied": applied, "last": applied + 1, "base": 0}
            )

        async def renewed() -> bool:
            # Both: partition 0's old state counts as caught up until the worker sees it
            # (the partitions may be synced at different times when Kafka answers slowly).
            epoch = await redis.hget(d.keys.meta, META_EPOCH)
            return epoch not in (None, old_epoch) and await caught_up(redis, d)

        async with ingest(d):
            await eventually(renewed, 60, "a new epoch (every client resets) and its events")
            for p in range(d.partitions):
                seqs = [json.loads(f[b"d"])["event"]["Seq"] for _, f in await rows(redis, d, p)]
                assert seqs == [s for _, s in d.produced[p]], f"partition {p}: no old event left"
    finally:
        await redis.delete(*(k for p in range(3) for k in d.keys.partition_keys(p)), d.keys.meta)
        await redis.aclose()


async def test_a_refill_does_not_count_or_log_a_dead_letter_again(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    d = Deployment(backends.kafka_bootstrap, backends.redis_url, partitions=1)
    redis = Redis.from_url(backends.redis_url)
    try:
        async with ingest(d) as ing:
            await eventually(lambda: ing.worker.ready, 60, "ingest ready")
            await d.produce(range(10))
            producer = AIOKafkaProducer(bootstrap_servers=d.kafka, acks="all")
            await producer.start()
            try:
                meta = await producer.send_and_wait(d.topic, b"{nope", key=b"bad")
            finally:
                await producer.stop()
            d.last[0] = meta.offset
            await d.produce(range(10, 20))
            await eventually(lambda: caught_up(redis, d), 30, "the events and the dead letter")
            await eventually(lambda: committed_all(d), 30, "the offsets committed")
            dead = "crm_events_dead_letters_total"
            assert ing.metric(dead, reason="not_json") == 1
            assert await redis.xlen(d.keys.dead(0)) == 1

            # Redis loses the partition; the refill re-applies the range with the dead letter.
            await redis.delete(*d.keys.partition_keys(0))
            await eventually(lambda: caught_up(redis, d), 30, "the partition refilled")
            assert ing.metric("crm_events_refills_total", partition="0", reason="lost") == 1
            assert await redis.xlen(d.keys.dead(0)) == 1, "the dead stream is rebuilt too"
            assert ing.metric(dead, reason="not_json") == 1, "one dead letter, counted once"
            logged = [r for r in caplog.records if r.getMessage() == "dead letter"]
            assert len(logged) == 1, "and logged once"
    finally:
        await redis.delete(*d.keys.partition_keys(0), d.keys.meta)
        await redis.aclose()


async def test_commits_wait_for_a_real_replica(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sup, primary = private_redis(Path(tmp_path_factory.mktemp("redis-primary")), appendonly=False)
    rsup, plain = private_redis(Path(tmp_path_factory.mktemp("redis-replica")), appendonly=False)
    replica = dataclasses.replace(
        plain, argv=[*plain.argv, "--replicaof", "127.0.0.1", str(primary.port)]
    )
    sup.start(primary)
    url = f"redis://127.0.0.1:{primary.port}/0"
    redis = Redis.from_url(url)
    try:
        rsup.start(replica)

        async def linked() -> bool:
            info = await redis.info("replication")
            return int(info.get("connected_slaves", 0)) == 1 and "online" in str(
                info.get("slave0", "")
            )

        await eventually(linked, 30, "the replica in sync")
        d = Deployment(
            backends.kafka_bootstrap,
            url,
            partitions=1,
            env={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 100},
        )
        async with ingest(d) as ing:
            await eventually(lambda: ing.worker.ready, 60, "ingest ready")
            await d.produce(range(20))
            await eventually(lambda: committed_all(d), 30, "commits acknowledged by the replica")
            ((offset, metadata),) = (await d.committed()).values()
            epoch = await redis.hget(d.keys.meta, META_EPOCH)
            assert offset == 20
            assert parse_commit_metadata(metadata) == parse_epoch(epoch), "the epoch travels"

            rsup.pause(replica.name)  # the replica stops acknowledging
            timeouts = ing.metric("crm_events_redis_wait_timeouts_total")
            await d.produce(range(20, 40))
            await eventually(lambda: caught_up(redis, d), 30, "the batch applied to the primary")
            await eventually(
                lambda: ing.metric("crm_events_redis_wait_timeouts_total") >= timeouts + 3,
                30,
                "WAITs timing out (the batch, then the idle re-asks)",
            )
            assert ing.worker._committer is not None and ing.worker._committer.holding
            assert (await d.committed())[0][0] == 20, "held: the replica does not have them"

            rsup.resume(replica.name)
            await eventually(lambda: committed_all(d), 30, "released once the replica acks")
            assert (await d.committed())[0][0] == 40
    finally:
        with contextlib.suppress(Exception):
            rsup.resume(replica.name)
        rsup.stop(replica.name)
        sup.stop(primary.name)
        await redis.aclose()


async def test_records_fetched_before_a_partition_is_decided_are_not_applied(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka may hand out a newly assigned partition's records, fetched from the committed
    offset, while the assignment listener still reads Redis and Kafka to decide where to read
    from. Applied, they would be a fresh fill from 0 starting at the committed offset: a
    stream that looks complete with a hole in it (found by review; the listener's decision
    is held open here until the consumer has fetched the partition)."""
    d = Deployment(backends.kafka_bootstrap, backends.redis_url, partitions=1)
    redis = Redis.from_url(backends.redis_url)
    try:
        async with ingest(d, "ingest-before") as ing:
            await produce_applied_and_committed(ing, d, redis, range(1000))
        # Redis loses the partition while no worker runs; more events arrive.
        await redis.delete(*d.keys.partition_keys(0))
        await d.produce(range(1000, 1500))

        decide = IngestWorker._sync
        held: list[bool] = []

        async def held_open(
            worker: IngestWorker, tps: list[TopicPartition], cause: str | None
        ) -> None:
            consumer = worker._consumer
            if not held and consumer is not None:
                held.append(True)
                tp = TopicPartition(d.topic, 0)
                await eventually(
                    lambda: consumer.highwater(tp) is not None, 30, "the partition fetched"
                )
                # A few of the worker's polls happen while the position is still undecided.
                await asyncio.sleep(0.5)
            await decide(worker, tps, cause)

        monkeypatch.setattr(IngestWorker, "_sync", held_open)
        async with ingest(d, "ingest-after"):
            await eventually(lambda: caught_up(redis, d), 60, "the partition refilled")
        assert held, "the decision was held open"
        got = await rows(redis, d, 0)
        assert [position_of(i) - 1 for i, _ in got] == list(range(1500)), "no hole"
        assert got[0][1][b"pv"] == b"0"
    finally:
        await redis.delete(*d.keys.partition_keys(0), d.keys.meta)
        await redis.aclose()
