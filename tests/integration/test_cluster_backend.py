"""The Redis Cluster the cluster-mode tests and the local stack run on.

Real processes: ``redis-server --cluster-enabled yes`` nodes on free ports (``ClusterGroup``),
created with ``redis-cli --cluster create`` (or by hand below three masters). Checked here: the
slot map covers every slot, each master has a replica in sync; kill -9 of a master hands its
slots and data to its replica and the old master rejoins as a replica; one slot moves to another
master, keys and all, while a client keeps writing to it; CLUSTER FAILOVER swaps a replica with
its master; and the local stack's cluster mode creates the cluster once, shows it in ``status``
and keeps it across a restart. Failover times are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import MovedError

from devtools import redis_cluster, redis_ha
from devtools.stack import SettingsError, Stack, StackSettings, build_specs
from devtools.stack import main as stack_main
from devtools.supervisor import ProcState
from tests.harness.backends import ClusterGroup
from tests.harness.cluster import free_port
from tests.waiting import eventually_sync

pytestmark = pytest.mark.integration

SLOTS = redis_cluster.TOTAL_SLOTS
DEADLINE_S = 30.0


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ClusterGroup]:
    with ClusterGroup(tmp_path / "cluster") as g:
        yield g


def cluster_client(group: ClusterGroup) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in group.seeds])


def key_on(group: ClusterGroup, master: redis_ha.Address, stem: str = "k") -> str:
    """A hash-tagged key whose slot ``master`` serves."""
    for i in range(10_000):
        key = f"{{{stem}{i}}}:x"
        if group.key_owner(key) == master:
            return key
    raise AssertionError(f"no key of {master} found")


async def test_a_new_cluster_serves_every_slot_from_three_masters_with_a_replica_each(
    group: ClusterGroup,
) -> None:
    view = group.view()
    masters = view.masters()
    assert len(masters) == 3
    assert group.masters() == [m.address for m in masters]
    # The ranges cover 0..16383 exactly once.
    ranges = sorted(r for m in masters for r in m.slots)
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
    assert sum(m.slot_count for m in masters) == SLOTS
    # Evenly: redis-cli gives 5461, 5462, 5461.
    assert sorted(m.slot_count for m in masters) == [5461, 5461, 5462]
    paired = set()
    for master in masters:
        replicas = view.replicas_of(master)
        assert len(replicas) == 1, f"{master.address} has replicas {replicas}"
        role = redis_ha.role(replicas[0].address)
        assert role is not None and role.kind == "replica"
        assert role.primary == master.address and role.link == "connected"
        paired.add(replicas[0].address)
    assert {*paired, *group.masters()} == {group.address(n) for n in group.names()}
    # Every node tells the same slot map.
    for name in group.names():
        other = redis_cluster.cluster_nodes(group.address(name))
        assert other is not None and other.slot_map() == view.slot_map()
    seeds = ",".join(f"127.0.0.1:{group.node_ports[n]}" for n in group.names()[:3])
    assert group.url == f"redis+cluster://{seeds}"

    # A cluster client writes through the seeds; each key lands on the master of its slot.
    client = cluster_client(group)
    try:
        for master in group.masters():
            key = key_on(group, master)
            await client.set(key, master[1])
            direct = group.direct(group.name_of(master))
            try:
                assert await direct.get(key) == str(master[1]).encode()
            finally:
                await direct.aclose()
    finally:
        await client.aclose()


async def test_kill_9_of_a_master_hands_its_slots_and_data_to_its_replica(
    group: ClusterGroup,
) -> None:
    master = group.name_of(group.masters()[0])
    replica = group.replica_of(master)
    key = key_on(group, group.address(master))
    slot = redis_cluster.key_slot(key.encode())
    direct = group.direct(master)
    try:
        await direct.set(key, "before")
        # The replica has it before the kill, so the promoted copy misses nothing.
        assert await direct.wait(1, 5000) == 1
    finally:
        await direct.aclose()

    failover = await group.failover_by_kill(master, DEADLINE_S)
    print(
        f"\ncluster failover: kill -9 of {master} -> {replica}; ROLE master after "
        f"{failover.promoted_after_s:.2f} s, settled after {failover.settled_after_s:.2f} s"
    )
    assert failover.old == group.address(master)
    assert failover.new == group.address(replica)
    assert group.slot_owner(slot) == group.address(replica)
    assert group.sup.state(master) is ProcState.DEAD
    assert len(group.masters()) == 3
    promoted = group.direct(replica)
    try:
        assert await promoted.get(key) == b"before"
        await promoted.set(key, "after")
    finally:
        await promoted.aclose()

    # Back with its nodes.conf, the old master learns it lost and follows its old replica.
    group.rejoin(master)
    await group.wait_settled(DEADLINE_S, replicas_in_sync=True)
    assert group.master_of(master) == replica
    rejoined = group.direct(master)
    try:
        await rejoined.execute_command("READONLY")
        assert await rejoined.get(key) == b"after"
    finally:
        await rejoined.aclose()


async def test_one_slot_moves_to_another_master_with_its_keys_while_a_client_writes(
    group: ClusterGroup,
) -> None:
    stream = "{p7}:stream"
    slot = redis_cluster.key_slot(stream.encode())
    source = group.slot_owner(slot)
    target = next(m for m in group.masters() if m != source)
    client = cluster_client(group)
    written = 0
    moved = asyncio.Event()

    async def writer() -> None:
        # Until the move is done and a while after: writes hit the source, then (ASK) the
        # target for a key already moved, then (MOVED) the target.
        nonlocal written
        after = 0
        while after < 200:
            await client.xadd(stream, {"n": written})
            written += 1
            if moved.is_set():
                after += 1
            else:
                await asyncio.sleep(0)

    try:
        for n in range(500):
            await client.xadd(stream, {"n": n})
        written = 500
        await client.set("{p7}:meta", "m")
        task = asyncio.create_task(writer())
        try:
            old = await group.migrate_slot(slot, target)
            moved.set()
            await task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert old == source
        assert group.slot_owner(slot) == target
        # Every node agrees (migrate_slot waited for that), and nothing was lost on the way.
        for name in group.running():
            view = redis_cluster.cluster_nodes(group.address(name))
            assert view is not None and view.owner(slot) is not None
            assert view.owner(slot).address == target  # type: ignore[union-attr]
        new_owner = group.direct(group.name_of(target))
        old_owner = group.direct(group.name_of(source))
        try:
            assert await new_owner.xlen(stream) == written
            assert await new_owner.get("{p7}:meta") == b"m"
            with pytest.raises(MovedError) as moved_to:
                await old_owner.xlen(stream)
            assert (moved_to.value.host, moved_to.value.port) == target
        finally:
            await new_owner.aclose()
            await old_owner.aclose()
    finally:
        await client.aclose()


async def test_cluster_failover_on_a_replica_swaps_it_with_its_master(
    group: ClusterGroup,
) -> None:
    master = group.name_of(group.masters()[1])
    replica = group.replica_of(master)
    key = key_on(group, group.address(master))
    direct = group.direct(master)
    try:
        await direct.set(key, "kept")
    finally:
        await direct.aclose()

    failover = await group.cluster_failover(replica, DEADLINE_S)
    print(
        f"\nCLUSTER FAILOVER on {replica}: master after {failover.promoted_after_s:.2f} s, "
        f"settled after {failover.settled_after_s:.2f} s"
    )
    assert failover.old == group.address(master) and failover.new == group.address(replica)
    assert group.key_owner(key) == group.address(replica)
    assert group.master_of(master) == replica
    promoted = group.direct(replica)
    try:
        # A manual failover waits for the replica to catch up: the write is there.
        assert await promoted.get(key) == b"kept"
    finally:
        await promoted.aclose()


@pytest.mark.parametrize(("shards", "replicas"), [(1, 0), (2, 1)])
async def test_clusters_below_three_masters_are_created_by_hand(
    tmp_path: Path, shards: int, replicas: int
) -> None:
    with ClusterGroup(tmp_path / "small", shards=shards, replicas=replicas) as group:
        view = group.view()
        assert len(view.masters()) == shards
        assert view.assigned == SLOTS
        for master in view.masters():
            assert len(view.replicas_of(master)) == replicas
        # The same split redis-cli makes.
        assert [m.slots for m in view.masters()] == [
            (r,) for r in redis_cluster.split_slots(shards)
        ]
        client = cluster_client(group)
        try:
            for master in group.masters():
                await client.set(key_on(group, master), "v")
        finally:
            await client.aclose()


# --- the local stack in cluster mode (private run directory and ports) --------------------------


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus (port + 10000) is free too."""
    found: list[int] = []
    with contextlib.ExitStack() as held:
        while len(found) < count:
            port = random.randint(20_000, 45_000)
            socks = []
            try:
                for p in (port, port + 10_000):
                    sock = socket.socket()
                    socks.append(sock)
                    sock.bind(("127.0.0.1", p))
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            for sock in socks:
                held.enter_context(sock)
            found.append(port)
    return found


