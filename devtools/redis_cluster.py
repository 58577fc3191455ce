"""Redis Cluster on one machine: node configuration, creating the cluster, reading its slot map,
waiting until it has settled, and the planned changes (slot migration, manual failover). Used by
the local stack (``CRM_EVENTS_REDIS_MODE=cluster``) and by the integration tests'
:class:`~tests.harness.backends.ClusterGroup`.

The questions (:func:`cluster_nodes`, :func:`cluster_info`) are one quick synchronous round trip
each; "no answer" is None, never an exception, so that ``status`` and the waits work while nodes
are down. The actions (:func:`create`, :func:`migrate_slot`, :func:`failover`) raise
:class:`ClusterError`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from devtools import redis_ha

__all__ = [
    "TOTAL_SLOTS",
    "Address",
    "ClusterError",
    "ClusterView",
    "Node",
    "cluster_info",
    "cluster_nodes",
    "create",
    "failover",
    "first_view",
    "format_ranges",
    "is_fresh",
    "key_slot",
    "migrate_slot",
    "node_conf_text",
    "parse_nodes",
    "recorded_address",
    "split_slots",
    "unsettled",
    "wait_settled",
]

Address = redis_ha.Address
TOTAL_SLOTS = REDIS_CLUSTER_HASH_SLOTS
QUERY_TIMEOUT_S = redis_ha.QUERY_TIMEOUT_S
#: MIGRATE moves whole keys; a long stream takes a while to DUMP and RESTORE.
MIGRATE_TIMEOUT_MS = 10_000
CREATE_TIMEOUT_S = 60.0
POLL_S = 0.05


class ClusterError(RuntimeError):
    """Creating or changing the cluster failed; the message says which node and why."""


def node_conf_text(
    port: int,
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    node_timeout_ms: int,
    bus_port: int | None = None,
    appendonly: bool = True,
) -> str:
    """A cluster node's file. ``nodes.conf`` (the node's identity, epochs and slot map, which
    Redis rewrites itself) lives in ``data_dir`` beside the data: rewriting this file on every
    start keeps the node in its cluster."""
    lines = [
        "cluster-enabled yes",
        "cluster-config-file nodes.conf",
        # How long a silent master stays master before its replica takes over.
        f"cluster-node-timeout {node_timeout_ms}",
    ]
    if bus_port is not None:
        # Tests take free ports; the default bus port (port + 10000) may be taken or invalid.
        lines.append(f"cluster-port {bus_port}")
    base = redis_ha.redis_conf_text(port, data_dir, host=host, appendonly=appendonly)
    return base + "\n".join(lines) + "\n"


def recorded_address(nodes_conf: Path) -> Address | None:
    """The address a node's ``nodes.conf`` says it has (its ``myself`` line); None without a
    file. A node restarted on another port would be lost to the others, which still know the
    old one."""
    try:
        text = nodes_conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and "myself" in fields[2].split(","):
            host, port, _ = _split_address(fields[1])
            return host, port
    return None


# -- reading the cluster -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Node:
    """One line of ``CLUSTER NODES``."""

    id: str
    address: Address
    bus_port: int
    flags: frozenset[str]
    master_id: str | None
    """A replica's master; None for a master."""
    link: str
    """The cluster bus link: ``connected`` or ``disconnected``."""
    slots: tuple[tuple[int, int], ...] = ()
    """Inclusive slot ranges this master serves."""
    migrating: tuple[tuple[int, str], ...] = ()
    """(slot, node id) being moved out of this node."""
    importing: tuple[tuple[int, str], ...] = ()
    """(slot, node id) being moved into this node."""

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def is_replica(self) -> bool:
        return "slave" in self.flags

    @property
    def failing(self) -> bool:
        """The node this view comes from believes it is down (``fail``) or suspects it
        (``fail?``)."""
        return bool(self.flags & {"fail", "fail?"})

    @property
    def myself(self) -> bool:
        return "myself" in self.flags

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


def _split_address(field: str) -> tuple[str, int, int]:
    """``ip:port@cport[,hostname]`` -> (ip, port, cport)."""
    addr = field.split(",", 1)[0]
    hostport, _, bus = addr.partition("@")
    host, _, port = hostport.rpartition(":")
    return host, int(port or 0), int(bus or 0)


