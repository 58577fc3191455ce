"""shared.settings: defaults from an empty mapping, one clear error per malformed value, and
no password in any repr."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from devtools.pki import LocalCA
from shared import settings as s
from shared.errors import SettingsError
from shared.security_settings import AuthSettings
from shared.settings import EdgeSettings, IngestSettings, RedisSettings, mask_url


def edge_from_env(env: Mapping[str, str]) -> EdgeSettings:
    """``EdgeSettings.from_env`` with auth off: auth defaults to jwt and needs a key, which
    tests/unit/test_security_settings.py covers."""
    return EdgeSettings.from_env({"CRM_EVENTS_AUTH_MODE": "off", **env})


FromEnv = Callable[[Mapping[str, str]], Any]


def test_redis_defaults() -> None:
    redis = RedisSettings()

    assert redis.url == s.DEFAULT_REDIS_URL
    assert redis.prefix == s.DEFAULT_REDIS_PREFIX
    assert redis.timeout_s == s.DEFAULT_REDIS_TIMEOUT_S


def test_ingest_defaults_from_an_empty_mapping() -> None:
    got = IngestSettings.from_env({})

    assert got.redis == RedisSettings()
    assert got.node_id.startswith("ingest-")
    assert (
        got.log_level,
        got.kafka_bootstrap,
        got.kafka_topic,
        got.kafka_group,
        got.kafka_partitions,
        got.kafka_replication_factor,
        got.host,
        got.port,
        got.batch_max_records,
        got.poll_timeout_ms,
        got.stream_maxlen,
        got.dead_maxlen,
        got.event_max_bytes,
        got.type_fields,
        got.backoff_max_s,
        got.redis_wait_replicas,
        got.redis_wait_timeout_ms,
    ) == (
        "INFO",
        "127.0.0.1:9092",
        "aetherlink.events",
        "crm-events-ingest",
        3,
        1,
        "127.0.0.1",
        9020,
        s.DEFAULT_BATCH_MAX_RECORDS,
        s.DEFAULT_POLL_TIMEOUT_MS,
        s.DEFAULT_STREAM_MAXLEN,
        s.DEFAULT_DEAD_MAXLEN,
        s.DEFAULT_EVENT_MAX_BYTES,
        ("Type", "type", "eventType"),
        s.DEFAULT_BACKOFF_MAX_S,
        0,
        200,
    )


def test_edge_defaults_from_an_empty_mapping() -> None:
    got = edge_from_env({})

    assert got.redis == RedisSettings()
    assert got.node_id.startswith("edge-")
    assert (
        got.log_level,
        got.host,
        got.port,
        got.ping_interval_s,
        got.retry_ms,
        got.client_buffer_bytes,
        got.history_default_n,
        got.history_max_n,
        got.resume_page,
        got.replay_ring_bytes,
        got.history_cache_bytes,
        got.replay_cache_bytes,
        got.shutdown_grace_s,
        got.backoff_max_s,
    ) == (
        "INFO",
        "127.0.0.1",
        9011,
        15.0,
        s.DEFAULT_RETRY_MS,
        s.DEFAULT_CLIENT_BUFFER_BYTES,
        100,
        1000,
        s.DEFAULT_RESUME_PAGE,
        s.DEFAULT_REPLAY_RING_BYTES,
        32 * 1024 * 1024,
        24 * 1024 * 1024,
        s.DEFAULT_SHUTDOWN_GRACE_S,
        s.DEFAULT_BACKOFF_MAX_S,
    )


def test_default_cache_budgets_keep_an_edge_under_64_mib() -> None:
    got = edge_from_env({})

    assert got.history_cache_bytes + got.replay_cache_bytes < 64 * 1024 * 1024


def test_blank_values_count_as_unset() -> None:
    got = edge_from_env({"CRM_EVENTS_EDGE_PORT": "  ", "CRM_EVENTS_LOG_LEVEL": ""})

    assert got.port == s.DEFAULT_EDGE_PORT
    assert got.log_level == "INFO"


@pytest.mark.parametrize(
    ("from_env", "env", "attr", "expected"),
    [
        pytest.param(edge_from_env, {"EDGE_PORT": "0"}, "port", 0, id="port-0"),
        pytest.param(edge_from_env, {"EDGE_PORT": "65535"}, "port", 65535, id="port-max"),
        pytest.param(edge_from_env, {"EDGE_PORT": " 9100 "}, "port", 9100, id="port-ws"),
        pytest.param(edge_from_env, {"LOG_LEVEL": "debug"}, "log_level", "DEBUG", id="level-case"),
        pytest.param(
            edge_from_env,
            {"HISTORY_MAX_N": "10"},
            "history_default_n",
            10,
            id="default-n-follows-small-max",
        ),
        pytest.param(
            edge_from_env,
            {"HISTORY_CACHE_BYTES": "0"},
            "history_cache_bytes",
            0,
            id="history-cache-off",
        ),
        pytest.param(
            edge_from_env,
            {"REPLAY_CACHE_BYTES": "1048576"},
            "replay_cache_bytes",
            1 << 20,
            id="replay-cache-1mib",
        ),
        pytest.param(
            IngestSettings.from_env,
            {"EVENT_TYPE_FIELDS": " kind , Type "},
            "type_fields",
            ("kind", "Type"),
            id="type-fields",
        ),
        pytest.param(
            IngestSettings.from_env,
            {"KAFKA_BOOTSTRAP": "a:1, b.example:9093,[::1]:9094"},
            "kafka_bootstrap",
            "a:1, b.example:9093,[::1]:9094",
            id="bootstrap-list",
        ),
        pytest.param(
            IngestSettings.from_env,
            {"REDIS_WAIT_REPLICAS": "1"},
            "redis_wait_replicas",
            1,
            id="wait-one-replica",
        ),
        pytest.param(
            IngestSettings.from_env,
            {"REDIS_WAIT_TIMEOUT_MS": "1"},
            "redis_wait_timeout_ms",
            1,
            id="wait-timeout-min",
        ),
    ],
)
def test_good_values(from_env: FromEnv, env: dict[str, str], attr: str, expected: Any) -> None:
    got = from_env({s.ENV_PREFIX + k: v for k, v in env.items()})

    assert getattr(got, attr) == expected


EDGE = edge_from_env
INGEST = IngestSettings.from_env

BAD = [
    pytest.param(EDGE, {"EDGE_PORT": "abc"}, "EDGE_PORT", id="edge-port-abc"),
    pytest.param(EDGE, {"EDGE_PORT": "70000"}, "EDGE_PORT", id="edge-port-70000"),
    pytest.param(EDGE, {"EDGE_PORT": "-1"}, "EDGE_PORT", id="edge-port-negative"),
    pytest.param(EDGE, {"EDGE_PORT": "9011.5"}, "EDGE_PORT", id="edge-port-float"),
    pytest.param(EDGE, {"EDGE_PORT": "1\n2"}, "EDGE_PORT", id="edge-port-newline"),
    pytest.param(EDGE, {"REDIS_URL": "http://x"}, "REDIS_URL", id="redis-url-http"),
    pytest.param(EDGE, {"REDIS_URL": "redis://"}, "REDIS_URL", id="redis-url-no-host"),
    pytest.param(EDGE, {"REDIS_URL": "127.0.0.1:6379"}, "REDIS_URL", id="redis-url-no-scheme"),
    pytest.param(EDGE, {"REDIS_URL": "redis://h:port/0"}, "REDIS_URL", id="redis-url-bad-port"),
    pytest.param(EDGE, {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", id="log-level-loud"),
    pytest.param(
        EDGE, {"HISTORY_DEFAULT_N": "1001"}, "HISTORY_DEFAULT_N", id="default-n-over-default-max"
    ),
    pytest.param(
        EDGE,
        {"HISTORY_DEFAULT_N": "50", "HISTORY_MAX_N": "10"},
        "HISTORY_DEFAULT_N",
        id="default-n-over-max",
    ),
    pytest.param(EDGE, {"HISTORY_MAX_N": "0"}, "HISTORY_MAX_N", id="max-n-zero"),
    pytest.param(EDGE, {"REDIS_PREFIX": "crm events"}, "REDIS_PREFIX", id="prefix-space"),
    pytest.param(EDGE, {"REDIS_PREFIX": "crm/events"}, "REDIS_PREFIX", id="prefix-slash"),
    pytest.param(EDGE, {"SSE_PING_INTERVAL_S": "fast"}, "SSE_PING_INTERVAL_S", id="ping-fast"),
    pytest.param(EDGE, {"SSE_PING_INTERVAL_S": "nan"}, "SSE_PING_INTERVAL_S", id="ping-nan"),
    pytest.param(EDGE, {"CLIENT_BUFFER_BYTES": "10"}, "CLIENT_BUFFER_BYTES", id="buffer-tiny"),
    pytest.param(EDGE, {"NODE_ID": "edge 1"}, "NODE_ID", id="node-id-space"),
    pytest.param(EDGE, {"REPLAY_RING_BYTES": "-1"}, "REPLAY_RING_BYTES", id="ring-negative"),
    pytest.param(
        EDGE, {"HISTORY_CACHE_BYTES": "-1"}, "HISTORY_CACHE_BYTES", id="history-cache-negative"
    ),
    pytest.param(
        EDGE, {"HISTORY_CACHE_BYTES": "32MiB"}, "HISTORY_CACHE_BYTES", id="history-cache-unit"
    ),
    pytest.param(
        EDGE, {"REPLAY_CACHE_BYTES": str(1 << 40)}, "REPLAY_CACHE_BYTES", id="replay-cache-huge"
    ),
    pytest.param(
        EDGE, {"REPLAY_CACHE_BYTES": "1.5"}, "REPLAY_CACHE_BYTES", id="replay-cache-float"
    ),
    pytest.param(EDGE, {"REPLAY_RING_BYTES": "lots"}, "REPLAY_RING_BYTES", id="ring-word"),
    pytest.param(INGEST, {"KAFKA_BOOTSTRAP": "nohost"}, "KAFKA_BOOTSTRAP", id="bootstrap-nohost"),
    pytest.param(
        INGEST, {"KAFKA_BOOTSTRAP": "a:9092,nohost"}, "KAFKA_BOOTSTRAP", id="bootstrap-second-bad"
    ),
    pytest.param(INGEST, {"KAFKA_BOOTSTRAP": "a:9092,"}, "KAFKA_BOOTSTRAP", id="bootstrap-empty"),
    pytest.param(INGEST, {"KAFKA_TOPIC": "bad topic"}, "KAFKA_TOPIC", id="topic-space"),
    pytest.param(INGEST, {"EVENT_TYPE_FIELDS": "a,,b"}, "EVENT_TYPE_FIELDS", id="fields-empty"),
    pytest.param(INGEST, {"EVENT_TYPE_FIELDS": "a,"}, "EVENT_TYPE_FIELDS", id="fields-trailing"),
    pytest.param(INGEST, {"EVENT_TYPE_FIELDS": "a b"}, "EVENT_TYPE_FIELDS", id="fields-space"),
    pytest.param(INGEST, {"EVENT_TYPE_FIELDS": "1st"}, "EVENT_TYPE_FIELDS", id="fields-digit"),
    pytest.param(INGEST, {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", id="ingest-log-level"),
    pytest.param(INGEST, {"REDIS_URL": "http://x"}, "REDIS_URL", id="ingest-redis-url"),
    pytest.param(INGEST, {"EVENT_MAX_BYTES": "1"}, "EVENT_MAX_BYTES", id="max-bytes-tiny"),
    pytest.param(
        INGEST, {"REDIS_WAIT_REPLICAS": "-1"}, "REDIS_WAIT_REPLICAS", id="wait-replicas-negative"
    ),
    pytest.param(
        INGEST, {"REDIS_WAIT_REPLICAS": "one"}, "REDIS_WAIT_REPLICAS", id="wait-replicas-word"
    ),
    # WAIT with timeout 0 blocks forever: a batch would never come back.
    pytest.param(
        INGEST, {"REDIS_WAIT_TIMEOUT_MS": "0"}, "REDIS_WAIT_TIMEOUT_MS", id="wait-timeout-zero"
    ),
]


@pytest.mark.parametrize(("from_env", "env", "var"), BAD)
def test_malformed_value_raises_an_error_naming_the_variable(
    from_env: FromEnv, env: dict[str, str], var: str
) -> None:
    name = s.ENV_PREFIX + var

    with pytest.raises(SettingsError) as info:
        from_env({s.ENV_PREFIX + k: v for k, v in env.items()})

    assert info.value.name == name
    assert str(info.value).startswith(name + ": ")
    assert "\n" not in str(info.value)


def test_redis_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(SettingsError) as info:
        edge_from_env({"CRM_EVENTS_REDIS_URL": "redis://user:secret@host:port/0"})

    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        pytest.param(
            "redis://user:secret@host:6379/0", "redis://user:***@host:6379/0", id="user-password"
        ),
        pytest.param("redis://:secret@host/0", "redis://:***@host/0", id="password-only"),
        pytest.param("rediss://user:secret@host:6380/1", "rediss://user:***@host:6380/1", id="tls"),
        pytest.param("redis://host:6379/0", "redis://host:6379/0", id="no-password"),
        pytest.param(
            "redis://user:se@cret@host:6379/0", "redis://user:***@host:6379/0", id="at-in-password"
        ),
        pytest.param(
            "redis://user:secret@[::1]:6379/0", "redis://user:***@[::1]:6379/0", id="ipv6-host"
        ),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_redis_settings_repr_masks_the_password() -> None:
    text = repr(RedisSettings(url="redis://user:secret@host:6379/0"))

    assert "secret" not in text
    assert "redis://user:***@host:6379/0" in text


@pytest.mark.parametrize("from_env", [EDGE, INGEST], ids=["edge", "ingest"])
def test_settings_repr_as_printed_by_check_config_masks_the_password(from_env: FromEnv) -> None:
    got = from_env({"CRM_EVENTS_REDIS_URL": "redis://user:secret@host:6379/0"})

    assert got.redis.url == "redis://user:secret@host:6379/0"
    assert "secret" not in repr(got)
    assert "user:***@host" in repr(got)


# -- client certificates and the edge's own TLS (issue 16) -------------------------------------


def cert_env(tmp_path: Path, mode: str, **extra: str) -> dict[str, str]:
    secret = tmp_path / "secret"
    secret.write_text("k" * 40)
    grants = tmp_path / "grants.json"
    grants.write_text('{"rules": [{"uri": "spiffe://acme/x", "types": ["*"]}]}')
    return {
        "CRM_EVENTS_AUTH_MODE": mode,
        "CRM_EVENTS_JWT_SECRET_FILE": str(secret),
        "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE": str(grants),
        **{s.ENV_PREFIX + k: v for k, v in extra.items()},
    }


@pytest.mark.parametrize(
    ("mode", "tokens", "certs"),
    [
        ("jwt", True, False),
        ("cert", False, True),
        ("jwt-or-cert", True, True),
        ("JWT-AND-CERT", True, True),
        ("off", False, False),
    ],
)
def test_auth_modes(tmp_path: Path, mode: str, tokens: bool, certs: bool) -> None:
    auth = EdgeSettings.from_env(cert_env(tmp_path, mode)).auth
    assert (auth.mode, auth.tokens, auth.certs) == (mode.lower(), tokens, certs)
    assert auth.enabled is (mode != "off")
    assert auth.cert_header == "X-Client-Cert"
    # The grants file is kept only where certificates are read.
    assert (auth.cert_grants_file is not None) is certs


@pytest.mark.parametrize(
    ("mode", "drop", "var", "says"),
    [
        ("cert", "CLIENT_CERT_GRANTS_FILE", "CLIENT_CERT_GRANTS_FILE", "is required with"),
        ("jwt-or-cert", "CLIENT_CERT_GRANTS_FILE", "CLIENT_CERT_GRANTS_FILE", "cert"),
        ("jwt-and-cert", "JWT_SECRET_FILE", "AUTH_MODE", "jwt-and-cert needs"),
        ("jwt-or-cert", "JWT_SECRET_FILE", "AUTH_MODE", "jwt-or-cert needs"),
        ("mtls", "", "AUTH_MODE", "expected jwt, off, cert, jwt-or-cert or jwt-and-cert"),
    ],
)
def test_each_mode_needs_its_credentials(
    tmp_path: Path, mode: str, drop: str, var: str, says: str
) -> None:
    env = cert_env(tmp_path, mode)
    env.pop(s.ENV_PREFIX + drop, None)
    with pytest.raises(SettingsError) as info:
        EdgeSettings.from_env(env)
    assert info.value.name == s.ENV_PREFIX + var
    assert says in str(info.value)


def test_the_certificate_header_has_trusted_proxies_of_its_own(tmp_path: Path) -> None:
    default = EdgeSettings.from_env(cert_env(tmp_path, "cert"))
    assert default.auth.cert_trusted_proxies == frozenset({"127.0.0.1", "::1"})
    # Widening who may name the client in X-Forwarded-For does not widen who may relay a
    # certificate, nor the other way round.
    got = EdgeSettings.from_env(
        cert_env(
            tmp_path,
            "cert",
            TRUSTED_PROXIES="10.0.0.0/8",
            CLIENT_CERT_TRUSTED_PROXIES="10.0.0.5, fd00::5",
        )
    )
    assert got.limits.trusted_proxies == frozenset({"10.0.0.0/8"})
    assert got.auth.cert_trusted_proxies == frozenset({"10.0.0.5", "fd00::5"})


@pytest.mark.parametrize(
    ("mode", "proxies", "mutual", "refused"),
    [
        ("cert", ("10.0.0.0/8",), False, "'10.0.0.0/8' is a network"),
        ("jwt-and-cert", ("::1", "fd00::/127"), False, "'fd00::/127' is a network"),
        ("cert", ("10.0.0.0/8",), True, None),
        ("cert", ("10.0.0.5/32", "::1/128", "127.0.0.1"), False, None),
        ("jwt", ("10.0.0.0/8",), False, None),
        ("off", ("10.0.0.0/8",), False, None),
    ],
)
def test_a_cert_mode_refuses_a_network_of_relays_unless_the_edge_requires_mutual_tls(
    tmp_path: Path, mode: str, proxies: tuple[str, ...], mutual: bool, refused: str | None
) -> None:
    auth = AuthSettings(
        mode=mode,
        secret="k" * 40,
        cert_grants_file=str(tmp_path / "grants.json"),
        cert_trusted_proxies=frozenset(proxies),
    )
    if refused is None:
        auth.check_cert_proxies(mutual)
        return
    with pytest.raises(SettingsError) as info:
        auth.check_cert_proxies(mutual)
    assert info.value.name == "CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES"
    assert refused in str(info.value)
    assert "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE" in str(info.value)


def test_cert_mode_needs_no_jwt_key(tmp_path: Path) -> None:
    env = cert_env(tmp_path, "cert")
    del env["CRM_EVENTS_JWT_SECRET_FILE"]
    assert EdgeSettings.from_env(env).auth.certs


@pytest.mark.parametrize(
    ("extra", "var"),
    [
        ({"CLIENT_CERT_GRANTS_FILE": "/nonexistent/grants.json"}, "CLIENT_CERT_GRANTS_FILE"),
        ({"CLIENT_CERT_HEADER": "X Client Cert"}, "CLIENT_CERT_HEADER"),
        ({"CLIENT_CERT_HEADER": "Authorization"}, "CLIENT_CERT_HEADER"),
        ({"CLIENT_CERT_TRUSTED_PROXIES": "nginx.local"}, "CLIENT_CERT_TRUSTED_PROXIES"),
        ({"CLIENT_CERT_TRUSTED_PROXIES": "10.0.0.1/33"}, "CLIENT_CERT_TRUSTED_PROXIES"),
        ({"CLIENT_CERT_TRUSTED_PROXIES": "127.0.0.1,"}, "CLIENT_CERT_TRUSTED_PROXIES"),
    ],
)
def test_bad_certificate_settings_name_the_variable(
    tmp_path: Path, extra: dict[str, str], var: str
) -> None:
    with pytest.raises(SettingsError) as info:
        EdgeSettings.from_env(cert_env(tmp_path, "cert", **extra))
    assert info.value.name == s.ENV_PREFIX + var


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = LocalCA.open(tmp_path / "pki")
    edge = ca.issue_server("edge")
    stranger = ca.issue_server("stranger")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {
        "cert": str(edge.cert),
        "key": str(edge.key),
        "bundle": str(edge.bundle),
        "ca": str(ca.cert_path),
        "other_key": str(stranger.key),
        "garbage": str(garbage),
    }


def test_edge_tls_is_off_by_default_and_built_once_when_set(pki: dict[str, str]) -> None:
    assert edge_from_env({}).tls.context is None
    got = edge_from_env(
        {
            "CRM_EVENTS_EDGE_TLS_CERT_FILE": pki["cert"],
            "CRM_EVENTS_EDGE_TLS_KEY_FILE": pki["key"],
            "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE": pki["ca"],
        }
    )
    assert got.tls.enabled and got.tls.mutual
    assert got.tls.context is not None and got.tls.context.verify_mode == ssl.CERT_REQUIRED
    # A bundle holding the key too needs no key file; without a CA no client certificate.
    alone = edge_from_env({"CRM_EVENTS_EDGE_TLS_CERT_FILE": pki["bundle"]})
    assert alone.tls.context is not None and alone.tls.context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("given", "var", "says"),
    [
        ({"CLIENT_CA_FILE": "ca"}, "EDGE_TLS_CERT_FILE", "is required with"),
        ({"CERT_FILE": "garbage", "KEY_FILE": "key"}, "EDGE_TLS_CERT_FILE", "no PEM certificate"),
        ({"CERT_FILE": "cert", "KEY_FILE": "other_key"}, "EDGE_TLS_KEY_FILE", "matches"),
        ({"CERT_FILE": "cert", "KEY_FILE": "garbage"}, "EDGE_TLS_KEY_FILE", "no private key"),
        ({"CERT_FILE": "cert"}, "EDGE_TLS_CERT_FILE", "no private key"),
        (
            {"CERT_FILE": "cert", "KEY_FILE": "key", "CLIENT_CA_FILE": "garbage"},
            "EDGE_TLS_CLIENT_CA_FILE",
            "no PEM CA certificate",
        ),
        ({"CERT_FILE": "missing", "KEY_FILE": "key"}, "EDGE_TLS_CERT_FILE", "no such file"),
    ],
)
def test_bad_edge_tls_files_fail_naming_the_variable(
    pki: dict[str, str], given: dict[str, str], var: str, says: str
) -> None:
    env = {f"CRM_EVENTS_EDGE_TLS_{k}": pki.get(v, "/nonexistent/" + v) for k, v in given.items()}
    with pytest.raises(SettingsError) as info:
        edge_from_env(env)
    assert info.value.name == s.ENV_PREFIX + var
    assert says in str(info.value)