def cluster_stack_env(run_dir: Path) -> dict[str, str]:
    ports = [free_port() for _ in range(7)]
    return {
        "CRM_EVENTS_RUN_DIR": str(run_dir),
        "CRM_EVENTS_REDIS_MODE": "cluster",
        "CRM_EVENTS_REDIS_CLUSTER_PORTS": ",".join(map(str, cluster_ports(6))),
        "CRM_EVENTS_KAFKA_PORT": str(ports[0]),
        "CRM_EVENTS_KAFKA_CONTROLLER_PORT": str(ports[1]),
        "CRM_EVENTS_INGEST_PORT": str(ports[2]),
        "CRM_EVENTS_EDGE_PORTS": f"{ports[3]},{ports[4]}",
        "CRM_EVENTS_LB_PORT": str(ports[5]),
        "CRM_EVENTS_LB_TLS_PORT": str(ports[6]),
    }


NODES = [f"redis-node{i}" for i in range(1, 7)]


def test_cluster_mode_points_ingest_and_edges_at_the_masters(tmp_path: Path) -> None:
    env = cluster_stack_env(tmp_path / "run")
    settings = StackSettings.from_env(env)
    specs = {s.name: s for s in build_specs(settings, env)}
    assert [n for n in settings.part_names if n in specs][:8] == ["kafka", *NODES, "ingest"]
    assert "redis" not in specs
    ports = [int(p) for p in env["CRM_EVENTS_REDIS_CLUSTER_PORTS"].split(",")]
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:3])
    assert specs["ingest"].env["CRM_EVENTS_REDIS_URL"] == url
    assert specs["ingest"].env["CRM_EVENTS_REDIS_WAIT_REPLICAS"] == "1"
    assert specs["edge1"].env["CRM_EVENTS_REDIS_URL"] == url
    assert settings.kafka_partitions == 12