def parse_nodes(text: str) -> list[Node]:
    """The answer to ``CLUSTER NODES``."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        host, port, bus = _split_address(fields[1])
        slots: list[tuple[int, int]] = []
        migrating: list[tuple[int, str]] = []
        importing: list[tuple[int, str]] = []
        for item in fields[8:]:
            if item.startswith("["):
                body = item.strip("[]")
                if "->-" in body:
                    slot, _, peer = body.partition("->-")
                    migrating.append((int(slot), peer))
                elif "-<-" in body:
                    slot, _, peer = body.partition("-<-")
                    importing.append((int(slot), peer))
                continue
            start, _, end = item.partition("-")
            slots.append((int(start), int(end or start)))
        nodes.append(
            Node(
                id=fields[0],
                address=(host, port),
                bus_port=bus,
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                link=fields[7],
                slots=tuple(sorted(slots)),
                migrating=tuple(migrating),
                importing=tuple(importing),
            )
        )
    return nodes


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """The cluster as one node sees it (its ``CLUSTER NODES``)."""

    source: Address
    nodes: tuple[Node, ...]

    def by_id(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def by_address(self, address: Address) -> Node | None:
        return next((n for n in self.nodes if n.address == address), None)

    @property
    def myself(self) -> Node | None:
        return next((n for n in self.nodes if n.myself), None)

    def masters(self) -> list[Node]:
        """Masters that serve slots, by their first slot."""
        owners = [n for n in self.nodes if n.is_master and n.slots]
        return sorted(owners, key=lambda n: n.slots[0])

    def replicas_of(self, master: Node) -> list[Node]:
        return [n for n in self.nodes if n.is_replica and n.master_id == master.id]

    def master_of(self, replica: Node) -> Node | None:
        return None if replica.master_id is None else self.by_id(replica.master_id)

    def owner(self, slot: int) -> Node | None:
        for node in self.nodes:
            if node.is_master and any(s <= slot <= e for s, e in node.slots):
                return node
        return None

    def slot_map(self) -> tuple[tuple[int, int, Address], ...]:
        """Every assigned range with its master's address, in slot order: two nodes agree on
        the slot map when these are equal."""
        ranges = [(s, e, n.address) for n in self.nodes if n.is_master for s, e in n.slots]
        return tuple(sorted(ranges))

    def shape(self) -> tuple[tuple[Address, str, Address | None, bool], ...]:
        """(address, ``master`` or ``replica``, its master, failing) of every node: two nodes
        agree on who replicates whom when these are equal (gossip spreads a new replica's
        master some time after the replica itself knows it)."""
        rows = []
        for n in self.nodes:
            master = self.master_of(n) if n.is_replica else None
            kind = "master" if n.is_master else "replica" if n.is_replica else "-"
            rows.append((n.address, kind, None if master is None else master.address, n.failing))
        return tuple(sorted(rows))

    @property
    def assigned(self) -> int:
        return sum(n.slot_count for n in self.nodes if n.is_master)


def _run(address: Address, *command: str | int | bytes, timeout_s: float = QUERY_TIMEOUT_S) -> Any:
    """Like :func:`redis_ha.ask`, but an error is a :class:`ClusterError` naming the node."""
    client = redis_ha.client(address, timeout_s)
    try:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        words = " ".join(_text(c) for c in command[:4])
        raise ClusterError(f"{address[0]}:{address[1]}: {words}: {exc}") from exc
    finally:
        client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cluster_nodes(address: Address, timeout_s: float = QUERY_TIMEOUT_S) -> ClusterView | None:
    """``CLUSTER NODES`` of the node at ``address``; None when it does not answer."""
    answer = redis_ha.ask(address, "CLUSTER", "NODES", timeout_s=timeout_s)
    if answer is None:
        return None
    nodes = parse_nodes(_text(answer))
    # A node learns its own IP only from a peer: alone (a one-master cluster) it has none.
    nodes = [
        dataclasses.replace(n, address=(address[0], n.address[1]))
        if n.myself and not n.address[0]
        else n
        for n in nodes
    ]
    return ClusterView(address, tuple(nodes))


def first_view(addresses: Iterable[Address]) -> ClusterView | None:
    """The view of the first node that answers."""
    for address in addresses:
        view = cluster_nodes(address)
        if view is not None:
            return view
    return None


def cluster_info(address: Address, timeout_s: float = QUERY_TIMEOUT_S) -> dict[str, str] | None:
    """``CLUSTER INFO`` as a dict of strings; None when the node does not answer."""
    answer = redis_ha.ask(address, "CLUSTER", "INFO", timeout_s=timeout_s)
    if answer is None:
        return None
    info = {}
    for line in _text(answer).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def is_fresh(address: Address) -> bool | None:
    """The node knows no other node and serves no slot (``redis-cli --cluster create`` may
    take it); None when it does not answer."""
    info = cluster_info(address)
    if info is None:
        return None
    return info.get("cluster_known_nodes") == "1" and info.get("cluster_slots_assigned") == "0"


def format_ranges(ranges: Sequence[tuple[int, int]], limit: int = 4) -> str:
    """``0-5460`` / ``0-99,101-5460`` / the first ``limit`` ranges and ``+N more``."""
    parts = [str(s) if s == e else f"{s}-{e}" for s, e in ranges]
    if len(parts) > limit:
        parts = [*parts[:limit], f"+{len(parts) - limit} more"]
    return ",".join(parts) or "none"


def split_slots(masters: int) -> list[tuple[int, int]]:
    """The slot ranges ``redis-cli --cluster create`` gives ``masters`` masters: contiguous,
    as even as integers allow."""
    per = TOTAL_SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


# -- creating ----------------------------------------------------------------------------------


def create(
    masters: Sequence[Address],
    replicas: Sequence[Address] = (),
    *,
    redis_cli: str = "redis-cli",
    timeout_s: float = CREATE_TIMEOUT_S,
) -> None:
    """Make a cluster of fresh nodes: ``masters`` share the slots evenly, ``replicas`` are
    spread over them (one each when there are as many). Three masters or more go through
    ``redis-cli --cluster create``, as an operator would; Redis refuses that below three, so one
    or two masters (benchmarks) are joined by hand with the same slot split.

    Returns once every node agrees on the slot map (see :func:`wait_settled`)."""
    if not masters:
        raise ClusterError("a cluster needs at least one master")
    if len(replicas) % len(masters):
        raise ClusterError(f"{len(replicas)} replicas do not divide over {len(masters)} masters")
    per_master = len(replicas) // len(masters)
    if len(masters) >= 3:
        argv = [
            redis_cli,
            "--cluster",
            "create",
            *(f"{h}:{p}" for h, p in [*masters, *replicas]),
            "--cluster-replicas",
            str(per_master),
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"redis-cli --cluster create: {exc}") from exc
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise ClusterError(f"redis-cli --cluster create failed (rc {done.returncode}):\n{tail}")
    else:
        _create_by_hand(masters, replicas, per_master, timeout_s)
    wait_settled([*masters, *replicas], timeout_s)


def _create_by_hand(
    masters: Sequence[Address], replicas: Sequence[Address], per_master: int, timeout_s: float
) -> None:
    every = [*masters, *replicas]
    ids = {a: _text(_run(a, "CLUSTER", "MYID")) for a in every}
    for epoch, (address, (start, end)) in enumerate(
        zip(masters, split_slots(len(masters)), strict=True), start=1
    ):
        _run(address, "CLUSTER", "ADDSLOTSRANGE", start, end)
        # Distinct epochs from the start, as redis-cli sets them: no collision to resolve.
        _run(address, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
    first = every[0]
    bus = {a: _bus_port(a) for a in every}
    for address in every[1:]:
        _run(address, "CLUSTER", "MEET", first[0], first[1], bus[first])
    deadline = time.monotonic() + timeout_s
    for index, replica in enumerate(replicas):
        master = masters[index // per_master]
        # REPLICATE needs the master known to the replica: wait for the gossip.
        while (view := cluster_nodes(replica)) is None or view.by_id(ids[master]) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{replica[0]}:{replica[1]} never learnt of {master}")
            time.sleep(POLL_S)
        _run(replica, "CLUSTER", "REPLICATE", ids[master])


def _bus_port(address: Address) -> int:
    view = cluster_nodes(address)
    me = None if view is None else view.myself
    if me is None:
        raise ClusterError(f"{address[0]}:{address[1]}: no answer to CLUSTER NODES")
    return me.bus_port


# -- waiting until it has settled -------------------------------------------------------------


def unsettled(addresses: Sequence[Address], *, replicas_in_sync: bool = False) -> str | None:
    """Why the cluster of the running nodes ``addresses`` is not settled, or None when it is:
    every one says ``cluster_state:ok`` with all slots served, they all agree on the slot
    map and on who replicates whom, and every slot's master is one of them. With
    ``replicas_in_sync`` also: every node that serves no slot is a replica whose replication
    link to a serving master is up (so ``WAIT 1`` can succeed everywhere)."""
    if not addresses:
        return "no running node"
    maps: dict[Address, tuple[tuple[int, int, Address], ...]] = {}
    shapes: dict[Address, tuple[tuple[Address, str, Address | None, bool], ...]] = {}
    views: dict[Address, ClusterView] = {}
    for address in addresses:
        info = cluster_info(address)
        if info is None:
            return f"{address[0]}:{address[1]} does not answer"
        if info.get("cluster_state") != "ok":
            return f"{address[0]}:{address[1]} says cluster_state:{info.get('cluster_state')}"
        if info.get("cluster_slots_ok") != str(TOTAL_SLOTS):
            return f"{address[0]}:{address[1]} has {info.get('cluster_slots_ok')} slots ok"
        view = cluster_nodes(address)
        if view is None:
            return f"{address[0]}:{address[1]} does not answer"
        views[address] = view
        maps[address] = view.slot_map()
        shapes[address] = view.shape()
    first, *others = addresses
    for address in others:
        if maps[address] != maps[first]:
            return f"{address[0]}:{address[1]} and {first[0]}:{first[1]} see other slot maps"
        if shapes[address] != shapes[first]:
            return f"{address[0]}:{address[1]} and {first[0]}:{first[1]} see other replicas"
    owners = {owner for _, _, owner in maps[first]}
    stray = owners - set(addresses)
    if stray:
        return "slots served by a node that is not running: " + ", ".join(
            f"{h}:{p}" for h, p in sorted(stray)
        )
    for view in views.values():
        for node in view.nodes:
            if node.migrating or node.importing:
                return f"{node.address[0]}:{node.address[1]} is moving a slot"
    if replicas_in_sync:
        for address in addresses:
            if address in owners:
                continue
            role = redis_ha.role(address)
            if role is None or role.kind != "replica" or role.primary not in owners:
                return f"{address[0]}:{address[1]} is not a replica of a master ({role})"
            if role.link != "connected":
                return f"{address[0]}:{address[1]} replication link is {role.link}"
    return None


def wait_settled(
    addresses: Sequence[Address], timeout_s: float, *, replicas_in_sync: bool = False
) -> None:
    """Poll :func:`unsettled` until it says settled; :class:`ClusterError` with the last
    reason at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (reason := unsettled(addresses, replicas_in_sync=replicas_in_sync)) is not None:
        if time.monotonic() > deadline:
            raise ClusterError(f"the cluster did not settle in {timeout_s:.0f} s: {reason}")
        time.sleep(POLL_S)


