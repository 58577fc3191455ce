"""Malformed input in the real Redis never stops an edge (issue 11, item 1), and what ingest's
script writes is what the contract (shared/contract.py) says."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from edge.bus import BadInput
from edge.bus_redis import RedisBus
from ingest.app import WORKER
from ingest.app import create_app as create_ingest_app
from ingest.writer import BatchResult, BatchWriter, PartitionBatch
from shared.contract import (
    EVENT_FIELDS,
    RedisKeys,
    encode_live_line,
    entry_id,
    parse_live_line,
    position_of,
    split_live_payload,
)
from shared.settings import IngestSettings, RedisSettings
from shared.tasks import Supervisor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event
from tests.integration.checks import assert_exactly_once_in_order
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def one_edge(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(
        Path(tmp_path_factory.mktemp("bad")), backends, edges=1, with_nginx=False
    ).running() as c:
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def metric(session: aiohttp.ClientSession, c: Cluster, line_start: str) -> float:
    async with session.get(c.edge_url(1, "/metrics")) as resp:
        text = await resp.text()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_start))


async def ready(session: aiohttp.ClientSession, c: Cluster) -> bool:
    async with session.get(c.edge_url(1, "/readyz")) as resp:
        return resp.status == 200 and (await resp.json())["subscribed"] is True


async def test_a_malformed_live_line_does_not_stop_the_feed(
    one_edge: Cluster, session: aiohttp.ClientSession
) -> None:
    c = one_edge
    client = Collector(c.edge_url(1, "/crm-events")).start(session)
    await client.wait_for(lambda col: col.node is not None, 10, "stream open")
    # Where the events below will go (one key, one partition).
    (probe,) = await c.produce([(b"k", crm_event(-1))])
    await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, "the first event")
    p = probe.partition
    other = (p + 1) % await c.partitions()
    redis = c.redis()
    try:
        # The line of the single-stream layout (4 fields, a stream id for an offset) on the
        # partition the events flow through, and plain garbage on another partition.
        four = b'1700000000000-0 ContactCreated 1700000000000 {"type":"ContactCreated"}'
        assert await redis.publish(c.keys.live(p), four) == 1
        assert await redis.publish(c.keys.live(other), b"\xff\x00 garbage") == 1
    finally:
        await redis.aclose()
    await c.produce((b"k", crm_event(s)) for s in range(100))
    await client.wait_for(lambda col: len(col.data_frames) >= 101, 30, "the 100 good events")
    assert_exactly_once_in_order(client.data_frames, set(range(-1, 100)))
    line = 'crm_events_bad_messages_total{reason="bad_live_line"}'
    assert await metric(session, c, line) == 2
    assert await ready(session, c)
    await client.stop()


async def test_a_foreign_entry_does_not_stop_the_repair_after_client_kill(
    one_edge: Cluster, session: aiohttp.ClientSession
) -> None:
    c = one_edge
    client = Collector(c.edge_url(1, "/crm-events")).start(session)
    await client.wait_for(lambda col: col.node is not None, 10, "stream open")
    metadata = await c.produce((b"k", crm_event(s)) for s in range(1000, 1010))
    await client.wait_for(lambda col: len(col.data_frames) >= 10, 30, "events before the kill")
    (p,) = {m.partition for m in metadata}
    stream = c.keys.stream(p)
    redis = c.redis()
    try:
        ((top, _),) = await redis.xrevrange(stream, count=1)
        # Above the top, yet below the id of the partition's next record (<top+1>-0), so
        # that ingest still writes every later event after it.
        foreign = b"%d-1" % position_of(top)
        await redis.xadd(stream, {"foo": "bar"}, id=foreign)
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 1
    finally:
        await redis.aclose()
    await c.produce((b"k", crm_event(s)) for s in range(1010, 1050))
    await client.wait_for(lambda col: len(col.data_frames) >= 50, 30, "events after the kill")
    assert_exactly_once_in_order(client.data_frames, set(range(1000, 1050)))
    assert not client.resets, "a skipped foreign entry is no gap in the events"
    assert await metric(session, c, 'crm_events_bad_messages_total{reason="bad_entry"}') == 1
    await eventually(lambda: ready(session, c), 10, "/readyz 200 after the repair")

    # The Redis bus's reads skip it and still fill their pages (callers page on a short
    # page meaning the end), reporting it once.
    redis = c.redis()
    bus = RedisBus(redis, redis, c.keys, 1.0)
    seen: list[BadInput] = []
    bus.bad_inputs.sink = seen.append
    try:
        start = client.data_frames[0].cursor.position(p)
        assert start is not None
        after = await bus.read_after(p, start, 10)
        assert [json.loads(e.data)["event"]["Seq"] for e in after] == list(range(1001, 1011))
        assert all(e.partition == p and e.position == e.offset + 1 for e in after)
        before = await bus.read_before(p, after[-1].position, 9)
        assert [json.loads(e.data)["event"]["Seq"] for e in before] == list(range(1009, 1000, -1))
        await bus.read_after(p, start, 10)
    finally:
        await redis.aclose()
    assert [b.reason for b in seen] == ["bad_entry"]
    assert foreign.decode() in seen[0].where and "foo=bar" in seen[0].excerpt
    await client.stop()


async def test_the_script_writes_what_the_contract_says(one_edge: Cluster) -> None:
    c = one_edge
    keys = RedisKeys(c.prefix)
    partitions = await c.partitions()
    redis = c.redis()
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(*(keys.live(p) for p in range(partitions)))
        await c.produce([(b"k", crm_event(2000))])

        async def published() -> tuple[int, bytes] | None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is None:
                return None
            return keys.live_partition(message["channel"]), message["data"]

        partition, payload = await eventually(published, 30, "the published batch")
        (line,) = split_live_payload(payload)
        parsed = parse_live_line(line)
        id_ = entry_id(parsed.offset)
        ((id_b, fields),) = await redis.xrange(keys.stream(partition), id_, id_)
        assert [k.decode() for k in fields] == list(EVENT_FIELDS)
        assert json.loads(fields[b"d"])["event"]["Seq"] == 2000
        assert json.loads(fields[b"d"])["offset"] == parsed.offset
        assert line == encode_live_line(
            position_of(id_b) - 1,
            int(fields[b"pv"]),
            fields[b"t"],
            int(fields[b"ts"]),
            fields[b"m"],
            fields[b"d"],
        )
    finally:
        await pubsub.aclose()
        await redis.aclose()


class _CrashOnce:
    """Our own writer, with one unforeseen failure injected after a batch was applied (a bug
    in the accounting that follows): Kafka and Redis are real."""

    def __init__(self, writer: BatchWriter) -> None:
        self._writer = writer
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        # Everything but the batch step is the real writer's (state reads, meta, samples).
        return getattr(self._writer, name)

    async def apply(self, batches: Sequence[PartitionBatch]) -> BatchResult:
        result = await self._writer.apply(batches)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug nobody foresaw")
        return result


async def test_a_crashed_ingest_worker_is_not_ready_then_restarted(
    backends: Backends, session: aiohttp.ClientSession
) -> None:
    tag = uuid.uuid4().hex[:10]
    settings = IngestSettings(
        redis=RedisSettings(url=backends.redis_url, prefix=f"crm-test-{tag}"),
        node_id="ingest-crash",
        kafka_bootstrap=backends.kafka_bootstrap,
        kafka_topic=f"crm-test-{tag}",
        kafka_group=f"crm-test-group-{tag}",
        backoff_max_s=0.5,
    )
    registry = CollectorRegistry()
    opened = asyncio.Event()
    waiting: list[float] = []

    async def gate(delay: float) -> None:
        waiting.append(delay)
        await opened.wait()

    app = create_ingest_app(settings, registry=registry, tasks=Supervisor(registry, sleep=gate))
    server = TestServer(app)
    await server.start_server()
    redis = Redis.from_url(backends.redis_url)
    try:

        async def readyz() -> tuple[int, dict[str, object]]:
            async with session.get(str(server.make_url("/readyz"))) as resp:
                return resp.status, await resp.json()

        async def is_ready() -> bool:
            return (await readyz())[0] == 200

        await eventually(is_ready, 60, "ingest ready")
        worker = app[WORKER]
        crash = _CrashOnce(worker._writer)
        worker._writer = crash  # type: ignore[assignment]
        producer = AIOKafkaProducer(bootstrap_servers=backends.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for seq in range(20):
                await producer.send_and_wait(settings.kafka_topic, crm_event(seq), key=b"k")
        finally:
            await producer.stop()
        await eventually(lambda: waiting, 30, "the worker to crash and wait to restart")
        status, body = await readyz()
        assert status == 503 and body["failed_tasks"] == ["ingest-worker"]
        opened.set()
        await eventually(is_ready, 60, "ingest ready again after the restart")

        async def stream_seqs() -> list[int]:
            keys = RedisKeys(settings.redis.prefix)
            seqs = []
            for p in range(settings.kafka_partitions):
                rows = await redis.xrange(keys.stream(p))
                seqs += [json.loads(f[b"d"])["event"]["Seq"] for _, f in rows]
            return seqs

        await eventually(
            lambda: _has_all(stream_seqs, 20), 30, "every event in the stream after the restart"
        )
        assert sorted(await stream_seqs()) == list(range(20)), "each event exactly once"
        restarts = registry.get_sample_value(
            "crm_events_task_restarts_total", {"task": "ingest-worker"}
        )
        assert restarts == 1
    finally:
        opened.set()
        await server.close()
        await redis.aclose()


async def _has_all(seqs: Callable[[], Awaitable[list[int]]], n: int) -> bool:
    return len(set(await seqs())) >= n
