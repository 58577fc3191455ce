"""Malformed input in the real Redis never stops an edge (issue 11, item 1), and what ingest's
script writes is what the contract (shared/contract.py) says."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

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
from ingest.writer import ApplyResult, BatchWriter
from shared.contract import EVENT_FIELDS, RedisKeys, encode_live_line, parse_live_line
from shared.ids import parse_id
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


async def test_a_four_field_live_line_does_not_stop_the_feed(
    one_edge: Cluster, session: aiohttp.ClientSession
) -> None:
    c = one_edge
    client = Collector(c.edge_url(1, "/crm-events")).start(session)
    await client.wait_for(lambda col: col.node is not None, 10, "stream open")
    redis = c.redis()
    try:
        # The line ARCHITECTURE.md used to document (no match field), and plain garbage.
        four = b'1700000000000-0 ContactCreated 1700000000000 {"type":"ContactCreated"}'
        assert await redis.publish(f"{c.prefix}:live", four) == 1
        assert await redis.publish(f"{c.prefix}:live", b"\xff\x00 garbage") == 1
    finally:
        await redis.aclose()
    await c.produce((b"k", crm_event(s)) for s in range(100))
    await client.wait_for(lambda col: len(col.data_frames) >= 100, 30, "the 100 good events")
    assert_exactly_once_in_order(client.data_frames, set(range(100)))
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
    await c.produce((b"k", crm_event(s)) for s in range(1000, 1010))
    await client.wait_for(lambda col: len(col.data_frames) >= 10, 30, "events before the kill")
    redis = c.redis()
    try:
        await redis.xadd(c.stream_key, {"foo": "bar"})
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 1
    finally:
        await redis.aclose()
    await c.produce((b"k", crm_event(s)) for s in range(1010, 1050))
    await client.wait_for(lambda col: len(col.data_frames) >= 50, 30, "events after the kill")
    assert_exactly_once_in_order(client.data_frames, set(range(1000, 1050)))
    assert await metric(session, c, 'crm_events_bad_messages_total{reason="bad_entry"}') == 1
    await eventually(lambda: ready(session, c), 10, "/readyz 200 after the repair")

    # The Redis bus's reads skip it and still fill their pages (callers page on a short
    # page meaning the end), reporting it once.
    redis = c.redis()
    bus = RedisBus(redis, redis, RedisKeys(c.prefix), 1.0)
    seen: list[BadInput] = []
    bus.bad_inputs.sink = seen.append
    try:
        start = parse_id(client.data_frames[0].id or "")
        after = await bus.read_after(start, 10)
        assert [json.loads(e.data)["event"]["Seq"] for e in after] == list(range(1001, 1011))
        before = await bus.read_before(after[-1].id, 9)
        assert [json.loads(e.data)["event"]["Seq"] for e in before] == list(range(1009, 1000, -1))
        await bus.read_after(start, 10)
    finally:
        await redis.aclose()
    assert [b.reason for b in seen] == ["bad_entry"]
    assert "'t' is missing" in seen[0].detail and "foo=bar" in seen[0].excerpt
    await client.stop()


async def test_the_script_writes_what_the_contract_says(one_edge: Cluster) -> None:
    c = one_edge
    redis = c.redis()
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(f"{c.prefix}:live")
        await c.produce([(b"k", crm_event(2000))])

        async def published() -> bytes | None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            return message["data"] if message else None

        payload = await eventually(published, 30, "the published batch")
        (line,) = payload.split(b"\n")
        parsed = parse_live_line(line)
        ((id_b, fields),) = await redis.xrange(c.stream_key, parsed.id, parsed.id)
        assert [k.decode() for k in fields] == list(EVENT_FIELDS)
        assert json.loads(fields[b"d"])["event"]["Seq"] == 2000
        assert line == encode_live_line(
            id_b, fields[b"t"], int(fields[b"ts"]), fields[b"m"], fields[b"d"]
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

    async def apply_packed(self, blob: bytes, count: int) -> ApplyResult:
        result = await self._writer.apply_packed(blob, count)
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
            rows = await redis.xrange(f"{settings.redis.prefix}:stream")
            return [json.loads(f[b"d"])["event"]["Seq"] for _, f in rows]

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