# -- planned changes ---------------------------------------------------------------------------


def migrate_slot(
    addresses: Sequence[Address],
    slot: int,
    to: Address,
    *,
    batch: int = 100,
    timeout_ms: int = MIGRATE_TIMEOUT_MS,
) -> Address:
    """Move ``slot`` to the master at ``to`` while clients keep using it, the way
    ``redis-cli --cluster reshard`` moves each slot (it cannot be told which slot): IMPORTING on
    the target, MIGRATING on the source, MIGRATE the keys in batches (clients meanwhile get ASK
    for keys already moved, TRYAGAIN for a multi-key command split between the two), then
    SETSLOT NODE on the target, the source and every other master. Returns the old owner."""
    view = first_view(addresses)
    if view is None:
        raise ClusterError("no node answers CLUSTER NODES")
    source = view.owner(slot)
    target = view.by_address(to)
    if source is None:
        raise ClusterError(f"slot {slot} has no owner")
    if target is None or not target.is_master:
        raise ClusterError(f"{to[0]}:{to[1]} is not a master of this cluster")
    if source.id == target.id:
        return source.address
    src, dst = source.address, target.address
    _run(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
    _run(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
    timeout_s = timeout_ms / 1000 + 5
    while keys := _run(src, "CLUSTER", "GETKEYSINSLOT", slot, batch):
        _run(src, "MIGRATE", dst[0], dst[1], "", 0, timeout_ms, "KEYS", *keys, timeout_s=timeout_s)
    # The target first: once it owns the slot, a client redirected there is served.
    _run(dst, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
    _run(src, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
    for master in view.masters():
        if master.id not in (source.id, target.id):
            # The others learn it by gossip too; telling them saves a round of MOVED.
            redis_ha.ask(master.address, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
    return src


def failover(replica: Address, option: str | None = None) -> None:
    """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica. Without an option the master is
    asked to stop writes until the replica has caught up: a planned switch loses nothing."""
    words: list[str | int] = ["CLUSTER", "FAILOVER"]
    if option is not None:
        if option.upper() not in ("FORCE", "TAKEOVER"):
            raise ClusterError(f"CLUSTER FAILOVER takes FORCE or TAKEOVER, not {option!r}")
        words.append(option.upper())
    _run(replica, *words)
