"""Redis Cluster settings and slot routing without a server: the ``redis+cluster://`` URL, the
slot map read from ``CLUSTER SLOTS``, and which client a slot goes to. The same code against
a real cluster: tests/integration/test_cluster_mode.py."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import AskError, MovedError, ResponseError

from shared.contract import CLUSTER_SLOTS, partition_slot
from shared.errors import SettingsError
from shared.redis_client import make_redis
from shared.redis_nodes import ClusterNodes, SingleNode, SlotMap, make_nodes, raise_redirects
from shared.settings import (
    ClusterTarget,
    EdgeSettings,
    IngestSettings,
    RedisSettings,
    parse_cluster_url,
)
from shared.settings_env import mask_url

CLUSTER_URL = "redis+cluster://crm:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"


def test_a_cluster_url_names_its_seeds_and_the_login() -> None:
    got = parse_cluster_url(CLUSTER_URL)

    assert got == ClusterTarget(
        seeds=(("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)),
        username="crm",
        password="s3cret",
        tls=False,
    )
    assert "s3cret" not in repr(got)
    assert parse_cluster_url("rediss+cluster://h:1/") == ClusterTarget((("h", 1),), tls=True)
    assert RedisSettings(url=CLUSTER_URL).cluster == got
    assert RedisSettings(url=CLUSTER_URL).sentinel is None
    assert RedisSettings(url="redis://h:6379/0").cluster is None


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis+cluster://u:s3cret@", id="no-hosts"),
        pytest.param("redis+cluster://u:s3cret@h1", id="no-port"),
        pytest.param("redis+cluster://u:s3cret@h1:7000/0", id="a-database"),
        pytest.param("redis+cluster://u:s3cret@h1:x", id="port-not-a-number"),
        pytest.param("redis+cluster://u:s3cret@h1:1,h1:1", id="duplicate-node"),
        pytest.param("redis+cluster://u:s3cret@h1:1?x=1", id="query"),
        pytest.param("redis+cluster://u:s3cret@h_1:1", id="bad-host"),
        # A login without its "@" reads as host:port; the "port" must not be echoed.
        pytest.param("redis+cluster://default:s3cret", id="login-without-at"),
        pytest.param("redis+cluster://:s3cret", id="password-without-at"),
        pytest.param("redis+cluster://h:1,default:s3cret/", id="login-in-the-list"),
    ],
)
def test_a_bad_cluster_url_stops_the_start_naming_the_variable_not_the_password(url: str) -> None:
    for from_env in (EdgeSettings.from_env, IngestSettings.from_env):
        with pytest.raises(SettingsError) as info:
            from_env({"CRM_EVENTS_REDIS_URL": url, "CRM_EVENTS_AUTH_MODE": "off"})
        assert info.value.name == "CRM_EVENTS_REDIS_URL"
        assert "s3cret" not in str(info.value)


def test_a_cluster_url_is_read_from_the_environment_and_masked() -> None:
    got = IngestSettings.from_env({"CRM_EVENTS_REDIS_URL": CLUSTER_URL})
    assert got.redis.cluster is not None and len(got.redis.cluster.seeds) == 3
    assert "s3cret" not in repr(got)
    assert mask_url(CLUSTER_URL).startswith("redis+cluster://crm:***@10.0.0.1:7000,")


async def test_a_cluster_has_no_single_client_and_gets_one_per_master() -> None:
    settings = RedisSettings(url=CLUSTER_URL)
    with pytest.raises(ValueError, match="make_nodes"):
        make_redis(settings, "x")
    nodes = make_nodes(settings, "x")
    assert isinstance(nodes, ClusterNodes) and nodes.cluster
    single = make_nodes(RedisSettings(url="redis://127.0.0.1:1/0"), "x")
    assert isinstance(single, SingleNode) and not single.cluster
    assert single.client_for(0) is single.client_for(CLUSTER_SLOTS - 1)
    await nodes.aclose()
    await single.aclose()


def _slots_reply(*ranges: tuple[int, int, str, int]) -> list[list[object]]:
    return [
        [s, e, [h.encode(), p, b"id"], [h.encode(), p + 3, b"replica"]] for s, e, h, p in ranges
    ]


def test_the_slot_map_routes_every_slot_to_its_master() -> None:
    slot_map = SlotMap.parse(
        _slots_reply((10923, 16383, "h", 7002), (0, 5460, "h", 7000), (5461, 10922, "h", 7001))
    )
    assert slot_map.covered() == CLUSTER_SLOTS
    assert slot_map.owner(0) == ("h", 7000)
    assert slot_map.owner(5460) == ("h", 7000)
    assert slot_map.owner(5461) == ("h", 7001)
    assert slot_map.owner(16383) == ("h", 7002)
    assert slot_map.masters() == {("h", 7000), ("h", 7001), ("h", 7002)}
    assert slot_map.ranges_of(("h", 7001)) == [(5461, 10922)]
    holes = SlotMap.parse(_slots_reply((0, 99, "h", 1), (200, 299, "h", 1)))
    assert holes.owner(150) is None and holes.owner(300) is None and holes.covered() == 200


async def test_clients_follow_the_slot_map_one_per_master() -> None:
    nodes = ClusterNodes(
        RedisSettings(url=CLUSTER_URL), parse_cluster_url(CLUSTER_URL), "test:reads"
    )
    nodes._adopt(
        SlotMap.parse(_slots_reply((0, 8191, "127.0.0.1", 7000), (8192, 16383, "127.0.0.1", 7001)))
    )
    by_master: dict[int, set[int]] = {}
    for p in range(12):
        client = nodes.client_for(partition_slot(p))
        assert isinstance(client, Redis)
        by_master.setdefault(id(client), set()).add(p)
    assert sorted(len(ps) for ps in by_master.values()) == [6, 6]  # the tags spread them
    assert len(nodes.clients()) == 2
    assert nodes.pubsub_client_of(("127.0.0.1", 7000), "sub") is not nodes.client_of(
        ("127.0.0.1", 7000)
    )
    await nodes.aclose()


def test_a_redirect_in_pipeline_replies_is_raised_other_errors_are_not() -> None:
    raise_redirects([b"ok", ResponseError("WRONGTYPE"), None])
    with pytest.raises(MovedError):
        raise_redirects([b"ok", MovedError("3999 127.0.0.1:7001")])
    with pytest.raises(AskError):
        raise_redirects([AskError("3999 127.0.0.1:7001")])
