"""The pipeline on a Redis Cluster: 3 masters with a replica each (``ClusterGroup``, real
``redis-server --cluster-enabled yes`` processes), a 12-partition topic, ingest and two edges
given a ``redis+cluster://`` URL.

What is checked here is what only a Cluster has: partitions spread over the masters by the
cluster's own slot map, events published with ``SPUBLISH`` on sharded channels, one pub/sub
connection per master and edge (never one per partition), and reads and writes routed to the
slot's master. Delivery, resume and history through the load balancer run in cluster mode in
the shared suites too (``test_pipeline.py``, parametrised over the Redis mode).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from ingest.records import Prepared, RawRecord, group, pack, prepare
from ingest.writer import BatchWriter, PartitionBatch
from shared.contract import RedisKeys, partition_slot
from shared.redis_nodes import ClusterNodes
from shared.settings import RedisSettings
from tests.harness.backends import Backends, ClusterGroup
from tests.harness.cluster import Cluster, crm_event
from tests.sse_client import Collector, assert_per_partition_exactly_once
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(300)

PARTITIONS = 12


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    with ClusterGroup(Path(tmp_path_factory.mktemp("redis-cluster"))) as group:
        yield group


@pytest.fixture(scope="module")
def deployment(
    backends: Backends, redis_cluster: ClusterGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    on_cluster = Backends(backends.kafka_bootstrap, redis_cluster.url, backends.origin)
    with Cluster(
        Path(tmp_path_factory.mktemp("cluster-mode")),
        on_cluster,
        env={"CRM_EVENTS_KAFKA_PARTITIONS": str(PARTITIONS)},
    ).running() as c:
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def test_the_partitions_spread_evenly_over_the_masters_by_the_slot_map(
    redis_cluster: ClusterGroup,
) -> None:
    owners = Counter(redis_cluster.slot_owner(partition_slot(p)) for p in range(PARTITIONS))
    assert len(redis_cluster.masters()) == 3
    assert sorted(owners.values()) == [4, 4, 4], owners


async def test_events_reach_clients_exactly_once_through_sharded_channels(
    deployment: Cluster, redis_cluster: ClusterGroup, session: aiohttp.ClientSession
) -> None:
    clients = [
        Collector(deployment.lb_url("/crm-events")).start(session),
        Collector(deployment.edge_url(1, "/crm-events")).start(session),
        Collector(deployment.edge_url(2, "/crm-events")).start(session),
    ]
    for c in clients:
        await c.wait_for(lambda c: c.node is not None, 20, "the stream to open")
    base = 1_000
    metadata = await deployment.produce(
        (f"agg-{i % 97}".encode(), crm_event(base + i, key=f"agg-{i % 97}")) for i in range(1200)
    )
    expected: dict[int, list[int]] = {}
    for m in metadata:
        expected.setdefault(m.partition, []).append(m.offset)
    assert len(expected) == PARTITIONS, "the keys must use every partition"
    for c in clients:
        await c.wait_for(lambda c: len(c.data_frames) >= 1200, 60, "1200 events")
    for c in clients:
        assert_per_partition_exactly_once(
            ((f.json()["partition"], f.json()["offset"]) for f in c.data_frames), expected
        )
        assert {f.json()["event"]["Seq"] for f in c.data_frames} == set(range(base, base + 1200))
        assert not c.resets
        await c.stop()
    # Every event is in its partition's stream once, each stream on its slot's master.
    stored = await deployment.stored_events()
    assert sorted(e["event"]["Seq"] for e in stored) == list(range(base, base + 1200))
    for p in range(PARTITIONS):
        owner = redis_cluster.slot_owner(partition_slot(p))
        direct = Redis(host=owner[0], port=owner[1])
        try:
            assert await direct.xlen(deployment.keys.stream(p)) > 0
            # Sharded channels: each edge subscribes on the slot's master.
            numsub = await direct.execute_command(  # type: ignore[no-untyped-call]
                "PUBSUB", "SHARDNUMSUB", deployment.keys.live(p)
            )
            assert numsub[1] == deployment.edges, (p, numsub)
            # Classic channels are unused.
            assert (await direct.pubsub_numsub(deployment.keys.live(p)))[0][1] == 0
        finally:
            await direct.aclose()


async def test_each_edge_holds_one_subscription_connection_per_master(
    deployment: Cluster, redis_cluster: ClusterGroup
) -> None:
    async def subscriptions() -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for address in redis_cluster.masters():
            direct = Redis(host=address[0], port=address[1])
            try:
                names = [str(c.get("name", "")) for c in await direct.client_list()]
            finally:
                await direct.aclose()
            out[f"{address[0]}:{address[1]}"] = Counter(
                n for n in names if n.endswith(":subscription")
            )
        return out

    expected = Counter({f"edge-{i}:subscription": 1 for i in range(1, deployment.edges + 1)})

    async def one_each() -> bool:
        return all(c == expected for c in (await subscriptions()).values())

    await eventually(one_each, 20, "one subscription connection per edge on every master")


async def test_history_and_resume_across_partitions_on_different_masters(
    deployment: Cluster, session: aiohttp.ClientSession
) -> None:
    base = 50_000
    await deployment.produce(
        (f"k{i}".encode(), crm_event(base + i, key=f"k{i}")) for i in range(240)
    )

    async def history(query: str) -> dict[str, object]:
        async with session.get(deployment.lb_url(f"/crm-events/history?{query}")) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, object] = await resp.json()
            return body

    async def all_stored() -> bool:
        newest = await history("n=240")
        items = newest["items"]
        assert isinstance(items, list)
        return {i["event"]["Seq"] for i in items} == set(range(base, base + 240))

    await eventually(all_stored, 30, "the newest 240 events in the history")
    newest = await history("n=240")
    items = newest["items"]
    assert isinstance(items, list)
    # Resume from the 100th of them: exactly the 140 after it, from every partition.
    cursor = items[99]["cursor"]
    rest = Collector(deployment.lb_url("/crm-events"), headers={"Last-Event-ID": cursor}).start(
        session
    )
    want = {i["event"]["Seq"] for i in items[100:]}
    await rest.wait_for(
        lambda c: want <= {f.json()["event"]["Seq"] for f in c.data_frames}, 30, "the rest"
    )
    got = [f.json()["event"]["Seq"] for f in rest.data_frames if f.json()["event"]["Seq"] >= base]
    assert sorted(got) == sorted(want), "exactly the events after the cursor"
    assert not rest.resets
    await rest.stop()


async def test_wait_goes_to_each_partitions_master_on_the_connection_that_wrote(
    redis_cluster: ClusterGroup,
) -> None:
    """``WAIT`` counts the replicas of the connection's own writes, so it must follow the
    scripts to each master. With one master's replica paused, the batch and ``wait_acked``
    are not acknowledged; with it back, they are."""
    settings = RedisSettings(url=redis_cluster.url, prefix="wait-test", timeout_s=2.0)
    target = settings.cluster
    assert target is not None
    nodes = ClusterNodes(settings, target, "wait-test")
    writer = BatchWriter(
        nodes, RedisKeys("wait-test"), "t", 1000, 100, wait_replicas=1, wait_timeout_ms=300
    )
    keys = RedisKeys("wait-test")
    try:
        await nodes.refresh()
        first = await writer.apply_grouped(_records(range(PARTITIONS), offset=0))
        assert all(r.status == "ok" for r in first.values())
        assert await writer.wait_acked(range(PARTITIONS))
        # One WAIT write on each master, in the slot of one of its partitions.
        written = [
            p
            for p in range(PARTITIONS)
            if await nodes.call(partition_slot(p), lambda r, p=p: r.exists(keys.wait(p)))
        ]
        owners = {redis_cluster.slot_owner(partition_slot(p)) for p in written}
        assert len(written) == len(owners) == 3, written
        master = redis_cluster.name_of(redis_cluster.slot_owner(partition_slot(0)))
        replica = redis_cluster.replica_of(master)
        redis_cluster.pause(replica)
        try:
            expect = {p: 0 for p in range(PARTITIONS)}
            batches = [
                PartitionBatch(p, pack(recs), len(recs), expect[p], 0)
                for p, recs in group(_records(range(PARTITIONS), offset=1)).items()
            ]
            result = await writer.apply(batches)
            assert not result.acked and result.replicas == 0
            assert not await writer.wait_acked(range(PARTITIONS))
            # Partitions on the other masters alone are acknowledged.
            others = [
                p
                for p in range(PARTITIONS)
                if redis_cluster.slot_owner(partition_slot(p)) != redis_cluster.address(master)
            ]
            assert await writer.wait_acked(others)
        finally:
            redis_cluster.resume(replica)
        await eventually(lambda: writer.wait_acked(range(PARTITIONS)), 10, "replicas caught up")
    finally:
        await nodes.aclose()


def _records(partitions: range, offset: int) -> list[Prepared]:
    return [
        prepare(
            RawRecord(p, offset, 1_764_410_400_000, b"k", b'{"Type":"ContactCreated"}'),
            max_bytes=1 << 20,
            type_fields=("Type",),
        )
        for p in partitions
    ]
