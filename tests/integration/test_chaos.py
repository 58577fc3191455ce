"""Chaos: sequenced events flow at >= 1,000/s while processes are killed, connections are
dropped and Kafka restarts; browsers-like clients reconnect through the load balancer.

The randomness is seeded (``CRM_EVENTS_CHAOS_SEED``, printed either way). ``make test`` runs
a short variant; ``make chaos`` runs the full one (20,000 events) alone. Size and shape come
from ``CRM_EVENTS_CHAOS_EVENTS``, ``CRM_EVENTS_CHAOS_RATE`` and ``CRM_EVENTS_CHAOS_CLIENTS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from tests.harness.backends import Backends
from tests.harness.clients import ResumingClient, StalledClient
from tests.harness.cluster import Cluster, crm_event
from tests.harness.kafka_control import KafkaControl, kafka_control
from tests.waiting import eventually

EVENTS = int(os.environ.get("CRM_EVENTS_CHAOS_EVENTS", "3000"))
RATE = float(os.environ.get("CRM_EVENTS_CHAOS_RATE", "1200"))
CLIENTS = int(os.environ.get("CRM_EVENTS_CHAOS_CLIENTS", "20"))
INVALID_EVERY = 997

pytestmark = pytest.mark.timeout(900)


class Producer:
    """Paced producer of sequenced events (and a few invalid records), pausable for a broker
    restart."""

    def __init__(self, cluster: Cluster, total: int, rate: float) -> None:
        self.cluster = cluster
        self.total = total
        self.rate = rate
        self.sent = 0
        self.invalid = 0
        self.running = asyncio.Event()
        self.running.set()
        self.idle = asyncio.Event()
        self.paused_s = 0.0
        self.done = False
        self._producer: AIOKafkaProducer | None = None

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.cluster.backends.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        await producer.start()
        self._producer = producer
        try:
            started = time.monotonic()
            tick = 50
            while self.sent < self.total:
                if not self.running.is_set():
                    paused_at = time.monotonic()
                    await producer.flush()
                    self.idle.set()
                    await self.running.wait()
                    self.idle.clear()
                    self.paused_s += time.monotonic() - paused_at
                    started = time.monotonic() - self.sent / self.rate
                batch = range(self.sent, min(self.sent + tick, self.total))
                for seq in batch:
                    await producer.send(
                        self.cluster.topic, crm_event(seq), key=f"agg-{seq % 30}".encode()
                    )
                    if seq % INVALID_EVERY == INVALID_EVERY - 1:
                        await producer.send(self.cluster.topic, b"not json at all", key=b"bad")
                        self.invalid += 1
                self.sent = batch.stop
                # Pace to the target rate: the schedule, not a guess about readiness.
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            self.done = True
            self.idle.set()
            await producer.stop()

    async def pause(self) -> None:
        self.running.clear()
        await asyncio.wait_for(self.idle.wait(), 60)

    def resume(self) -> None:
        self.running.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s


async def test_chaos(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, session: aiohttp.ClientSession
) -> None:
    seed = int(os.environ.get("CRM_EVENTS_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nchaos seed: {seed} (rerun with CRM_EVENTS_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    kafka: KafkaControl | None = kafka_control(backends)

    cluster = Cluster(Path(tmp_path_factory.mktemp("chaos")), backends, edges=2)
    with cluster.running():
        report = await _run(cluster, session, rng, kafka)
    report["seed"] = seed
    text = json.dumps(report, indent=2)
    print(text)
    out = os.environ.get("CRM_EVENTS_CHAOS_REPORT")
    if out:
        Path(out).write_text(text + "\n")


async def _run(
    cluster: Cluster, session: aiohttp.ClientSession, rng: random.Random, kafka: KafkaControl | None
) -> dict[str, Any]:
    clients = [
        ResumingClient(cluster.lb_url("/crm-events"), name=f"client{i}").start(session)
        for i in range(CLIENTS)
    ]
    await eventually(lambda: all(c.connects for c in clients), 20, "every client connected")
    slow = StalledClient("127.0.0.1", cluster.lb_port)

    faults = ["ingest_kill9", "edge_kill9", "edge1_redis_drop", "edge2_redis_drop"]
    if kafka is not None:
        faults.append("kafka_restart")
    rng.shuffle(faults)
    # Spread the faults over the run, each at a random point of its own slice.
    slice_len = EVENTS / (len(faults) + 1)
    triggers = [int(slice_len * (i + 0.3 + 0.6 * rng.random())) for i in range(len(faults))]

    producer = Producer(cluster, EVENTS, RATE)
    t0 = time.monotonic()
    producing = asyncio.create_task(producer.run())
    log: list[dict[str, Any]] = []

    async def inject(fault: str) -> None:
        entry: dict[str, Any] = {"fault": fault, "at_event": producer.sent}
        began = time.monotonic()
        entry["detail"] = await _inject(fault, cluster, producer, kafka, rng)
        entry["seconds"] = round(time.monotonic() - began, 2)
        print(f"fault: {entry}", flush=True)
        log.append(entry)

    # Each fault starts at its point of the run and heals (restart) in the background, so
    # slow recoveries (a consumer group rejoin, a broker restart) overlap the load and the
    # next faults instead of postponing them.
    injecting: list[asyncio.Task[None]] = []
    for fault, at in zip(faults, triggers, strict=True):
        await eventually(
            lambda at=at: producer.sent >= at or producing.done(),
            120,
            f"the producer to reach {at}",
        )
        injecting.append(asyncio.create_task(inject(fault)))
    await producing
    produce_s = time.monotonic() - t0
    await asyncio.gather(*injecting)

    expected = set(range(EVENTS))
    redis = cluster.redis()
    try:

        async def stream_complete() -> list[str] | None:
            rows = await redis.xrange(cluster.stream_key)
            seqs = [json.loads(f[b"d"])["event"]["Seq"] for _, f in rows]
            return [r[0].decode() for r in rows] if expected <= set(seqs) else None

        ids = await eventually(stream_complete, 120, "every event in the stream")
        rows = await redis.xrange(cluster.stream_key)
        seqs = [json.loads(f[b"d"])["event"]["Seq"] for _, f in rows]
        dead = await redis.xrange(cluster.dead_key)
    finally:
        await redis.aclose()
    assert ids is not None
    assert len(seqs) == len(set(seqs)) == EVENTS, "the stream holds each event once"
    assert len(dead) == producer.invalid, "only the injected invalid records are dead letters"
    assert {f[b"reason"] for _, f in dead} <= {b"not_json"}

    last = ids[-1]
    await eventually(
        lambda: all(c.last_id == last for c in clients),
        120,
        "every client caught up to the end of the stream",
    )
    summaries = [c.check(expected) for c in clients]
    slow.close()
    for c in clients:
        await c.stop()
    resume_times = [t for c in clients for t in c.resume_times_s]
    return {
        "events": EVENTS,
        "invalid_records": producer.invalid,
        "rate_target_per_s": RATE,
        # Paused while the broker restarts: that time is the fault's, not the rate's.
        "rate_achieved_per_s": round(EVENTS / (produce_s - producer.paused_s), 1),
        "clients": CLIENTS,
        "faults": log,
        "reconnects": sum(c.connects for c in clients) - len(clients),
        "failed_attempts": sum(c.failures for c in clients),
        "resets": sum(s["resets"] for s in summaries),
        "events_delivered": sum(s["events"] for s in summaries),
        "longest_resume_s": round(max(resume_times), 3) if resume_times else None,
        "kafka_restart": kafka is not None,
    }


async def _inject(
    fault: str,
    cluster: Cluster,
    producer: Producer,
    kafka: KafkaControl | None,
    rng: random.Random,
) -> str:
    if fault == "ingest_kill9":
        await asyncio.to_thread(cluster.kill9, "ingest1")
        await asyncio.to_thread(cluster.start, "ingest1")
        return "ingest1 killed -9 and restarted"
    if fault == "edge_kill9":
        edge = rng.choice(["edge1", "edge2"])
        await asyncio.to_thread(cluster.kill9, edge)
        await asyncio.to_thread(cluster.start, edge)
        return f"{edge} killed -9 and restarted"
    if fault.endswith("_redis_drop"):
        node = "edge-" + fault.removeprefix("edge")[0]
        # If that edge is restarting from another fault, wait until it has connections.
        killed = await eventually(
            lambda: cluster.drop_redis_connections(node), 60, f"Redis connections of {node}"
        )
        return f"{killed} Redis connections of {node} killed"
    if fault == "kafka_restart":
        assert kafka is not None
        if producer.done:
            await asyncio.to_thread(kafka.restart)
            return "Kafka stopped and started after the last event was sent"
        await producer.pause()
        await asyncio.to_thread(kafka.restart)
        producer.resume()
        return "Kafka stopped and started"
    raise AssertionError(fault)
