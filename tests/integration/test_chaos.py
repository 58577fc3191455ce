"""Chaos: sequenced events flow at >= 1,000/s while processes are killed, connections are
dropped and Kafka restarts; browser-like clients reconnect through the load balancer. In
Sentinel mode (a private primary, replica and three Sentinels, ingest with ``WAIT 1``) the
Redis primary is also killed with kill -9 and the old primary rejoins as a replica. In cluster
mode (a private Redis Cluster of 3 masters with a replica each, 12 partitions, two ingest
processes in the consumer group) a master is killed with kill -9 and rejoins as a replica,
each ingest process is killed once (rebalances), and the edges' connections to every node
are killed.

Every client must get every event exactly once, in per-partition order, with no ``reset``, and
each partition's stream must end holding each event once.

The randomness is seeded (``CRM_EVENTS_CHAOS_SEED``, printed either way). ``make test`` runs
a short variant of each mode; ``make chaos`` runs the full one (20,000 events) alone. Size and
shape come from ``CRM_EVENTS_CHAOS_EVENTS``, ``CRM_EVENTS_CHAOS_RATE`` and
``CRM_EVENTS_CHAOS_CLIENTS``; ``CRM_EVENTS_CHAOS_MODES`` picks the modes
(``single,sentinel,cluster``),
and ``CRM_EVENTS_CHAOS_KAFKA_RESTART=0`` leaves out the broker restart (a Kafka others use).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.backends import Backends, ClusterGroup, SentinelGroup
from tests.harness.clients import StalledClient
from tests.harness.ha_cluster import (
    CursorClient,
    HACluster,
    PacedProducer,
    assert_streams_hold_each_once,
    stream_offsets,
    with_redis,
)
from tests.harness.kafka_control import KafkaControl, kafka_control
from tests.waiting import eventually

EVENTS = int(os.environ.get("CRM_EVENTS_CHAOS_EVENTS", "3000"))
RATE = float(os.environ.get("CRM_EVENTS_CHAOS_RATE", "1200"))
CLIENTS = int(os.environ.get("CRM_EVENTS_CHAOS_CLIENTS", "20"))
MODES = os.environ.get("CRM_EVENTS_CHAOS_MODES", "single,sentinel,cluster").split(",")
CLUSTER_PARTITIONS = 12
INVALID_EVERY = 997

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s


RedisGroup = SentinelGroup | ClusterGroup


@contextlib.contextmanager
def redis_for(mode: str, run: Path) -> Iterator[RedisGroup | None]:
    if mode == "sentinel":
        with SentinelGroup(run / "redis") as group:
            yield group
    elif mode == "cluster":
        with ClusterGroup(run / "redis") as cluster_group:
            yield cluster_group
    else:
        yield None


@pytest.mark.parametrize("mode", MODES)
async def test_chaos(
    backends: Backends,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
    mode: str,
) -> None:
    seed = int(os.environ.get("CRM_EVENTS_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nchaos {mode} seed: {seed} (rerun with CRM_EVENTS_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    kafka: KafkaControl | None = kafka_control(backends)
    run = Path(tmp_path_factory.mktemp(f"chaos-{mode}"))
    with redis_for(mode, run) as group:
        used = backends if group is None else with_redis(backends, group.url, mode)
        env = {} if group is None else {"CRM_EVENTS_REDIS_WAIT_REPLICAS": "1"}
        ingests = 1
        if mode == "cluster":
            # Several ingest processes share the group, so ingest kills are rebalances too.
            env["CRM_EVENTS_KAFKA_PARTITIONS"] = str(CLUSTER_PARTITIONS)
            ingests = 2
        cluster = HACluster(run / "cluster", used, edges=2, ingests=ingests, env=env)
        with cluster.running():
            try:
                report = await _run(cluster, session, rng, kafka, group)
            except BaseException:
                for name in cluster.names:
                    print(f"--- {name} ---\n{cluster.log(name)[-4000:]}")
                raise
    report["seed"] = seed
    report["mode"] = mode
    text = json.dumps(report, indent=2)
    print(text)
    out = os.environ.get("CRM_EVENTS_CHAOS_REPORT")
    if out:
        path = Path(out)
        path.with_name(f"{path.stem}-{mode}{path.suffix}").write_text(text + "\n")


async def _run(
    cluster: HACluster,
    session: aiohttp.ClientSession,
    rng: random.Random,
    kafka: KafkaControl | None,
    group: RedisGroup | None,
) -> dict[str, Any]:
    clients = [
        CursorClient(cluster.lb_url("/crm-events"), name=f"client{i}").start(session)
        for i in range(CLIENTS)
    ]
    await eventually(lambda: all(c.connects for c in clients), 20, "every client connected")
    slow = StalledClient("127.0.0.1", cluster.lb_port)

    faults = ["ingest_kill9", "edge_kill9", "edge1_redis_drop", "edge2_redis_drop"]
    if kafka is not None and os.environ.get("CRM_EVENTS_CHAOS_KAFKA_RESTART", "1") != "0":
        faults.append("kafka_restart")
    if isinstance(group, SentinelGroup):
        faults.append("redis_primary_kill9")
    if isinstance(group, ClusterGroup):
        faults.append("redis_master_kill9")
        if cluster.ingests > 1:
            faults.append("ingest2_kill9")
    rng.shuffle(faults)
    # Spread the faults over the run, each at a random point of its own slice.
    slice_len = EVENTS / (len(faults) + 1)
    triggers = [int(slice_len * (i + 0.3 + 0.6 * rng.random())) for i in range(len(faults))]

    producer = PacedProducer(cluster, EVENTS, RATE, invalid_every=INVALID_EVERY)
    producing = asyncio.create_task(producer.run())
    log: list[dict[str, Any]] = []

    async def inject(fault: str) -> None:
        entry: dict[str, Any] = {"fault": fault, "at_event": producer.sent}
        began = time.monotonic()
        entry["detail"] = await _inject(fault, cluster, producer, kafka, group, rng)
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
    await asyncio.gather(*injecting)

    partitions = await cluster.partitions()
    redis = cluster.redis()
    try:

        async def streams_complete() -> dict[int, list[int]] | None:
            got = await stream_offsets(redis, cluster.keys, partitions)
            done = all(set(want) <= set(got[p]) for p, want in producer.expected.items())
            return got if done else None

        got = await eventually(streams_complete, 120, "every event in the streams")
        dead = [r for p in range(partitions) for r in await redis.xrange(cluster.keys.dead(p))]
    finally:
        await redis.aclose()
    assert_streams_hold_each_once(got, producer.expected, {})
    assert len(dead) == producer.invalid, "only the injected invalid records are dead letters"
    assert {f[b"reason"] for _, f in dead} <= {b"not_json"}

    ends = producer.end_positions()
    await eventually(
        lambda: all(c.reached(ends) for c in clients),
        120,
        "every client caught up to the end of the streams",
    )
    for c in clients:
        c.check_exact(producer.expected)
    slow.close()
    for c in clients:
        await c.stop()
    resume_times = [t for c in clients for t in c.resume_times_s]
    return {
        "events": EVENTS,
        "invalid_records": producer.invalid,
        "rate_target_per_s": RATE,
        # Paused while the broker restarts: that time is the fault's, not the rate's.
        "rate_achieved_per_s": round(producer.achieved_rate, 1),
        "clients": CLIENTS,
        "faults": log,
        "reconnects": sum(c.connects for c in clients) - len(clients),
        "failed_attempts": sum(c.failures for c in clients),
        "resets": sum(len(c.resets) for c in clients),
        "events_delivered": sum(len(c.deliveries) for c in clients),
        "refilled_records": int(
            sum(
                [
                    await cluster.ingest_metric("crm_events_refilled_records_total", i)
                    for i in range(1, cluster.ingests + 1)
                ]
            )
        ),
        "longest_resume_s": round(max(resume_times), 3) if resume_times else None,
        "kafka_restart": "kafka_restart" in faults,
    }


async def _inject(
    fault: str,
    cluster: HACluster,
    producer: PacedProducer,
    kafka: KafkaControl | None,
    group: RedisGroup | None,
    rng: random.Random,
) -> str:
    if fault in ("ingest_kill9", "ingest2_kill9"):
        name = "ingest2" if fault == "ingest2_kill9" else "ingest1"
        await asyncio.to_thread(cluster.kill9, name)
        await asyncio.to_thread(cluster.start, name)
        return f"{name} killed -9 and restarted"
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
    if fault == "redis_master_kill9":
        assert isinstance(group, ClusterGroup)
        master = group.name_of(rng.choice(group.masters()))
        taken = await group.failover_by_kill(master, 30)
        await asyncio.to_thread(group.rejoin, master)
        return (
            f"Redis Cluster master {master} killed -9; {group.name_of(taken.new)} serves its "
            f"slots after {taken.settled_after_s:.2f} s; {master} rejoined as a replica"
        )
    if fault == "redis_primary_kill9":
        assert isinstance(group, SentinelGroup)
        old = group.primary_name
        failover = await group.failover(lambda: group.kill9(old), 30)
        await asyncio.to_thread(group.rejoin, old)
        return (
            f"Redis primary {old} killed -9; {group.node_name(failover.new)} promoted after "
            f"{failover.settled_after_s:.2f} s; {old} rejoined as its replica"
        )
    raise AssertionError(fault)
