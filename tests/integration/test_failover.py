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

The same run on a Redis Cluster (``cluster-*``): a master killed while its replica lags, a
planned ``CLUSTER FAILOVER``, and one partition's slot migrated to another master.

``make test`` runs one seed of each variant with 12,000 events (8 s at the rate below: the
fault strikes 2.4 to 4.8 s in and the producer keeps writing through the failover);
``make failover`` (``CRM_EVENTS_FAILOVER_SEEDS=3``, 20,000 events) runs three seeds of the
primary and master kills and prints the table. Sizes: ``CRM_EVENTS_FAILOVER_EVENTS``,
``CRM_EVENTS_FAILOVER_RATE`` (1,500/s), ``CRM_EVENTS_FAILOVER_SEED`` (the first seed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.contract import partition_slot, partition_tag
from tests.harness.backends import Backends, ClusterGroup, SentinelGroup
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

EVENTS = int(os.environ.get("CRM_EVENTS_FAILOVER_EVENTS", "12000"))
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

        async def fault() -> Fault:
            primary, replica = group.primary_name, group.replica_name
            group.pause(replica)
            # More than the kernel's socket buffers hold goes first, so that what ingest
            # writes from now on waits in the primary's memory and dies with it: the
            # promoted replica really misses acknowledged writes.
            await fill_replication_buffers(group.direct(primary))
            # The fault's shape, not a wait for a condition: the replica falls behind.
            await asyncio.sleep(rng.uniform(0.8, 1.3))
            lag = await replication_lag(group)

            def kill_and_resume() -> None:
                group.kill9(primary)
                group.resume(replica)

            failover = await group.failover(kill_and_resume, 30)
            assert group.node_name(failover.new) == replica
            # The old primary comes back as a replica of the new one, so WAIT succeeds again.
            return Fault(lag, failover.settled_after_s, lambda: group.rejoin(primary))

        with cluster.running():
            try:
                row = await _run_under_load(cluster, session, rng, fault, expect_rollback=True)
            except BaseException:
                dump_logs(cluster, group)
                raise
    row = {"variant": variant, "seed": seed, **row}
    TABLE.append(row)
    print(json.dumps(row))


CLUSTER_PARTITIONS = 12


def cluster_cases() -> list[Any]:
    kills = [
        pytest.param("cluster-kill", FIRST_SEED + n, id=f"cluster-kill-seed{FIRST_SEED + n}")
        for n in range(SEEDS)
    ]
    return [
        *kills,
        pytest.param("cluster-failover", FIRST_SEED, id="cluster-failover"),
        pytest.param("cluster-migrate", FIRST_SEED, id="cluster-migrate"),
    ]


@pytest.mark.parametrize(("variant", "seed"), cluster_cases())
async def test_redis_cluster_changes_under_load_lose_and_repeat_nothing(
    backends: Backends,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    variant: str,
    seed: int,
) -> None:
    """The same run on a Redis Cluster of 3 masters with a replica each, 12 partitions.

    - ``cluster-kill``: a master's replica is paused, the master killed with kill -9 while
      the replica lags, the replica resumed and promoted by the cluster (no Sentinel).
    - ``cluster-failover``: ``CLUSTER FAILOVER`` on a replica (planned: nothing is lost).
    - ``cluster-migrate``: one partition's slot moves to another master, keys and all, as
      ``redis-cli --cluster reshard`` moves it (``CLUSTER SETSLOT`` / ``MIGRATE``)."""
    rng = random.Random(seed)
    print(f"\n{variant} seed {seed} (rerun with CRM_EVENTS_FAILOVER_SEED={seed})")
    with ClusterGroup(tmp_path / "redis") as group:
        cluster = HACluster(
            tmp_path / "cluster",
            with_redis(backends, group.url, "cluster"),
            edges=2,
            env={
                "CRM_EVENTS_KAFKA_PARTITIONS": str(CLUSTER_PARTITIONS),
                "CRM_EVENTS_REDIS_WAIT_REPLICAS": "1",
                "CRM_EVENTS_REDIS_WAIT_TIMEOUT_MS": "200",
            },
        )
        # The master of a partition's slot, chosen by the seed.
        chosen = rng.randrange(CLUSTER_PARTITIONS)
        slot = partition_slot(chosen)
        master = group.name_of(group.slot_owner(slot))

        async def kill() -> Fault:
            replica = group.replica_of(master)
            group.pause(replica)
            await fill_replication_buffers(group.direct(master), partition_tag(chosen))
            await asyncio.sleep(rng.uniform(0.8, 1.3))
            lag = await cluster_replication_lag(group, master)
            t0 = time.monotonic()
            group.kill9(master)
            group.resume(replica)
            await eventually(
                lambda: _owner_is(group, slot, replica), 30, f"{replica} serving the slots"
            )
            await group.wait_settled()
            return Fault(lag, time.monotonic() - t0, lambda: group.rejoin(master))

        async def planned_failover() -> Fault:
            failover = await group.cluster_failover(group.replica_of(master))
            return Fault(0, failover.settled_after_s, None)

        async def migrate() -> Fault:
            others = [a for a in group.masters() if a != group.address(master)]
            t0 = time.monotonic()
            old = await group.migrate_slot(slot, rng.choice(others))
            assert old == group.address(master)
            return Fault(0, time.monotonic() - t0, None)

        fault = {"cluster-kill": kill, "cluster-failover": planned_failover}.get(variant, migrate)
        with cluster.running():
            try:
                row = await _run_under_load(
                    cluster, session, rng, fault, expect_rollback=variant == "cluster-kill"
                )
            except BaseException:
                dump_logs(cluster)
                for name in group.names():
                    print(f"--- {name} ---\n{group.log(name)[-2000:]}")
                raise
    row = {"variant": variant, "seed": seed, **row}
    TABLE.append(row)
    print(json.dumps(row))


def _owner_is(group: ClusterGroup, slot: int, name: str) -> bool:
    try:
        return group.slot_owner(slot) == group.address(name)
    except AssertionError:
        return False  # the slot has no master for a moment


async def cluster_replication_lag(group: ClusterGroup, master: str) -> int:
    """Bytes of the master's replication stream its replicas have not acknowledged."""
    node = group.direct(master)
    try:
        info = await node.info("replication")
    finally:
        await node.aclose()
    offset = int(info["master_repl_offset"])
    acked = [int(v["offset"]) for k, v in info.items() if k.startswith("slave")]
    return offset - min(acked, default=offset)


@dataclass
class Fault:
    """What a fault reports: the replication lag when it struck, how long until Redis served
    again, and how to bring the lost node back (None: nothing to bring back)."""

    lag_bytes: int
    failover_s: float
    rejoin: Callable[[], object] | None


async def _run_under_load(
    cluster: HACluster,
    session: aiohttp.ClientSession,
    rng: random.Random,
    fault: Callable[[], Awaitable[Fault]],
    *,
    expect_rollback: bool,
) -> dict[str, Any]:
    clients = [
        CursorClient(cluster.lb_url("/crm-events"), name=f"client{i}").start(session)
        for i in range(CLIENTS)
    ]
    await eventually(lambda: all(c.connects for c in clients), 30, "every client connected")
    fault_at = int(EVENTS * rng.uniform(0.3, 0.6))
    # Some clients drop right after the fault: they resume while Redis fails over, with
    # cursors ahead of what the promoted replica holds.
    resume_during = rng.sample(range(CLIENTS), 3)

    producer = PacedProducer(cluster, EVENTS, RATE)
    producing = asyncio.create_task(producer.run())
    dropping = asyncio.create_task(Drops(clients, rng, EVENTS).run(producer))
    try:
        await eventually(lambda: producer.sent >= fault_at, 120, f"event {fault_at}")
        struck = await fault()
        for i in resume_during:
            clients[i].drop()
        if struck.rejoin is not None:
            await asyncio.to_thread(struck.rejoin)
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
    if expect_rollback:
        assert rolled > 0, "the promoted replica was expected to miss writes (no bite)"
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
        "lag_at_kill_bytes": struck.lag_bytes,
        "lag_less_filler_bytes": struck.lag_bytes - FILLER_MIB * (1 << 20)
        if struck.lag_bytes
        else 0,
        "failover_s": round(struck.failover_s, 2),
        "rolled_back_refills": int(rolled),
        "refilled_records": int(refilled),
        "client_reconnects": sum(c.connects for c in clients) - len(clients),
        "longest_resume_s": round(max(resume_times), 3) if resume_times else None,
        "resets": sum(len(c.resets) for c in clients),
    }


FILLER_MIB = 24


async def fill_replication_buffers(node: Redis, tag: str = "") -> None:
    """24 MiB of filler on ``node`` (closed after); on a Cluster node, ``tag`` must be the
    hash tag of a slot it serves."""
    try:
        async with node.pipeline(transaction=False) as pipe:
            for i in range(FILLER_MIB):
                pipe.set(f"filler:{tag}:{i}", b"x" * (1 << 20))
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
