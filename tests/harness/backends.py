"""Where the tests find Kafka and Redis.

1. ``CRM_EVENTS_TEST_KAFKA`` / ``CRM_EVENTS_TEST_REDIS_URL`` when set (``make test`` sets them
   to the services the project's own scripts started);
2. otherwise, when a Docker engine answers, throwaway testcontainers;
3. otherwise the local defaults, 127.0.0.1:9092 and redis://127.0.0.1:6379/0.

:class:`SentinelGroup` is a private Redis primary + replica + Sentinels on free ports, for the
tests that fail Redis over (kill -9 of the primary, a lagging replica). :class:`ClusterGroup` is
a private Redis Cluster (masters with a replica each) on free ports, for the tests and
benchmarks of cluster mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from redis.asyncio import Redis

from devtools import redis_cluster, redis_ha
from devtools.probes import RedisReady
from devtools.supervisor import ProcessSpec, ProcState, Supervisor
from shared.settings import RedisSettings

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Backends:
    kafka_bootstrap: str
    redis_url: str
    origin: str

    @property
    def redis_host(self) -> str:
        return urlsplit(self.redis_url).hostname or "127.0.0.1"

    @property
    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379


def redis_mode(backends: Backends) -> str:
    """``single``, ``sentinel`` or ``cluster``: what the backends' Redis URL names."""
    settings = RedisSettings(url=backends.redis_url)
    if settings.cluster is not None:
        return "cluster"
    return "single" if settings.sentinel is None else "sentinel"


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def provide() -> Iterator[Backends]:
    kafka = os.environ.get("CRM_EVENTS_TEST_KAFKA")
    redis_url = os.environ.get("CRM_EVENTS_TEST_REDIS_URL")
    if kafka and redis_url:
        yield Backends(kafka, redis_url, "environment")
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        with KafkaContainer().with_kraft() as k, RedisContainer() as r:
            host = r.get_container_host_ip()
            port = r.get_exposed_port(6379)
            yield Backends(k.get_bootstrap_server(), f"redis://{host}:{port}/0", "testcontainers")
        return
    yield Backends(
        kafka or "127.0.0.1:9092", redis_url or "redis://127.0.0.1:6379/0", "local defaults"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open until every one is chosen."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass(frozen=True)
class Failover:
    old: redis_ha.Address
    new: redis_ha.Address
    announced_after_s: float
    """From the trigger until a Sentinel published ``+switch-master``."""
    settled_after_s: float
    """From the trigger until every running Sentinel names the new primary, and it says
    ROLE master."""


class _SupervisedGroup:
    """Redis processes under one ``Supervisor``: started on entering, stopped (in reverse
    order) on leaving, and faults injected by process name."""

    sup: Supervisor

    def start(self) -> None:
        raise NotImplementedError

    def _node_names(self) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        for name in reversed(self._node_names()):
            self.sup.stop(name, timeout_s=10)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def kill9(self, name: str) -> None:
        self.sup.kill9(name)

    def pause(self, name: str) -> None:
        self.sup.pause(name)

    def resume(self, name: str) -> None:
        self.sup.resume(name)

    def log(self, name: str) -> str:
        return self.sup.log_tail(name, 200)


@dataclass
class SentinelGroup(_SupervisedGroup):
    """A Redis primary (``redis-a`` at first), one replica (``redis-b``) and Sentinels on free
    ports, supervised from ``run_dir``. Use as a context manager: started on entry, each part
    is ready (the replica in sync, every Sentinel knows the primary, the other Sentinels and the
    replica), all stopped on exit.

    Faults: :meth:`kill9`, :meth:`pause` / :meth:`resume` (SIGSTOP/SIGCONT) of any part, by
    name, and :meth:`failover`, which runs a trigger and waits until the Sentinels announce and
    agree on a new primary.
    """

    run_dir: Path
    service: str = "crm-test"
    sentinels: int = 3
    down_after_ms: int = 1000
    """Sentinel's ``down-after-milliseconds``: how long a silent primary stays primary."""
    failover_timeout_ms: int = 10_000
    node_ports: dict[str, int] = field(init=False)
    sentinel_ports: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.sup = Supervisor(self.run_dir)
        self.node_ports = {"redis-a": _free_port(), "redis-b": _free_port()}
        self.sentinel_ports = [_free_port() for _ in range(self.sentinels)]

    # -- addresses --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+sentinel://`` of this group, for ``CRM_EVENTS_REDIS_URL``."""
        hosts = ",".join(f"{HOST}:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def sentinel_names(self) -> list[str]:
        return [f"sentinel{i}" for i in range(1, self.sentinels + 1)]

    @property
    def names(self) -> list[str]:
        return [*self.node_ports, *self.sentinel_names]

    def node_name(self, address: redis_ha.Address) -> str:
        for name, port in self.node_ports.items():
            if address == (HOST, port):
                return name
        raise KeyError(f"{address} is not a node of this group")

    def primary(self) -> redis_ha.Address:
        """The primary the first answering Sentinel names."""
        found = redis_ha.current_primary([(HOST, p) for p in self.sentinel_ports], [], self.service)
        if found is None:
            raise AssertionError("no Sentinel names a primary")
        return found

    @property
    def primary_name(self) -> str:
        return self.node_name(self.primary())

    @property
    def replica_name(self) -> str:
        primary = self.primary_name
        return next(n for n in self.node_ports if n != primary)

    def direct(self, name: str) -> Redis:
        """A plain client of one node (not through the Sentinels)."""
        return Redis(host=HOST, port=self.node_ports[name])

    # -- lifecycle and faults ---------------------------------------------------------------

    def _node_spec(self, name: str, replicaof: redis_ha.Address | None) -> ProcessSpec:
        home = self.run_dir / name
        port = self.node_ports[name]

        def prepare() -> None:
            (home / "data").mkdir(parents=True, exist_ok=True)
            (home / "redis.conf").write_text(
                redis_ha.redis_conf_text(port, home / "data", appendonly=False, replicaof=replicaof)
            )

        return ProcessSpec(
            name=name,
            argv=["redis-server", str(home / "redis.conf")],
            ready=RedisReady(HOST, port)
            if replicaof is None
            else redis_ha.ReplicaReady(HOST, port),
            ready_timeout_s=20,
            port=port,
            prepare=prepare,
        )

    def _sentinel_spec(self, index: int) -> ProcessSpec:
        home = self.run_dir / f"sentinel{index}"
        port = self.sentinel_ports[index - 1]
        conf = home / "sentinel.conf"

        def prepare() -> None:
            home.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                redis_ha.sentinel_conf_text(
                    port,
                    home,
                    self.service,
                    (HOST, self.node_ports["redis-a"]),
                    sentinels=self.sentinels,
                    down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms,
                )
            )

        return ProcessSpec(
            name=f"sentinel{index}",
            argv=["redis-sentinel", str(conf)],
            ready=redis_ha.SentinelReady(HOST, port, self.service),
            ready_timeout_s=20,
            port=port,
            prepare=prepare,
        )

    def start(self) -> None:
        self.sup.start(self._node_spec("redis-a", None))
        self.sup.start(self._node_spec("redis-b", (HOST, self.node_ports["redis-a"])))
        for i in range(1, self.sentinels + 1):
            self.sup.start(self._sentinel_spec(i))
        deadline = time.monotonic() + 30
        while not self._sentinels_complete():
            if time.monotonic() > deadline:
                raise AssertionError("the Sentinels did not discover each other and the replica")
            time.sleep(0.05)

    def _sentinels_complete(self) -> bool:
        """Every Sentinel sees the replica and all other Sentinels: only then can a majority
        agree on a failover."""
        for port in self.sentinel_ports:
            view = redis_ha.sentinel_view((HOST, port), self.service)
            if view is None or view[0] < 1 or view[1] < self.sentinels - 1:
                return False
        return True

    def _node_names(self) -> list[str]:
        return self.names

    def rejoin(self, name: str) -> None:
        """Start a stopped (e.g. killed) node again as a replica of the current primary, as
        an operator restarting an old primary after a failover does."""
        self.sup.start(self._node_spec(name, self.primary()))

    async def failover(self, trigger: Callable[[], object], timeout_s: float = 30.0) -> Failover:
        """Subscribe to ``+switch-master`` on every Sentinel, run ``trigger`` (e.g. kill -9 of
        the primary), wait for the announcement, then until every running Sentinel names the
        new primary and it answers ROLE master."""
        old = self.primary()
        clients = [Redis(host=HOST, port=p) for p in self.sentinel_ports]
        subs = [c.pubsub() for c in clients]
        try:
            for sub in subs:
                await sub.subscribe("+switch-master")
                await sub.get_message(timeout=1.0)  # the subscribe confirmation
            t0 = time.monotonic()
            trigger()
            new: redis_ha.Address | None = None
            deadline = t0 + timeout_s
            while new is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no +switch-master within {timeout_s} s")
                for sub in subs:
                    msg = await sub.get_message(timeout=0.02)
                    if msg is None or msg["type"] != "message":
                        continue
                    service, _, _, host, port = msg["data"].decode().split()
                    if service == self.service:
                        new = (host, int(port))
                        break
            announced = time.monotonic() - t0
            assert new != old, f"+switch-master named the old primary {old}"
            while not await self._settled(new):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the Sentinels did not all name {new} in {timeout_s} s")
                await asyncio.sleep(0.02)
            return Failover(old, new, announced, time.monotonic() - t0)
        finally:
            for sub in subs:
                await sub.aclose()  # type: ignore[no-untyped-call]
            for c in clients:
                await c.aclose()

    async def _settled(self, new: redis_ha.Address) -> bool:
        for name, port in zip(self.sentinel_names, self.sentinel_ports, strict=True):
            if self.sup.is_running(name) and (
                redis_ha.sentinel_primary((HOST, port), self.service) != new
            ):
                return False
        role = redis_ha.role(new)
        return role is not None and role.kind == "master"


# -- Redis Cluster ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFailover:
    old: redis_ha.Address
    """The master that was replaced."""
    new: redis_ha.Address
    """Its replica, now serving its slots."""
    promoted_after_s: float
    """From the trigger until the replica answered ROLE master."""
    settled_after_s: float
    """From the trigger until every running node said ``cluster_state:ok`` and they all agreed
    on the slot map."""


@dataclass
class ClusterGroup(_SupervisedGroup):
    """A Redis Cluster of ``shards`` masters with ``replicas`` replicas each, on free ports,
    supervised from ``run_dir``: nodes ``redis-node1`` … (the masters first, then the replicas),
    each with its own data directory and ``nodes.conf``, so that :meth:`rejoin` brings a
    killed node back into the cluster. Use as a context manager: on entry the cluster is
    created and settled (every replica in sync), on exit every node is stopped.

    Three masters or more are created with ``redis-cli --cluster create``, which picks the
    replica for each master itself: ask :meth:`replica_of`, never assume the pairing.

    Faults and planned changes: :meth:`kill9`, :meth:`pause` / :meth:`resume` of a node,
    :meth:`failover_by_kill` (kill -9 of a master, then wait for its replica to serve its
    slots), :meth:`cluster_failover` (CLUSTER FAILOVER on a replica) and :meth:`migrate_slot`
    (CLUSTER SETSLOT / MIGRATE, as ``redis-cli --cluster reshard`` does, for one chosen slot).
    """

    run_dir: Path
    shards: int = 3
    """Masters: each serves an even share of the slots."""
    replicas: int = 1
    """Replicas per master."""
    node_timeout_ms: int = 2000
    """``cluster-node-timeout``: how long a silent master stays master."""
    appendonly: bool = False
    """Tests need no persistence (a rejoining node syncs from its master); a benchmark
    comparing with the stack's single Redis may want the same append-only file."""
    argv_prefix: tuple[str, ...] = ()
    """Put before ``redis-server`` (a benchmark pins the nodes: ``("taskset", "-c", "1")``)."""
    node_ports: dict[str, int] = field(init=False)
    bus_ports: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.sup = Supervisor(self.run_dir)
        count = self.shards * (1 + self.replicas)
        # Bus ports chosen too (cluster-port): port + 10000 may be taken or past 65535.
        ports = _free_ports(2 * count)
        names = [f"redis-node{i}" for i in range(1, count + 1)]
        self.node_ports = dict(zip(names, ports[:count], strict=True))
        self.bus_ports = dict(zip(names, ports[count:], strict=True))

    # -- addresses --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.node_ports)

    def address(self, name: str) -> redis_ha.Address:
        return HOST, self.node_ports[name]

    def name_of(self, address: redis_ha.Address) -> str:
        for name, port in self.node_ports.items():
            if address == (HOST, port):
                return name
        raise KeyError(f"{address} is not a node of this group")

    @property
    def seeds(self) -> list[redis_ha.Address]:
        """The nodes created as masters (after a failover some may be replicas: still good
        seeds, any node tells the whole slot map)."""
        return [self.address(n) for n in self.names()[: self.shards]]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with the first masters as seeds, for ``CRM_EVENTS_REDIS_URL``."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.seeds)

    def direct(self, name: str) -> Redis:
        """A plain client of one node (no redirections followed)."""
        return Redis(host=HOST, port=self.node_ports[name])

    def running(self) -> list[str]:
        """Nodes that are up and not paused."""
        return [n for n in self.names() if self.sup.state(n) is ProcState.RUNNING]

    def view(self) -> redis_cluster.ClusterView:
        """CLUSTER NODES of the first running node that answers."""
        found = redis_cluster.first_view([self.address(n) for n in self.running()])
        if found is None:
            raise AssertionError("no node of the cluster answers")
        return found

    def masters(self) -> list[redis_ha.Address]:
        """The masters serving slots, by their first slot."""
        return [n.address for n in self.view().masters()]

    def slot_owner(self, slot: int) -> redis_ha.Address:
        node = self.view().owner(slot)
        if node is None:
            raise AssertionError(f"slot {slot} has no master")
        return node.address

    def key_owner(self, key: str | bytes) -> redis_ha.Address:
        """The master serving ``key`` (hash tags respected)."""
        return self.slot_owner(
            redis_cluster.key_slot(key.encode() if isinstance(key, str) else key)
        )

    def replica_of(self, master_name: str) -> str:
        """The (first) replica of a master, by name."""
        view = self.view()
        master = view.by_address(self.address(master_name))
        if master is None:
            raise AssertionError(f"{master_name} is not in the cluster")
        replicas = [r for r in view.replicas_of(master) if not r.failing]
        if not replicas:
            raise AssertionError(f"{master_name} has no working replica")
        return self.name_of(replicas[0].address)

    def master_of(self, replica_name: str) -> str:
        view = self.view()
        node = view.by_address(self.address(replica_name))
        master = None if node is None else view.master_of(node)
        if master is None:
            raise AssertionError(f"{replica_name} is not a replica")
        return self.name_of(master.address)

    # -- lifecycle --------------------------------------------------------------------------

    def _node_spec(self, name: str) -> ProcessSpec:
        home = self.run_dir / name
        port = self.node_ports[name]

        def prepare() -> None:
            (home / "data").mkdir(parents=True, exist_ok=True)
            (home / "redis.conf").write_text(
                redis_cluster.node_conf_text(
                    port,
                    home / "data",
                    host=HOST,
                    node_timeout_ms=self.node_timeout_ms,
                    bus_port=self.bus_ports[name],
                    appendonly=self.appendonly,
                )
            )

        return ProcessSpec(
            name=name,
            argv=[*self.argv_prefix, "redis-server", str(home / "redis.conf")],
            cwd=home,
            ready=RedisReady(HOST, port),
            ready_timeout_s=20,
            port=port,
            prepare=prepare,
        )

    def start(self) -> None:
        for name in self.names():
            self.sup.start(self._node_spec(name))
        addresses = [self.address(n) for n in self.names()]
        redis_cluster.create(addresses[: self.shards], addresses[self.shards :], timeout_s=60)
        redis_cluster.wait_settled(addresses, 60, replicas_in_sync=True)

    def _node_names(self) -> list[str]:
        return self.names()

    # -- faults -----------------------------------------------------------------------------

    def rejoin(self, name: str) -> None:
        """Start a stopped (e.g. killed) node again with its ``nodes.conf``: it rejoins the
        cluster, as a replica of whoever took over its slots. Then ``await wait_settled(
        replicas_in_sync=True)`` for it to be in sync."""
        self.sup.start(self._node_spec(name))

    async def wait_settled(
        self, timeout_s: float = 30.0, *, replicas_in_sync: bool = False
    ) -> None:
        """Until every running (not paused) node says ``cluster_state:ok`` with all slots
        served, they agree on the slot map and no slot is moving; with ``replicas_in_sync``
        also every other running node is a replica in sync with a serving master."""
        deadline = time.monotonic() + timeout_s
        while True:
            addresses = [self.address(n) for n in self.running()]
            reason = await asyncio.to_thread(
                redis_cluster.unsettled, addresses, replicas_in_sync=replicas_in_sync
            )
            if reason is None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not settle in {timeout_s} s: {reason}")
            await asyncio.sleep(0.05)

    async def _wait_master(self, address: redis_ha.Address, deadline: float) -> None:
        while True:
            role = await asyncio.to_thread(redis_ha.role, address)
            if role is not None and role.kind == "master":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name_of(address)} was not promoted: ROLE {role}")
            await asyncio.sleep(0.02)

    async def failover_by_kill(self, master_name: str, timeout_s: float = 30.0) -> ClusterFailover:
        """kill -9 a master, wait until its replica answers ROLE master, then until the
        cluster has settled over the remaining nodes (its replica set is one short until
        :meth:`rejoin`)."""
        old = self.address(master_name)
        new = self.address(self.replica_of(master_name))
        slots = self.view().by_address(old)
        assert slots is not None and slots.slots, f"{master_name} serves no slots"
        t0 = time.monotonic()
        self.kill9(master_name)
        await self._wait_master(new, t0 + timeout_s)
        promoted = time.monotonic() - t0
        await self.wait_settled(max(0.0, t0 + timeout_s - time.monotonic()))
        taken = self.slot_owner(slots.slots[0][0])
        assert taken == new, f"{master_name}'s slots went to {taken}, not its replica {new}"
        return ClusterFailover(old, new, promoted, time.monotonic() - t0)

    async def cluster_failover(
        self, replica_name: str, timeout_s: float = 30.0, *, option: str | None = None
    ) -> ClusterFailover:
        """``CLUSTER FAILOVER`` on a replica (a planned switch: its master pauses writes until
        the replica has caught up), then wait until it serves the slots, the old master is its
        replica and in sync."""
        new = self.address(replica_name)
        old = self.address(self.master_of(replica_name))
        t0 = time.monotonic()
        await asyncio.to_thread(redis_cluster.failover, new, option)
        await self._wait_master(new, t0 + timeout_s)
        promoted = time.monotonic() - t0
        await self.wait_settled(max(0.0, t0 + timeout_s - time.monotonic()), replicas_in_sync=True)
        return ClusterFailover(old, new, promoted, time.monotonic() - t0)

    async def migrate_slot(self, slot: int, to_address: redis_ha.Address) -> redis_ha.Address:
        """Move one slot, keys and all, to another master while clients keep writing (in a
        thread: the caller's event loop goes on). Returns the old owner; then waits until
        every node agrees on the new one."""
        addresses = [self.address(n) for n in self.running()]
        old = await asyncio.to_thread(redis_cluster.migrate_slot, addresses, slot, to_address)
        await self.wait_settled()
        return old
