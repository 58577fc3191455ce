"""edge/limits.py and shared/breaker.py: each limit answers as specified and is counted;
the breaker moves closed -> open -> half-open -> closed."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter

from edge.limits import ConnectionLimiter, RateLimiter, TrustedProxies, client_ip
from shared.breaker import BreakerMetrics, CircuitBreaker, State
from shared.errors import SettingsError
from shared.httpkit import ApiError
from shared.security_settings import AuthSettings, KafkaSecurity, LimitSettings
from shared.settings_env import Env


def counter() -> tuple[Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    return Counter("rejected", "test", ["limit"], registry=registry), registry


def rejected(registry: CollectorRegistry, limit: str) -> float:
    return registry.get_sample_value("rejected_total", {"limit": limit}) or 0.0


def test_connection_caps_total_and_per_ip() -> None:
    c, registry = counter()
    limiter = ConnectionLimiter(max_total=3, max_per_ip=2, rejected=c)
    limiter.acquire("10.0.0.1")
    limiter.acquire("10.0.0.1")
    with pytest.raises(ApiError) as per_ip:
        limiter.acquire("10.0.0.1")
    assert (per_ip.value.status, per_ip.value.code) == (429, "too_many_connections")
    limiter.acquire("10.0.0.2")
    with pytest.raises(ApiError) as full:
        limiter.acquire("10.0.0.3")
    assert (full.value.status, full.value.code) == (503, "edge_full")
    assert full.value.headers["Retry-After"]
    limiter.release("10.0.0.1")
    limiter.acquire("10.0.0.3")
    assert rejected(registry, "connections_per_ip") == 1
    assert rejected(registry, "connections") == 1


def test_history_token_bucket() -> None:
    c, registry = counter()
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, rejected=c, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(ApiError) as caught:
        limiter.take("a")
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    assert int(caught.value.headers["Retry-After"]) >= 1
    limiter.take("b")  # another client has its own bucket
    now[0] += 0.5  # one token back at 2/s
    limiter.take("a")
    assert rejected(registry, "history_rate") == 1


def test_client_ip_reads_every_forwarded_line() -> None:
    # A client's own X-Forwarded-For line comes first; a proxy that adds a line of its own
    # puts the real peer last.
    headers = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.7")])
    request = make_mocked_request("GET", "/", headers=headers)
    request._transport_peername = ("127.0.0.1", 1234)  # type: ignore[attr-defined]
    assert client_ip(request, TrustedProxies(frozenset({"127.0.0.1"}))) == "198.51.100.7"


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", "", "203.0.113.9"),
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # untrusted peer: header ignored
        ("127.0.0.1", "198.51.100.7", "198.51.100.7"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # left entries are spoofable
        ("127.0.0.1", "", "127.0.0.1"),
    ],
)
def test_client_ip_behind_the_load_balancer(peer: str, forwarded: str, expected: str) -> None:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("GET", "/", headers=headers)
    request._transport_peername = (peer, 1234)  # type: ignore[attr-defined]
    trusted = TrustedProxies(frozenset({"127.0.0.1", "::1"}))
    assert client_ip(request, trusted) == expected
    assert client_ip(request, trusted) == expected  # the remembered answer is the same


def test_breaker_cycle() -> None:
    now = [0.0]
    b = CircuitBreaker(
        "redis",
        BreakerMetrics(CollectorRegistry()),
        failures=2,
        reset_s=1.0,
        max_reset_s=8.0,
        clock=lambda: now[0],
    )
    assert b.closed and b.wait_s() == 0
    b.failure()
    assert b.closed
    b.failure()
    assert b.state is State.OPEN and 0.5 <= b.wait_s() <= 1.0
    now[0] += 1.0
    assert b.wait_s() == 0 and b.state is State.HALF_OPEN
    b.failure()  # the probe failed: open again, for longer
    assert b.state is State.OPEN and b.wait_s() > 0.9
    now[0] += 2.0
    assert b.wait_s() == 0
    b.success()
    assert b.closed


def test_auth_defaults_to_jwt_and_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        AuthSettings.from_env(Env({}))
    assert str(caught.value).startswith("CRM_EVENTS_AUTH_MODE")
    assert AuthSettings.from_env(Env({"CRM_EVENTS_AUTH_MODE": "off"})).enabled is False
    short = tmp_path / "short"
    short.write_text("tooshort")
    with pytest.raises(SettingsError, match="CRM_EVENTS_JWT_SECRET_FILE"):
        AuthSettings.from_env(Env({"CRM_EVENTS_JWT_SECRET_FILE": str(short)}))
    good = tmp_path / "good"
    good.write_text("k" * 40 + "\n")
    settings = AuthSettings.from_env(Env({"CRM_EVENTS_JWT_SECRET_FILE": str(good)}))
    assert settings.secret == "k" * 40 and settings.algorithms == ["HS256"]
    assert "k" * 40 not in repr(settings)
    with pytest.raises(SettingsError, match="CRM_EVENTS_JWT_SECRET_FILE"):
        AuthSettings.from_env(Env({"CRM_EVENTS_JWT_SECRET_FILE": str(tmp_path / "missing")}))


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"CRM_EVENTS_CORS_ORIGINS": "example.com"}, "CRM_EVENTS_CORS_ORIGINS"),
        ({"CRM_EVENTS_TRUSTED_PROXIES": "not-an-ip"}, "CRM_EVENTS_TRUSTED_PROXIES"),
        ({"CRM_EVENTS_MAX_CONNECTIONS": "0"}, "CRM_EVENTS_MAX_CONNECTIONS"),
        ({"CRM_EVENTS_HISTORY_RATE_PER_S": "fast"}, "CRM_EVENTS_HISTORY_RATE_PER_S"),
    ],
)
def test_limit_settings_errors_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as caught:
        LimitSettings.from_env(Env(env))
    assert str(caught.value).startswith(name)


def test_kafka_security_passes_sasl_through(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("hunter2")
    sec = KafkaSecurity.from_env(
        Env(
            {
                "CRM_EVENTS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
                "CRM_EVENTS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "CRM_EVENTS_KAFKA_SASL_USERNAME": "ingest",
                "CRM_EVENTS_KAFKA_SASL_PASSWORD_FILE": str(password),
            }
        )
    )
    assert (sec.protocol, sec.sasl_mechanism, sec.sasl_username, sec.sasl_password) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "ingest",
        "hunter2",
    )
    assert "hunter2" not in repr(sec)
    with pytest.raises(SettingsError, match="CRM_EVENTS_KAFKA_SASL_USERNAME"):
        KafkaSecurity.from_env(Env({"CRM_EVENTS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}))
