"""Redis faults under load, with real Kafka, real Redis processes and nginx: a Sentinel
failover to a replica that misses acknowledged writes, and a Redis wiped with ``FLUSHALL``.

Kafka is the truth and Redis a rebuildable copy of its tail, so either fault must cost the
clients nothing: every client gets every event exactly once, in per-partition order, with no
``reset``, and the streams end holding each event once.

Failover: the replica is paused (SIGSTOP) so that it lags, the primary is killed with kill -9,
and the replica is resumed (SIGCONT) and promoted without the writes the primary had
acknowledged. Ingest finds each partition's Redis state behind what it applied
(``rolled_back``) and refills from Kafka with the same entry ids. Clients that had already seen
the lost events are *ahead* of the new primary, which is not a reset.

``make test`` runs one seed of each variant; ``make failover`` (``CRM_EVENTS_FAILOVER_SEEDS=3``)
runs three seeds of the main variant and prints the table. Sizes:
``CRM_EVENTS_FAILOVER_EVENTS`` (20,000), ``CRM_EVENTS_FAILOVER_RATE`` (1,500/s),
``CRM_EVENTS_FAILOVER_SEED`` (the first seed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.backends import Backends, SentinelGroup
from tests.harness.ha_cluster import (
    CursorClient,
    HACluster,
    PacedProducer,
    assert_streams_hold_each_once,
    replication_lag,
    stream_offsets,
    with_redis,
)
from tests.harness.redis_server import private_redis
from tests.waiting import eventually

EVENTS = int(os.environ.get("CRM_EVENTS_FAILOVER_EVENTS", "20000"))
RATE = float(os.environ.get("CRM_EVENTS_FAILOVER_RATE", "1500"))
SEEDS = int(os.environ.get("CRM_EVENTS_FAILOVER_SEEDS", "1"))
FIRST_SEED = int(os.environ.get("CRM_EVENTS_FAILOVER_SEED", "1201"))
CLIENTS = 10
DROPS_PER_CLIENT = 3
CATCH_UP_S = 90.0

pytestmark = pytest.mark.timeout(300)

TABLE: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    if not TABLE:
        return
    cols = [
        "variant",
        "seed",
        "events",
        "rate_per_s",
        "lag_at_kill_bytes",
        "lag_less_filler_bytes",
        "failover_s",
        "rolled_back_refills",
        "refilled_records",
        "client_reconnects",
        "longest_resume_s",
        "resets",
    ]
    print("\n" + " | ".join(cols))
    for row in TABLE:
        print(" | ".join(str(row.get(c, "")) for c in cols))
    out = os.environ.get("CRM_EVENTS_FAILOVER_REPORT")
    if out:
        Path(out).write_text(json.dumps(TABLE, indent=2) + "\n")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def dump_logs(cluster: HACluster, group: SentinelGroup | None = None) -> None:
    for name in cluster.names:
        print(f"--- {name} ---\n{cluster.log(name)[-4000:]}")
    if group is not None:
        for name in group.names:
            print(f"--- {name} ---\n{group.log(name)[-2000:]}")


class Drops:
    """Each client drops its stream and resumes at ``DROPS_PER_CLIENT`` random points of the
    run (seeded), so resumes land before, during and after the fault."""

    def __init__(self, clients: list[CursorClient], rng: random.Random, total: int) -> None:
        self.plan = sorted(
            (int(total * rng.uniform(0.05, 0.95)), i)
            for i in range(len(clients))
            for _ in range(DROPS_PER_CLIENT)
        )
        self.clients = clients

    async def run(self, producer: PacedProducer) -> None:
        for at, i in self.plan:
            await eventually(lambda at=at: producer.sent >= at or producer.done, 120, f"event {at}")
            self.clients[i].drop()


def cases() -> list[Any]:
    main = [
        pytest.param("wait", FIRST_SEED + n, id=f"wait-seed{FIRST_SEED + n}") for n in range(SEEDS)
    ]
    return [*main, pytest.param("no-wait", FIRST_SEED, id=f"no-wait-seed{FIRST_SEED}")]


@pytest.mark.parametrize(("variant", "seed"), cases())
async def test_failover_under_load_loses_and_repeats_nothing(
    backends: Backends,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    variant: str,
    seed: int,
) -> None:
    rng = random.Random(seed)
    print(f"\nfailover {variant} seed {seed} (rerun with CRM_EVENTS_FAILOVER_SEED={seed})")
    with SentinelGroup(tmp_path / "redis") as group:
        cluster = HACluster(
            tmp_path / "cluster",
            with_redis(backends, group.url, "sentinel"),
            edges=2,
            env={
                "CRM_EVENTS_REDIS_WAIT_REPLICAS": "1" if variant == "wait" else "0",
                "CRM_EVENTS_REDIS_WAIT_TIMEOUT_MS": "200",
            },
        )
        with cluster.running():
            try:
                row = await _failover_run(cluster, group, session, rng)
            except BaseException:
                dump_logs(cluster, group)
                raise
    row = {"variant": variant, "seed": seed, **row}
    TABLE.append(row)
    print(json.dumps(row))


async def _failover_run(
    cluster: HACluster,
    group: SentinelGroup,
    session: aiohttp.ClientSession,
    rng: random.Random,
) -> dict[str, Any]:
    clients = [
        CursorClient(cluster.lb_url("/crm-events"), name=f"client{i}").start(session)
        for i in range(CLIENTS)
    ]
    await eventually(lambda: all(c.connects for c in clients), 30, "every client connected")
    pause_at = int(EVENTS * rng.uniform(0.3, 0.6))
    pause_s = rng.uniform(0.8, 1.3)
    # Some clients drop right after the kill: they resume while Redis fails over, with
    # cursors ahead of what the promoted replica holds.
    resume_during = rng.sample(range(CLIENTS), 3)

    producer = PacedProducer(cluster, EVENTS, RATE)
    producing = asyncio.create_task(producer.run())
    dropping = asyncio.create_task(Drops(clients, rng, EVENTS).run(producer))
    try:
        await eventually(lambda: producer.sent >= pause_at, 120, f"event {pause_at}")
        primary, replica = group.primary_name, group.replica_name
        group.pause(replica)
        # More than the kernel's socket buffers hold goes first, so that what ingest writes
        # from now on waits in the primary's memory and dies with it: the promoted replica
        # really misses acknowledged writes.
        await fill_replication_buffers(group, primary)
        # The fault's shape, not a wait for a condition: the replica falls behind this long.
        await asyncio.sleep(pause_s)
        lag = await replication_lag(group)

        def kill_and_resume() -> None:
            group.kill9(primary)
            group.resume(replica)

        failover = await group.failover(kill_and_resume, 30)
        assert group.node_name(failover.new) == replica
        for i in resume_during:
            clients[i].drop()
        # The old primary comes back as a replica of the new one, so WAIT succeeds again.
        await asyncio.to_thread(group.rejoin, primary)
        await producing
        await dropping
    finally:
        if not producing.done():
            producing.cancel()
        if not dropping.done():
            dropping.cancel()

    ends = producer.end_positions()
    try:
        await eventually(
            lambda: all(c.reached(ends) for c in clients), CATCH_UP_S, "every client at the end"
        )
    except AssertionError:
        for c in clients:
            print(c.name, c.positions, "resets", c.resets[:1])
        raise
    redis = cluster.redis()
    try:
        got = await eventually(
            lambda: _streams_complete(redis, cluster, producer), 60, "the streams complete"
        )
    finally:
        await redis.aclose()
    rolled = await cluster.ingest_metric("crm_events_refills_total", reason="rolled_back")
    assert rolled > 0, "the promoted replica was expected to miss writes (the fault did not bite)"
    assert_streams_hold_each_once(got, producer.expected, {})
    for c in clients:
        c.check_exact(producer.expected)
    refilled = await cluster.ingest_metric("crm_events_refilled_records_total")
    resume_times = [t for c in clients for t in c.resume_times_s]
    for c in clients:
        await c.stop()
    return {
        "events": EVENTS,
        "rate_per_s": round(producer.achieved_rate),
        "lag_at_kill_bytes": lag,
        "lag_less_filler_bytes": lag - FILLER_MIB * (1 << 20),
        "failover_s": round(failover.settled_after_s, 2),
        "rolled_back_refills": int(rolled),
        "refilled_records": int(refilled),
        "client_reconnects": sum(c.connects for c in clients) - len(clients),
        "longest_resume_s": round(max(resume_times), 3) if resume_times else None,
        "resets": sum(len(c.resets) for c in clients),
    }


FILLER_MIB = 24


async def fill_replication_buffers(group: SentinelGroup, primary: str) -> None:
    node = group.direct(primary)
    try:
        async with node.pipeline(transaction=False) as pipe:
            for i in range(FILLER_MIB):
                pipe.set(f"filler:{i}", b"x" * (1 << 20))
            await pipe.execute()
    finally:
        await node.aclose()


async def _streams_at_end(
    redis: Any, cluster: HACluster, producer: PacedProducer
) -> dict[int, list[int]] | None:
    """The streams once each holds the partition's last event (a refilled one starts later)."""
    got = await stream_offsets(redis, cluster.keys, len(producer.expected))
    done = all(got[p] and got[p][-1] == want[-1] for p, want in producer.expected.items())
    return got if done else None


