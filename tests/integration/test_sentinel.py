"""Clients from ``make_redis`` follow a Redis Sentinel failover.

Real processes: a private primary, a replica and three Sentinels (Debian's redis-sentinel) on
free ports (``SentinelGroup``). The primary is killed with kill -9; the clients (plain commands,
a pub/sub subscription, a Lua script) must carry on against the promoted replica, found through
the Sentinels, with no new client built. The failover time is printed (``-s``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devtools.stack import SettingsError, Stack, StackSettings, build_specs
from devtools.stack import main as stack_main
from shared.redis_client import make_redis
from shared.settings import RedisSettings
from tests.harness.backends import SentinelGroup
from tests.harness.cluster import free_port
from tests.waiting import eventually, eventually_sync

pytestmark = pytest.mark.integration

# Sets a value and counts calls: both writes, so a replica (read-only) cannot run it.
SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"
FAILOVER_DEADLINE_S = 30.0


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path / "sentinel") as g:
        yield g


async def client_names(node: Redis) -> set[str]:
    return {str(c.get("name", "")) for c in await node.client_list()}


async def test_clients_follow_the_promoted_replica_after_kill_9_of_the_primary(
    group: SentinelGroup,
) -> None:
    settings = RedisSettings(url=group.url, prefix="t", timeout_s=2.0)
    cmd = make_redis(settings, "sentinel-test:cmd")
    sub_client = make_redis(settings, "sentinel-test:sub", for_pubsub=True)
    pubsub = sub_client.pubsub()
    first = group.primary_name
    try:
        # Before: everything goes to the first primary, under the given client names.
        await cmd.set("k", "before")
        script = cmd.register_script(SCRIPT)
        assert await script(keys=["s", "n"], args=["one"]) == 1
        await pubsub.subscribe("chan")
        assert (await pubsub.get_message(timeout=2.0) or {}).get("type") == "subscribe"
        assert await cmd.publish("chan", "one") == 1
        got = await pubsub.get_message(timeout=2.0)
        assert got is not None and got["data"] == b"one"
        direct = group.direct(first)
        try:
            assert {"sentinel-test:cmd", "sentinel-test:sub"} <= await client_names(direct)
        finally:
            await direct.aclose()
        # Everything so far is on the replica too, so the promoted copy misses nothing.
        assert await cmd.wait(1, 5000) == 1

        failover = await group.failover(lambda: group.kill9(first), FAILOVER_DEADLINE_S)
        promoted = group.node_name(failover.new)
        assert promoted != first

        t0 = time.monotonic()

        async def plain_commands_work() -> bool:
            await cmd.set("k", "after")
            return await cmd.get("k") == b"after"

        await eventually(plain_commands_work, FAILOVER_DEADLINE_S, "SET/GET after the failover")
        commands_back_s = time.monotonic() - t0
        # The promoted replica never had the script cached (EVALSHA is not replicated as a
        # script): the client reloads it on NOSCRIPT, and the count carried over.
        assert await script(keys=["s", "n"], args=["two"]) == 2

        async def subscription_delivers() -> bool:
            try:
                await cmd.publish("chan", "two")
                while (msg := await pubsub.get_message(timeout=0.2)) is not None:
                    if msg["type"] == "message" and msg["data"] == b"two":
                        return True
            except (RedisConnectionError, RedisTimeoutError):
                pass  # the subscription's connection is re-made on the next read
            return False

        await eventually(subscription_delivers, FAILOVER_DEADLINE_S, "pub/sub after failover")
        print(
            f"\nsentinel failover: kill -9 of {first} -> {promoted}; +switch-master after "
            f"{failover.announced_after_s:.2f} s, all Sentinels agreed after "
            f"{failover.settled_after_s:.2f} s, commands answered "
            f"{commands_back_s:.2f} s after that (down-after {group.down_after_ms} ms)"
        )

        # All of it really ran on the promoted node, under the same client names.
        node = group.direct(promoted)
        try:
            assert (await node.role())[0] == b"master"
            assert await node.get("k") == b"after"
            assert await node.get("s") == b"two"
            assert {"sentinel-test:cmd", "sentinel-test:sub"} <= await client_names(node)
        finally:
            await node.aclose()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await sub_client.aclose()
        await cmd.aclose()


async def test_a_replica_paused_at_the_kill_is_promoted_without_the_writes_it_missed(
    group: SentinelGroup,
) -> None:
    """The fault the failover tests need: SIGSTOP the replica, write more than the kernel's
    socket buffers hold (the rest waits in the primary's memory), kill -9 the primary, SIGCONT
    the replica. The Sentinels promote it, and acknowledged writes are gone."""
    settings = RedisSettings(url=group.url, prefix="t", timeout_s=5.0)
    cmd = make_redis(settings, "sentinel-test:lag")
    first, replica = group.primary_name, group.replica_name
    try:
        await cmd.set("kept", "1")
        assert await cmd.wait(1, 5000) == 1
        group.pause(replica)
        chunk = b"x" * (1 << 20)
        async with cmd.pipeline(transaction=False) as pipe:
            for i in range(64):
                pipe.set(f"lost:{i}", chunk)
            acked = await pipe.execute()
        assert all(acked)

        def kill_and_resume() -> None:
            group.kill9(first)
            group.resume(replica)

        failover = await group.failover(kill_and_resume, FAILOVER_DEADLINE_S)
        assert group.node_name(failover.new) == replica

        async def answers() -> bool:
            return await cmd.get("kept") == b"1"

        await eventually(answers, FAILOVER_DEADLINE_S, "the promoted replica answers")
        present = await cmd.exists(*(f"lost:{i}" for i in range(64)))
        print(f"\nlagging replica promoted: {64 - present} of 64 acknowledged 1 MiB writes lost")
        assert present < 64
    finally:
        await cmd.aclose()


# --- the local stack in Sentinel mode (private run directory and ports) ------------------------


def sentinel_stack_env(run_dir: Path) -> dict[str, str]:
    """Every port private, so nothing touches the stack on the default ports."""
    ports = [free_port() for _ in range(12)]
    return {
        "CRM_EVENTS_RUN_DIR": str(run_dir),
        "CRM_EVENTS_REDIS_MODE": "sentinel",
        "CRM_EVENTS_REDIS_PORT": str(ports[0]),
        "CRM_EVENTS_REDIS_REPLICA_PORT": str(ports[1]),
        "CRM_EVENTS_REDIS_SENTINEL_PORTS": ",".join(map(str, ports[2:5])),
        "CRM_EVENTS_KAFKA_PORT": str(ports[5]),
        "CRM_EVENTS_KAFKA_CONTROLLER_PORT": str(ports[6]),
        "CRM_EVENTS_INGEST_PORT": str(ports[7]),
        "CRM_EVENTS_EDGE_PORTS": f"{ports[8]},{ports[9]}",
        "CRM_EVENTS_LB_PORT": str(ports[10]),
        "CRM_EVENTS_LB_TLS_PORT": str(ports[11]),
    }


REDIS_PARTS = ["redis", "redis-replica", "sentinel1", "sentinel2", "sentinel3"]


def test_sentinel_mode_points_ingest_and_edges_at_the_sentinels(tmp_path: Path) -> None:
    env = sentinel_stack_env(tmp_path / "run")
    settings = StackSettings.from_env(env)
    specs = {s.name: s for s in build_specs(settings, env)}

    assert [n for n in settings.part_names if n in specs][:7] == ["kafka", *REDIS_PARTS, "ingest"]
    sentinels = ",".join(f"127.0.0.1:{p}" for p in settings.sentinel_ports)
    url = f"redis+sentinel://{sentinels}/crm-events/0"
    assert specs["ingest"].env["CRM_EVENTS_REDIS_URL"] == url
    assert specs["ingest"].env["CRM_EVENTS_REDIS_WAIT_REPLICAS"] == "1"
    assert specs["edge1"].env["CRM_EVENTS_REDIS_URL"] == url
    # The URL the stack hands out is one the services accept.
    redis = RedisSettings(url=url)
    assert redis.sentinel is not None and redis.sentinel.service == "crm-events"

    single = StackSettings.from_env({**env, "CRM_EVENTS_REDIS_MODE": ""})
    assert single.redis_url == f"redis://127.0.0.1:{single.redis_port}/0"
    assert "redis-replica" not in single.part_names and "sentinel1" not in single.part_names


def test_stack_sentinel_mode_status_failover_restart_and_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sentinel_stack_env(tmp_path / "run")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = StackSettings.from_env(env)
    stack = Stack(settings)
    primary_port, replica_port = settings.redis_port, settings.redis_replica_port
    try:
        stack.start(REDIS_PARTS)
        # A later command without CRM_EVENTS_REDIS_MODE follows the running stack.
        monkeypatch.delenv("CRM_EVENTS_REDIS_MODE")
        assert stack_main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"redis primary: 127.0.0.1:{primary_port} (redis), per the Sentinels" in out
        assert "primary (offset" in out and f"replica of 127.0.0.1:{primary_port}" in out
        with pytest.raises(SettingsError, match="runs in sentinel mode"):
            Stack(StackSettings.from_env({**env, "CRM_EVENTS_REDIS_MODE": "single"})).start(
                ["redis"]
            )

        stack.supervisor.kill9("redis")

        def replica_promoted() -> bool:
            topology = stack.redis_topology()
            return topology is not None and topology.primary == ("127.0.0.1", replica_port)

        eventually_sync(replica_promoted, 60, "the Sentinels to promote redis-replica")
        # Restarted, the old primary rejoins as a replica of the new one (make up does this).
        stack.start(["redis"])
        topology = stack.redis_topology()
        assert topology is not None
        roles = {name: role for name, _, role in topology.nodes}
        assert roles["redis"] is not None and roles["redis"].kind == "replica"
        assert roles["redis"].primary == ("127.0.0.1", replica_port)
        assert roles["redis-replica"] is not None and roles["redis-replica"].kind == "master"
    finally:
        stopped = stack.down()
    assert set(REDIS_PARTS) <= set(stopped)
    assert not (settings.run_dir / "redis-mode").exists()
    assert all(stack.supervisor.pid(n) is None for n in REDIS_PARTS)