def test_stack_cluster_mode_creates_once_shows_status_and_rejoins_a_killed_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = cluster_stack_env(tmp_path / "run")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = StackSettings.from_env(env)
    stack = Stack(settings)
    ports = dict(settings.redis_nodes)
    addresses = {name: ("127.0.0.1", port) for name, port in ports.items()}
    try:
        stack.start(NODES)

        def node_ids() -> dict[str, str]:
            ids = {}
            for name, address in addresses.items():
                view = redis_cluster.cluster_nodes(address)
                assert view is not None and view.myself is not None
                ids[name] = view.myself.id
            return ids

        created = node_ids()
        # A later command without CRM_EVENTS_REDIS_MODE follows the running stack.
        monkeypatch.delenv("CRM_EVENTS_REDIS_MODE")
        assert stack_main(["status"]) == 0
        out = capsys.readouterr().out
        print(out)
        head = "redis cluster: state ok, 16384/16384 slots served by 3 masters, per 127.0.0.1:"
        assert head in out
        lines = {
            line.split()[0]: line for line in out.splitlines() if line.startswith("  redis-node")
        }
        ranges = ["0-5460 (5461)", "5461-10922 (5462)", "10923-16383"]
        for name, slots in zip(NODES[:3], ranges, strict=True):
            assert f"master, slots {slots}" in lines[name], lines[name]
            assert "replicas: redis-node" in lines[name]
        for name in NODES[3:]:
            assert "replica of 127.0.0.1:" in lines[name] and "link connected" in lines[name]
        with pytest.raises(SettingsError, match="runs in cluster mode"):
            Stack(StackSettings.from_env({**env, "CRM_EVENTS_REDIS_MODE": "single"})).start(
                ["redis"]
            )

        # Stopped and started again: the same cluster (same node ids), not a new one.
        stack.stop(NODES)
        stack.start(NODES)
        assert node_ids() == created

        # kill -9 of a master: its replica takes over; started again, it follows it.
        view = redis_cluster.cluster_nodes(addresses["redis-node1"])
        assert view is not None and view.myself is not None
        replica = next(
            n for n, a in addresses.items() if a == view.replicas_of(view.myself)[0].address
        )
        stack.supervisor.kill9("redis-node1")

        def replica_promoted() -> bool:
            role = redis_ha.role(addresses[replica])
            return role is not None and role.kind == "master"

        eventually_sync(replica_promoted, 60, f"{replica} to take over from redis-node1")
        stack.start(["redis-node1"])
        role = redis_ha.role(addresses["redis-node1"])
        assert role is not None and role.kind == "replica"
        assert role.primary == addresses[replica] and role.link == "connected"
        assert stack_main(["status"]) == 0
        out = capsys.readouterr().out
        print(out)
        assert head in out
    finally:
        stopped = stack.down()
    assert set(NODES) <= set(stopped)
    assert not (settings.run_dir / "redis-mode").exists()
