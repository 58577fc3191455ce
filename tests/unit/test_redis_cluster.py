"""devtools.redis_cluster without servers: reading CLUSTER NODES and nodes.conf, the node's
configuration file, the slot split. The same functions against real nodes:
tests/integration/test_cluster_backend.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from devtools import redis_cluster

A = "a" * 40
B = "b" * 40
C = "c" * 40
D = "d" * 40

# CLUSTER NODES of a node mid-way through moving slot 42 from A to B, with C's master (A)
# failed over to D: C is flagged failed and serves nothing.
NODES_TEXT = f"""\
{A} 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-41 43-5460 [42->-{B}]
{B} 127.0.0.1:7001@17001,node-b master - 0 1700000000000 2 connected 5461-10922 [42-<-{A}]
{C} 127.0.0.1:7002@17002 master,fail - 1700000000000 1700000000000 3 disconnected
{D} 127.0.0.1:7003@17003 master - 0 1700000000000 4 connected 10923-16383
e{"e" * 39} 127.0.0.1:7004@17004 slave {A} 0 1700000000000 1 connected
f{"f" * 39} 127.0.0.1:7005@17005 slave,fail? {B} 0 1700000000000 2 connected
"""


def view() -> redis_cluster.ClusterView:
    return redis_cluster.ClusterView(
        ("127.0.0.1", 7000), tuple(redis_cluster.parse_nodes(NODES_TEXT))
    )


def test_cluster_nodes_are_parsed_with_slots_moves_and_flags() -> None:
    v = view()
    a = v.by_id(A)
    assert a is not None and a.myself and a.is_master and not a.failing
    assert a.address == ("127.0.0.1", 7000) and a.bus_port == 17000
    assert a.slots == ((0, 41), (43, 5460)) and a.slot_count == 5460
    assert a.migrating == ((42, B),) and a.importing == ()
    b = v.by_address(("127.0.0.1", 7001))
    assert b is not None and b.importing == ((42, A),) and b.bus_port == 17001
    c = v.by_id(C)
    assert c is not None and c.failing and c.slots == () and c.link == "disconnected"
    replica = v.by_address(("127.0.0.1", 7004))
    assert replica is not None and replica.is_replica and v.master_of(replica) == a
    assert [r.address for r in v.replicas_of(a)] == [("127.0.0.1", 7004)]
    f = v.by_address(("127.0.0.1", 7005))
    assert f is not None and f.failing  # "fail?" is a suspicion, still failing
    assert v.myself == a


def test_the_slot_map_lists_serving_masters_in_slot_order() -> None:
    v = view()
    assert [n.address[1] for n in v.masters()] == [7000, 7001, 7003]
    assert v.owner(0) == v.by_id(A) and v.owner(42) is None
    assert v.owner(5461) == v.by_id(B) and v.owner(16383) == v.by_id(D)
    assert v.assigned == redis_cluster.TOTAL_SLOTS - 1
    assert v.slot_map()[:2] == ((0, 41, ("127.0.0.1", 7000)), (43, 5460, ("127.0.0.1", 7000)))


def test_slots_split_as_redis_cli_splits_them() -> None:
    assert redis_cluster.split_slots(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert redis_cluster.split_slots(1) == [(0, 16383)]
    two = redis_cluster.split_slots(2)
    assert two == [(0, 8191), (8192, 16383)]
    for n in range(1, 9):
        ranges = redis_cluster.split_slots(n)
        assert ranges[0][0] == 0 and ranges[-1][1] == 16383
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))


def test_ranges_are_shown_compactly() -> None:
    assert redis_cluster.format_ranges([(0, 5460)]) == "0-5460"
    assert redis_cluster.format_ranges([(0, 41), (42, 42)]) == "0-41,42"
    assert redis_cluster.format_ranges([(i, i) for i in range(6)]) == "0,1,2,3,+2 more"
    assert redis_cluster.format_ranges([]) == "none"


def test_a_node_file_names_its_own_address(tmp_path: Path) -> None:
    conf = tmp_path / "nodes.conf"
    assert redis_cluster.recorded_address(conf) is None
    conf.write_text(
        NODES_TEXT.replace("myself,master", "master").replace("slave,fail?", "myself,slave")
        + "vars currentEpoch 4 lastVoteEpoch 0\n"
    )
    assert redis_cluster.recorded_address(conf) == ("127.0.0.1", 7005)


@pytest.mark.parametrize("bus_port", [None, 31000])
def test_node_config_enables_cluster_mode_and_keeps_nodes_conf_beside_the_data(
    tmp_path: Path, bus_port: int | None
) -> None:
    text = redis_cluster.node_conf_text(
        7000, tmp_path, node_timeout_ms=2000, bus_port=bus_port, appendonly=False
    )
    lines = text.splitlines()
    assert "port 7000" in lines and f'dir "{tmp_path}"' in lines
    assert "cluster-enabled yes" in lines and "cluster-config-file nodes.conf" in lines
    assert "cluster-node-timeout 2000" in lines
    assert "appendonly no" in lines and 'save ""' in lines
    assert ("cluster-port 31000" in lines) == (bus_port is not None)
    assert not any(line.startswith("cluster-port") for line in lines if bus_port is None)


def test_hash_tags_decide_the_slot() -> None:
    assert redis_cluster.key_slot(b"{p7}:stream") == redis_cluster.key_slot(b"{p7}:meta")
    assert redis_cluster.key_slot(b"{p7}:stream") == redis_cluster.key_slot(b"p7")
    # The well-known value from the cluster specification.
    assert redis_cluster.key_slot(b"123456789") == 12739