async def _streams_complete(
    redis: Any, cluster: HACluster, producer: PacedProducer
) -> dict[int, list[int]] | None:
    got = await stream_offsets(redis, cluster.keys, len(producer.expected))
    complete = all(set(want) <= set(got[p]) for p, want in producer.expected.items())
    return got if complete else None


# -- Redis wiped -------------------------------------------------------------------------------

WIPE_EVENTS = int(os.environ.get("CRM_EVENTS_WIPE_EVENTS", "9000"))
WIPE_MAXLEN = 2000


async def test_a_wiped_redis_is_refilled_and_old_cursors_resume_exactly(
    backends: Backends, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """FLUSHALL mid-stream on a Redis of the test's own. Some clients are away over the wipe
    and come back with their old cursors; the others stay (and drop and resume now and then,
    also while the refill runs). Nobody gets a reset or misses or repeats an event."""
    sup, spec = private_redis(tmp_path / "redis", appendonly=False)
    (tmp_path / "redis").mkdir(parents=True, exist_ok=True)
    sup.start(spec)
    try:
        cluster = HACluster(
            tmp_path / "cluster",
            with_redis(backends, f"redis://127.0.0.1:{spec.port}/0", "private"),
            edges=2,
            env={
                "CRM_EVENTS_STREAM_MAXLEN": str(WIPE_MAXLEN),
                # A small replay ring: the old cursors are answered from the refilled stream.
                "CRM_EVENTS_REPLAY_RING_BYTES": "40000",
            },
        )
        with cluster.running():
            try:
                row = await _wipe_run(cluster, session, random.Random(FIRST_SEED))
            except BaseException:
                dump_logs(cluster)
                raise
    finally:
        sup.stop(spec.name)
    TABLE.append({"variant": "flushall", "seed": FIRST_SEED, **row})
    print(json.dumps(row))


async def _wipe_run(
    cluster: HACluster, session: aiohttp.ClientSession, rng: random.Random
) -> dict[str, Any]:
    clients = [
        CursorClient(cluster.lb_url("/crm-events"), name=f"client{i}").start(session)
        for i in range(CLIENTS)
    ]
    await eventually(lambda: all(c.connects for c in clients), 30, "every client connected")
    away, staying = clients[: CLIENTS // 2], clients[CLIENTS // 2 :]
    producer = PacedProducer(cluster, WIPE_EVENTS, RATE)
    producing = asyncio.create_task(producer.run())
    dropping = asyncio.create_task(Drops(staying, rng, WIPE_EVENTS).run(producer))
    redis = cluster.redis()
    try:
        await eventually(lambda: producer.sent >= WIPE_EVENTS * 0.4, 60, "40% of the events")
        for c in away:
            c.go_away()
        await eventually(lambda: not any(c.connected for c in away), 10, "the clients away")
        old = {c.name: dict(c.positions) for c in away}
        await eventually(lambda: producer.sent >= WIPE_EVENTS * 0.7, 60, "70% of the events")
        assert await redis.flushall()
        wiped_at = producer.sent
        await eventually(lambda: producer.sent >= WIPE_EVENTS * 0.85, 60, "85% of the events")
        for c in away:
            c.come_back()
        await producing
        await dropping
        ends = producer.end_positions()
        await eventually(
            lambda: all(c.reached(ends) for c in clients), CATCH_UP_S, "every client at the end"
        )
        got = await eventually(
            lambda: _streams_at_end(redis, cluster, producer), 60, "the streams refilled"
        )
        bases = {}
        for p in got:
            state = await redis.hgetall(cluster.keys.state(p))
            bases[p] = int(state[b"base"])
    finally:
        await redis.aclose()
        for task in (producing, dropping):
            if not task.done():
                task.cancel()
    lost = await cluster.ingest_metric("crm_events_refills_total", reason="lost")
    assert lost >= len(got), "every partition was refilled after the wipe"
    for p, offsets in got.items():
        # The refill's window: the last STREAM_MAXLEN records before the committed offset.
        assert offsets and offsets[0] >= bases[p], (p, bases[p], offsets[:1])
    assert_streams_hold_each_once(got, producer.expected, {p: o[0] for p, o in got.items()})
    # The away clients' old cursors are inside the refilled window: exact resume is possible.
    for name, positions in old.items():
        for p, position in positions.items():
            assert position >= bases[p], f"{name}: partition {p} cursor before the window"
    for c in clients:
        c.check_exact(producer.expected)
    resume_times = [t for c in clients for t in c.resume_times_s]
    for c in clients:
        await c.stop()
    return {
        "events": WIPE_EVENTS,
        "rate_per_s": round(producer.achieved_rate),
        "wiped_at_event": wiped_at,
        "refill_bases": bases,
        "lost_refills": int(lost),
        "refilled_records": int(await cluster.ingest_metric("crm_events_refilled_records_total")),
        "client_reconnects": sum(c.connects for c in clients) - len(clients),
        "longest_resume_s": round(max(resume_times), 3) if resume_times else None,
        "resets": sum(len(c.resets) for c in clients),
    }
