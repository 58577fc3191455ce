"""Redis URLs and the clients built from them: ``redis+sentinel://`` parsing, its settings errors,
masking, and the options ``make_redis`` hands to redis-py (no network: nothing connects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from shared.errors import SettingsError
from shared.redis_client import SentinelRedis, make_redis
from shared.settings import (
    EdgeSettings,
    IngestSettings,
    RedisSettings,
    SentinelTarget,
    mask_url,
    parse_sentinel_url,
)

SENTINEL_URL = "redis+sentinel://crm:s3cret@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/crm/2"


def test_a_sentinel_url_names_every_sentinel_the_service_the_db_and_the_login() -> None:
    got = parse_sentinel_url(SENTINEL_URL)

    assert got == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)),
        service="crm",
        db=2,
        username="crm",
        password="s3cret",
        tls=False,
    )
    assert "s3cret" not in repr(got)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis+sentinel://h1/svc",
            SentinelTarget((("h1", 26379),), "svc"),
            id="default-port-and-db",
        ),
        pytest.param(
            "rediss+sentinel://:p%40ss@h1:1,h2:2/svc/0",
            SentinelTarget((("h1", 1), ("h2", 2)), "svc", 0, None, "p@ss", tls=True),
            id="tls-password-only-percent-encoded",
        ),
        pytest.param(
            "REDIS+SENTINEL://user@h1:26379/svc",
            SentinelTarget((("h1", 26379),), "svc", 0, "user", None),
            id="user-without-password",
        ),
    ],
)
def test_sentinel_url_forms(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected


BAD_URLS = [
    pytest.param("redis+sentinel://u:s3cret@/svc", id="no-hosts"),
    pytest.param("redis+sentinel://u:s3cret@h1:26379", id="no-service"),
    pytest.param("redis+sentinel://u:s3cret@h1:26379/", id="empty-service"),
    pytest.param("redis+sentinel://u:s3cret@h1:26379/svc/x", id="db-not-a-number"),
    pytest.param("redis+sentinel://u:s3cret@h1:26379/svc/0/more", id="extra-segment"),
    pytest.param("redis+sentinel://u:s3cret@h1:port/svc", id="port-not-a-number"),
    pytest.param("redis+sentinel://u:s3cret@h1:70000/svc", id="port-out-of-range"),
    pytest.param("redis+sentinel://u:s3cret@h1:1,h1:1/svc", id="duplicate-sentinel"),
    pytest.param("redis+sentinel://u:s3cret@h1:1,/svc", id="empty-host-in-list"),
    pytest.param("redis+sentinel://u:s3cret@h_1:1/svc", id="bad-host"),
    pytest.param("redis+sentinel://u:s3cret@h1:1/svc?ssl=1", id="query"),
    pytest.param("redis+sentinel://u:s3cret@h1:1/sv c", id="bad-service"),
    pytest.param("redis+sentinel://u:s3cret@[::1/svc", id="unclosed-ipv6"),
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_sentinel_url_stops_the_start_naming_the_variable_not_the_password(
    url: str,
) -> None:
    for from_env in (EdgeSettings.from_env, IngestSettings.from_env):
        with pytest.raises(SettingsError) as info:
            from_env({"CRM_EVENTS_REDIS_URL": url, "CRM_EVENTS_AUTH_MODE": "off"})

        assert info.value.name == "CRM_EVENTS_REDIS_URL"
        assert str(info.value).startswith("CRM_EVENTS_REDIS_URL: ")
        assert "s3cret" not in str(info.value)


def test_a_sentinel_url_is_read_from_the_environment_and_masked_in_repr() -> None:
    got = EdgeSettings.from_env(
        {"CRM_EVENTS_REDIS_URL": SENTINEL_URL, "CRM_EVENTS_AUTH_MODE": "off"}
    )

    assert got.redis.url == SENTINEL_URL
    assert got.redis.sentinel is not None and got.redis.sentinel.service == "crm"
    assert "s3cret" not in repr(got)
    assert "crm:***@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/crm/2" in repr(got)
    assert mask_url(SENTINEL_URL) == (
        "redis+sentinel://crm:***@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/crm/2"
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
        (
            "redis://u:pw@h:6379/0?db=1&Password=x&socket_timeout=2",
            "redis://u:***@h:6379/0?db=1&Password=***&socket_timeout=2",
        ),
        ("redis://h:6379/0?password=", "redis://h:6379/0?password="),
        ("redis://h:6379/0?passwords=x", "redis://h:6379/0?passwords=x"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_a_password_in_the_query_is_masked_too(url: str, masked: str) -> None:
    """redis-py takes a password from the query as well as from the user info; neither may
    reach a log line."""
    assert mask_url(url) == masked
    got = EdgeSettings.from_env({"CRM_EVENTS_REDIS_URL": url, "CRM_EVENTS_AUTH_MODE": "off"})
    assert "hunter2" not in repr(got)


def test_a_direct_url_has_no_sentinel_target() -> None:
    assert RedisSettings(url="redis://h:6379/0").sentinel is None


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    return str(path)


@pytest.mark.parametrize(
    "var", ["CRM_EVENTS_REDIS_SENTINEL_PASSWORD_FILE", "CRM_EVENTS_REDIS_SENTINEL_USERNAME"]
)
def test_sentinel_login_without_a_sentinel_url_is_refused(tmp_path: Path, var: str) -> None:
    value = secret_file(tmp_path, "pw", "x") if var.endswith("_FILE") else "someone"
    with pytest.raises(SettingsError) as info:
        EdgeSettings.from_env(
            {"CRM_EVENTS_REDIS_URL": "redis://h:6379/0", var: value, "CRM_EVENTS_AUTH_MODE": "off"}
        )

    assert info.value.name == var


def sentinel_settings(tmp_path: Path, url: str = SENTINEL_URL, **extra: str) -> RedisSettings:
    env = {"CRM_EVENTS_REDIS_URL": url, "CRM_EVENTS_REDIS_TIMEOUT_S": "3", **extra}
    return IngestSettings.from_env(env).redis


def pool_kwargs(client: Any) -> dict[str, Any]:
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    return dict(pool.connection_kwargs)


async def test_make_redis_binds_a_client_to_the_services_primary_with_todays_options(
    tmp_path: Path,
) -> None:
    settings = sentinel_settings(
        tmp_path,
        CRM_EVENTS_REDIS_SENTINEL_USERNAME="watcher",
        CRM_EVENTS_REDIS_SENTINEL_PASSWORD_FILE=secret_file(tmp_path, "spw", "sentinel-pw"),
    )
    client = make_redis(settings, "edge-1:reads")
    pubsub_client = make_redis(settings, "edge-1:subscription", for_pubsub=True)
    try:
        assert isinstance(client, SentinelRedis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "crm" and pool.is_master
        kw = pool_kwargs(client)
        assert kw["client_name"] == "edge-1:reads"
        assert kw["socket_timeout"] == 3.0 and kw["socket_connect_timeout"] == 3.0
        assert kw["socket_keepalive"] is True and kw["decode_responses"] is False
        assert (kw["db"], kw["username"], kw["password"]) == (2, "crm", "s3cret")
        assert pool.connection_class.__name__ == "SentinelManagedConnection"
        assert kw["retry"].get_retries() > 0

        sub = pool_kwargs(pubsub_client)
        assert sub["client_name"] == "edge-1:subscription"
        assert sub["socket_timeout"] is None  # waits for messages indefinitely

        # The Sentinels get their own login, and always a read timeout.
        assert client.owned_sentinel is not None and pubsub_client.owned_sentinel is not None
        for owned in (client.owned_sentinel, pubsub_client.owned_sentinel):
            addresses = [
                (
                    s.connection_pool.connection_kwargs["host"],
                    s.connection_pool.connection_kwargs["port"],
                )
                for s in owned.sentinels
            ]
            assert addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)]
            skw = owned.sentinels[0].connection_pool.connection_kwargs
            assert (skw["username"], skw["password"]) == ("watcher", "sentinel-pw")
            assert skw["socket_timeout"] == 3.0
        assert "s3cret" not in repr(client) and "sentinel-pw" not in repr(client)
    finally:
        await client.aclose()
        await pubsub_client.aclose()


async def test_the_password_file_wins_over_the_urls_password(tmp_path: Path) -> None:
    settings = sentinel_settings(
        tmp_path, CRM_EVENTS_REDIS_PASSWORD_FILE=secret_file(tmp_path, "pw", "from-file")
    )
    client = make_redis(settings, "n")
    try:
        assert pool_kwargs(client)["password"] == "from-file"
    finally:
        await client.aclose()


async def test_rediss_sentinel_uses_tls_to_the_sentinels_and_the_servers(tmp_path: Path) -> None:
    ca = secret_file(tmp_path, "ca.crt", "not parsed until a connection is made")
    settings = sentinel_settings(
        tmp_path,
        url="rediss+sentinel://h1:26379/crm",
        CRM_EVENTS_REDIS_TLS_CA_FILE=ca,
    )
    client = make_redis(settings, "n")
    try:
        pool = client.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        assert pool_kwargs(client)["ssl_ca_certs"] == ca
        assert isinstance(client, SentinelRedis) and client.owned_sentinel is not None
        sentinel_pool = client.owned_sentinel.sentinels[0].connection_pool
        assert issubclass(sentinel_pool.connection_class, SSLConnection)
        assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == ca
    finally:
        await client.aclose()


async def test_a_direct_url_still_gives_a_plain_client(tmp_path: Path) -> None:
    client = make_redis(RedisSettings(url="redis://h:6379/3"), "n", for_pubsub=True)
    try:
        assert not isinstance(client, SentinelRedis)
        kw = client.connection_pool.connection_kwargs
        assert (kw["host"], kw["db"], kw["client_name"], kw["socket_timeout"]) == (
            "h",
            3,
            "n",
            None,
        )
    finally:
        await client.aclose()
