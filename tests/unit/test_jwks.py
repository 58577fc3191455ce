"""edge/jwks.py and edge/oidc.py against a real JWKS/OIDC HTTP server in the test process:
keys fetched at start, an unknown kid refetched once (single-flight, rate-limited), a provider
that is down or sends bad documents never costs the keys held, keys the provider stops
publishing kept for the grace period, OIDC discovery checks the issuer, and the settings'
errors name the setting."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.auth import NO_KID, UNKNOWN_KID, Authenticator
from edge.bus_memory import MemoryBus
from edge.jwks import (
    MAX_KEYS,
    RETRY_MAX_UNLOADED_S,
    RemoteKeys,
    UnknownKid,
    parse_jwks,
    provider_session,
)
from edge.metrics import JwksMetrics
from edge.oidc import (
    MAX_BODY_BYTES,
    MAX_ERROR_CHARS,
    FetchError,
    KeySource,
    describe,
    get_json,
)
from shared.errors import SettingsError
from shared.httpkit import ApiError
from shared.security_settings import AuthSettings
from shared.settings import EdgeSettings, RedisSettings
from shared.settings_env import Env
from tests.waiting import eventually

ISSUER_PATH = "/realms/crm"
TOKEN_ISSUER = "https://idp.example.com/tenant-1/"
AUDIENCE = "crm-events"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
    if algorithm is not None:
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig"})
    if alg is not None:
        jwk["alg"] = alg
    return dict(jwk)


def token(key: Any, kid: str | None, alg: str, ttl: float = 600, **claims: object) -> str:
    """A token for this deployment (TOKEN_ISSUER, AUDIENCE) unless ``claims`` say otherwise;
    a claim given as None is left out."""
    body: dict[str, object] = {
        "exp": time.time() + ttl,
        "crm_types": ["A"],
        "iss": TOKEN_ISSUER,
        "aud": AUDIENCE,
        **claims,
    }
    body = {name: value for name, value in body.items() if value is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def hs256_by_hand(header: dict[str, str], secret: bytes) -> str:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
    body = b64(json.dumps({"exp": time.time() + 60, "crm_types": ["*"]}).encode())
    signature = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + signature).decode()


@dataclass
class Provider:
    """A JWKS server (and OIDC discovery) whose answers the test sets."""

    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    mode: str = "ok"
    """ok, error (HTTP 500), big (a body past the cap, chunked), big_declared (a
    Content-Length past the cap), bad_json, not_object, deep."""
    delay_s: float = 0.0
    issuer_claimed: str | None = None
    """The issuer the discovery document names (None: the server's true issuer)."""
    requests: Counter[str] = field(default_factory=Counter)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))[:-1]

    @property
    def issuer(self) -> str:
        return self.url + ISSUER_PATH

    def app(self) -> web.Application:
        async def jwks(request: web.Request) -> web.StreamResponse:
            self.requests["jwks"] += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.mode == "error":
                return web.Response(status=500, text="down")
            if self.mode == "bad_json":
                return web.Response(body=b"{not json", content_type="application/json")
            if self.mode == "not_object":
                return web.json_response([1, 2])
            if self.mode == "deep":
                # Nesting past the JSON parser's recursion limit (RecursionError, not
                # ValueError).
                return web.Response(body=b"[" * 200_000, content_type="application/json")
            if self.mode == "big_declared":
                return web.Response(body=b" " * (MAX_BODY_BYTES + 1))
            if self.mode == "big":
                # Chunked, no Content-Length: the reader must stop at the cap itself.
                response = web.StreamResponse()
                response.enable_chunked_encoding()
                await response.prepare(request)
                for _ in range(40):
                    await response.write(b" " * 65536)
                return response
            return web.json_response(self.jwks)

        async def discovery(_: web.Request) -> web.Response:
            self.requests["discovery"] += 1
            claimed = self.issuer_claimed if self.issuer_claimed is not None else self.issuer
            return web.json_response({"issuer": claimed, "jwks_uri": self.url + "/certs"})

        app = web.Application()
        app.router.add_get("/certs", jwks)
        app.router.add_get(ISSUER_PATH + "/.well-known/openid-configuration", discovery)
        return app


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    p = Provider()
    p.server = TestServer(p.app())
    await p.server.start_server()
    yield p
    await p.server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def fetches(registry: CollectorRegistry, result: str, reason: str) -> float:
    value = registry.get_sample_value(
        "crm_events_jwks_fetches_total", {"result": result, "reason": reason}
    )
    assert value is not None
    return value


@dataclass
class Setup:
    auth: Authenticator
    keys: RemoteKeys
    registry: CollectorRegistry


def authenticator(
    session: aiohttp.ClientSession, min_refetch_s: float = 30.0, **settings: Any
) -> Setup:
    registry = CollectorRegistry()
    a = Authenticator(
        AuthSettings(
            mode="jwt",
            jwks_min_refetch_s=min_refetch_s,
            **{"issuer": TOKEN_ISSUER, "audience": AUDIENCE, **settings},
        ),
        JwksMetrics(registry),
    )
    assert a.remote is not None
    a.remote.attach(session)
    return Setup(a, a.remote, registry)


async def refused(a: Authenticator, t: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await a.verify_fetching(t)
    assert caught.value.status == 401
    return caught.value


async def test_rs256_and_es256_keys_by_kid_unknown_kid_refetched_once(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key, e_key, b_key = rsa_key(), ec_key(), rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A", "RS256"), public_jwk(e_key, "E")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh() and s.keys.loaded
    assert (await s.auth.verify_fetching(token(a_key, "A", "RS256"))).types == frozenset({b"A"})
    assert (await s.auth.verify_fetching(token(e_key, "E", "ES256"))).types == frozenset({b"A"})
    assert s.auth.verify(token(e_key, "E", "ES256")).types == frozenset(
        {b"A"}
    )  # the synchronous path
    assert provider.requests["jwks"] == 1
    assert s.registry.get_sample_value("crm_events_jwks_keys") == 2
    stamp = s.registry.get_sample_value("crm_events_jwks_last_success_timestamp_seconds")
    assert stamp is not None and abs(stamp - time.time()) < 60

    # The provider adds B; a token signed by B makes the edge fetch once and succeeds.
    provider.jwks["keys"].append(public_jwk(b_key, "B", "RS256"))
    assert (await s.auth.verify_fetching(token(b_key, "B", "RS256"))).types == frozenset({b"A"})
    assert provider.requests["jwks"] == 2
    assert fetches(s.registry, "ok", "unknown_kid") == 1
    # Within the cooldown an unknown kid is refused at once, without a fetch.
    error = await refused(s.auth, token(b_key, "C", "RS256"))
    assert error.message == UNKNOWN_KID
    assert provider.requests["jwks"] == 2
    assert s.registry.get_sample_value("crm_events_jwks_refetches_limited_total") == 1


async def test_a_flood_of_unknown_kids_makes_at_most_one_fetch(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key, b_key = rsa_key(), rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    provider.jwks = {"keys": [public_jwk(a_key, "A"), public_jwk(b_key, "B")]}
    provider.delay_s = 0.3  # every request arrives while the one fetch is in flight

    async def outcome(t: str) -> str:
        try:
            await s.auth.verify_fetching(t)
        except ApiError as exc:
            return exc.message
        return "ok"

    # 200 requests with B's new key at once: one fetch serves them all.
    results = await asyncio.gather(*(outcome(token(b_key, "B", "RS256")) for _ in range(200)))
    assert results == ["ok"] * 200
    assert provider.requests["jwks"] == 2
    # 200 made-up kids right after: all refused at once, not one fetch.
    forged = [token(b_key, f"made-up-{i}", "RS256") for i in range(200)]
    results = await asyncio.gather(*(outcome(t) for t in forged))
    assert results == [UNKNOWN_KID] * 200
    assert provider.requests["jwks"] == 2
    assert s.registry.get_sample_value("crm_events_jwks_refetches_limited_total") == 200


async def test_after_the_cooldown_an_unknown_kid_fetches_again(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, min_refetch_s=0.2, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    await refused(s.auth, token(a_key, "X", "RS256"))
    await refused(s.auth, token(a_key, "X", "RS256"))
    assert provider.requests["jwks"] == 2
    await asyncio.sleep(0.25)  # the cooldown itself is what is tested
    await refused(s.auth, token(a_key, "X", "RS256"))
    assert provider.requests["jwks"] == 3


@pytest.mark.parametrize("mode", ["error", "big", "big_declared", "bad_json", "not_object", "deep"])
async def test_a_failed_fetch_keeps_the_keys_held(
    provider: Provider, session: aiohttp.ClientSession, mode: str
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    provider.mode = mode
    assert not await s.keys.refresh()
    assert fetches(s.registry, "error", "scheduled") == 1
    assert s.keys.last_error and "Error(" not in s.keys.last_error  # a reason, not a repr
    assert s.auth.verify(token(a_key, "A", "RS256")).types == frozenset({b"A"})
    assert s.registry.get_sample_value("crm_events_jwks_keys") == 1
    provider.mode = "ok"
    assert await s.keys.refresh() and s.keys.last_error is None


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"keys": []}, id="no-keys"),
        pytest.param({"nokeys": 1}, id="no-keys-list"),
        pytest.param({"keys": [{"kty": "oct", "kid": "H", "k": "c2VjcmV0"}]}, id="hmac-only"),
        pytest.param({"keys": [{"kty": "RSA", "kid": "R", "n": "x", "e": "y"}]}, id="broken"),
    ],
)
async def test_a_document_without_usable_keys_keeps_the_keys_held(
    provider: Provider, session: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    provider.jwks = document
    assert not await s.keys.refresh()
    assert s.auth.verify(token(a_key, "A", "RS256")).types == frozenset({b"A"})


def test_too_many_keys_and_symmetric_keys_are_refused() -> None:
    jwk = public_jwk(ec_key(), "E")
    with pytest.raises(FetchError, match="at most"):
        parse_jwks({"keys": [{**jwk, "kid": f"k{i}"} for i in range(MAX_KEYS + 1)]})
    held = parse_jwks(
        {
            "keys": [
                jwk,
                {"kty": "oct", "kid": "H", "k": "c2VjcmV0"},
                {**public_jwk(rsa_key(), "N"), "alg": "none"},
                {**public_jwk(rsa_key(), "U"), "use": "enc"},
            ]
        }
    )
    assert set(held) == {"E"}
    assert held["E"].algorithms == ("ES256",)


async def test_provider_unreachable_keys_held_and_failures_counted(
    session: aiohttp.ClientSession, provider: Provider
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    # Connection refused: the provider's server is gone.
    assert provider.server is not None
    await provider.server.close()
    assert not await s.keys.refresh()
    assert not await s.keys.refresh()
    assert fetches(s.registry, "error", "scheduled") == 2
    assert s.auth.verify(token(a_key, "A", "RS256")).types == frozenset({b"A"})


async def test_keys_no_longer_published_verify_for_the_grace_period(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    now = [1000.0]
    a_key, b_key = rsa_key(), rsa_key()
    keys = RemoteKeys(
        KeySource(jwks_url=provider.url + "/certs"),
        refresh_s=300,
        min_refetch_s=10,
        grace_s=600,
        clock=lambda: now[0],
    )
    keys.attach(session)
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    assert await keys.refresh()
    provider.jwks = {"keys": [public_jwk(b_key, "B")]}  # rotated, A removed at once
    assert await keys.refresh()
    assert keys.lookup("A") is not None and keys.lookup("B") is not None
    assert keys.key_count() == 2
    now[0] += 599
    assert await keys.refresh()
    assert keys.lookup("A") is not None  # a later document does not restart the period
    now[0] += 2
    assert keys.lookup("A") is None and keys.key_count() == 1
    # A key published again is current again.
    provider.jwks = {"keys": [public_jwk(a_key, "A"), public_jwk(b_key, "B")]}
    assert await keys.refresh()
    assert keys.lookup("A") is not None


async def test_no_grace_drops_removed_keys_at_the_next_fetch(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key, b_key = rsa_key(), rsa_key()
    s = authenticator(session, jwks_url=provider.url + "/certs", jwks_grace_s=0)
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    assert await s.keys.refresh()
    provider.jwks = {"keys": [public_jwk(b_key, "B")]}
    assert await s.keys.refresh()
    assert s.keys.lookup("A") is None


async def test_no_hmac_and_no_none_with_published_keys(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A", "RS256")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    pem = (
        a_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    # PyJWT will not sign this itself: made by hand, HMAC keyed with the public key's PEM.
    await refused(s.auth, hs256_by_hand({"kid": "A"}, pem.encode()))
    unsigned = jwt.encode(
        {"exp": time.time() + 60, "crm_types": ["*"]}, None, algorithm="none", headers={"kid": "A"}
    )
    await refused(s.auth, unsigned)
    # A key that declares RS256 verifies nothing else (PS256 on the same key).
    await refused(s.auth, token(a_key, "A", "PS256"))
    # No kid at all: refused without a fetch.
    await refused(s.auth, token(a_key, None, "RS256"))
    assert provider.requests["jwks"] == 1


async def test_oidc_discovery_checks_the_issuer_and_tokens_iss(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    settings = AuthSettings.from_env(
        Env(
            {
                "CRM_EVENTS_AUTH_OIDC_ISSUER": provider.issuer,
                "CRM_EVENTS_JWT_AUDIENCE": AUDIENCE,
                "CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S": "5",
            }
        )
    )
    assert settings.issuer == provider.issuer
    a = Authenticator(settings)
    assert a.remote is not None
    a.remote.attach(session)
    assert await a.remote.refresh()
    assert provider.requests["discovery"] == 1
    good = token(a_key, "A", "RS256", iss=provider.issuer)
    assert (await a.verify_fetching(good)).types == frozenset({b"A"})
    await refused(a, token(a_key, "A", "RS256", iss=None))  # no iss
    await refused(a, token(a_key, "A", "RS256", iss=provider.url + "/realms/other"))

    # A discovery document naming another issuer is refused; the keys held stay.
    provider.issuer_claimed = "https://evil.example.com/realms/crm"
    assert not await a.remote.refresh()
    assert a.remote.last_error is not None and "issuer" in a.remote.last_error
    assert (await a.verify_fetching(good)).types == frozenset({b"A"})


async def test_oidc_issuer_mismatch_at_start_leaves_the_edge_unloaded(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    provider.jwks = {"keys": [public_jwk(rsa_key(), "A")]}
    provider.issuer_claimed = provider.url + "/realms/somebody-else"
    keys = RemoteKeys(KeySource(issuer=provider.issuer), refresh_s=300, min_refetch_s=10, grace_s=0)
    keys.attach(session)
    assert not await keys.refresh()
    assert not keys.loaded and provider.requests["jwks"] == 0


async def test_the_edge_starts_without_the_provider_and_is_ready_once_keys_arrive(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    provider.mode = "error"
    registry = CollectorRegistry()
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-jwks",
        ping_interval_s=0.2,
        auth=AuthSettings(
            mode="jwt", jwks_url=provider.url + "/certs", issuer=TOKEN_ISSUER, audience=AUDIENCE
        ),
    )
    server = TestServer(create_app(settings, registry=registry, bus=MemoryBus()))
    await server.start_server()
    try:
        await eventually(lambda: provider.requests["jwks"] >= 1, 10, "the first fetch")
        async with session.get(server.make_url("/readyz")) as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["jwks"]["loaded"] is False and "500" in body["jwks"]["error"]
        # A good token meanwhile: 503 with Retry-After (the client retries), never 401 (the
        # client would drop its credentials).
        headers = {"Authorization": "Bearer " + token(a_key, "A", "RS256")}
        for path in ("/crm-events/history", "/crm-events"):
            async with session.get(server.make_url(path), headers=headers) as resp:
                assert resp.status == 503, path
                assert (await resp.json())["error"] == "keys_unavailable"
                assert int(resp.headers["Retry-After"]) >= 1
        async with session.get(server.make_url("/metrics")) as r:
            assert 'crm_events_auth_failures_total{reason="keys_unavailable"}' not in (
                await r.text()
            )
        provider.mode = "ok"

        async def ready() -> bool:
            async with session.get(server.make_url("/readyz")) as resp:
                return resp.status == 200

        await eventually(ready, 10, "readiness once the keys are fetched")
        assert fetches(registry, "ok", "start") == 1
        assert fetches(registry, "error", "start") >= 1
        headers = {"Authorization": "Bearer " + token(a_key, "A", "RS256")}
        async with session.get(server.make_url("/crm-events/history"), headers=headers) as r:
            assert r.status == 200
        async with session.get(server.make_url("/metrics")) as r:
            text = await r.text()
        assert 'crm_events_jwks_fetches_total{reason="start",result="ok"} 1.0' in text
        assert "crm_events_jwks_keys 1.0" in text
    finally:
        await server.close()


# -- settings ---------------------------------------------------------------------------------

BY_URL = {
    "CRM_EVENTS_AUTH_JWKS_URL": "https://idp.example.com/keys",
    "CRM_EVENTS_JWT_ISSUER": TOKEN_ISSUER,
    "CRM_EVENTS_JWT_AUDIENCE": AUDIENCE,
}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CRM_EVENTS_AUTH_JWKS_URL": "ftp://idp.example.com/keys"}, "CRM_EVENTS_AUTH_JWKS_URL"),
        ({"CRM_EVENTS_AUTH_JWKS_URL": "not a url"}, "CRM_EVENTS_AUTH_JWKS_URL"),
        ({"CRM_EVENTS_AUTH_JWKS_URL": "https://"}, "CRM_EVENTS_AUTH_JWKS_URL"),
        ({"CRM_EVENTS_AUTH_JWKS_URL": "https://h:99999/k"}, "CRM_EVENTS_AUTH_JWKS_URL"),
        ({"CRM_EVENTS_AUTH_OIDC_ISSUER": "idp.example.com"}, "CRM_EVENTS_AUTH_OIDC_ISSUER"),
        (
            {
                "CRM_EVENTS_AUTH_JWKS_URL": "https://idp.example.com/keys",
                "CRM_EVENTS_AUTH_OIDC_ISSUER": "https://idp.example.com",
            },
            "CRM_EVENTS_AUTH_OIDC_ISSUER",
        ),
        (
            {
                "CRM_EVENTS_AUTH_OIDC_ISSUER": "https://idp.example.com/realms/crm",
                "CRM_EVENTS_JWT_ISSUER": "https://other.example.com/",
            },
            "CRM_EVENTS_JWT_ISSUER",
        ),
        (
            {
                **BY_URL,
                "CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S": "600",
            },
            "CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S",
        ),
        (
            {
                **BY_URL,
                "CRM_EVENTS_AUTH_JWKS_REFRESH_S": "0",
            },
            "CRM_EVENTS_AUTH_JWKS_REFRESH_S",
        ),
        (
            {
                **BY_URL,
                "CRM_EVENTS_AUTH_JWKS_GRACE_S": "-1",
            },
            "CRM_EVENTS_AUTH_JWKS_GRACE_S",
        ),
        # A provider's keys sign other tenants' and applications' tokens: without iss and aud
        # checks those would be accepted. Both are required, with no way around.
        pytest.param(
            {"CRM_EVENTS_AUTH_JWKS_URL": "https://idp.example.com/keys"},
            "CRM_EVENTS_JWT_ISSUER",
            id="jwks-url-without-issuer",
        ),
        pytest.param(
            {
                "CRM_EVENTS_AUTH_JWKS_URL": "https://idp.example.com/keys",
                "CRM_EVENTS_JWT_ISSUER": TOKEN_ISSUER,
            },
            "CRM_EVENTS_JWT_AUDIENCE",
            id="jwks-url-without-audience",
        ),
        pytest.param(
            {"CRM_EVENTS_AUTH_OIDC_ISSUER": "https://idp.example.com/realms/crm"},
            "CRM_EVENTS_JWT_AUDIENCE",
            id="oidc-without-audience",
        ),
        pytest.param(
            {
                "CRM_EVENTS_AUTH_OIDC_ISSUER": "https://idp.example.com/realms/crm",
                "CRM_EVENTS_JWT_AUDIENCE": " ",
            },
            "CRM_EVENTS_JWT_AUDIENCE",
            id="oidc-with-blank-audience",
        ),
    ],
)
def test_settings_errors_name_the_setting(env: dict[str, str], named: str) -> None:
    """Every case also fails through the edge's whole settings (what starts the process)."""
    with pytest.raises(SettingsError) as caught:
        AuthSettings.from_env(Env(env))
    assert caught.value.name == named
    assert str(caught.value).startswith(named + ":")
    with pytest.raises(SettingsError, match=named):
        EdgeSettings.from_env(env)


def test_only_one_source_of_keys(tmp_path: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    with pytest.raises(SettingsError) as caught:
        AuthSettings.from_env(
            Env(
                {
                    "CRM_EVENTS_JWT_SECRET_FILE": str(secret),
                    "CRM_EVENTS_AUTH_JWKS_URL": "https://idp.example.com/keys",
                }
            )
        )
    assert caught.value.name == "CRM_EVENTS_AUTH_JWKS_URL"
    assert "CRM_EVENTS_JWT_SECRET_FILE" in caught.value.problem


def test_settings_defaults_and_values() -> None:
    s = AuthSettings.from_env(Env({**BY_URL, "CRM_EVENTS_AUTH_JWKS_URL": "http://127.0.0.1:8/c"}))
    assert s.remote_keys and s.jwks_url == "http://127.0.0.1:8/c"
    assert (s.jwks_refresh_s, s.jwks_min_refetch_s, s.jwks_grace_s) == (300.0, 10.0, 3600.0)
    assert (s.issuer, s.audience) == (TOKEN_ISSUER, AUDIENCE)
    o = AuthSettings.from_env(
        Env(
            {
                "CRM_EVENTS_AUTH_OIDC_ISSUER": "https://tenant.eu.auth0.com/",
                "CRM_EVENTS_JWT_ISSUER": "https://tenant.eu.auth0.com/",
                "CRM_EVENTS_JWT_AUDIENCE": "https://crm-events.example.com",
                "CRM_EVENTS_AUTH_JWKS_REFRESH_S": "60",
                "CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S": "2",
                "CRM_EVENTS_AUTH_JWKS_GRACE_S": "0",
            }
        )
    )
    assert o.issuer == "https://tenant.eu.auth0.com/"
    assert (o.jwks_refresh_s, o.jwks_min_refetch_s, o.jwks_grace_s) == (60.0, 2.0, 0.0)
    assert KeySource(issuer=o.issuer).discovery_url == (
        "https://tenant.eu.auth0.com/.well-known/openid-configuration"
    )


# -- review fixes: outages answer 503, the document's keys judged one by one, bounded waits --


async def outcome(a: Authenticator, t: str) -> tuple[int, str, str, str | None]:
    """(status, error, message, Retry-After) of verifying ``t``; (200, ...) when it passes."""
    try:
        await a.verify_fetching(t)
    except ApiError as exc:
        return exc.status, exc.code, exc.message, exc.headers.get("Retry-After")
    return 200, "", "", None


async def test_a_provider_outage_answers_503_and_only_a_confirmed_absence_401(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    provider.mode = "error"
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert not await s.keys.refresh()
    good = token(a_key, "A", "RS256")
    # Never loaded: the key may well exist. The first waits for a refetch that fails; the
    # second, within the cooldown, is answered at once, the same way.
    for _ in range(2):
        status, error, _, retry = await outcome(s.auth, good)
        assert (status, error) == (503, "keys_unavailable") and retry is not None
        assert int(retry) >= 1
    with pytest.raises(ApiError) as caught:
        s.auth.verify(good)  # the synchronous path too
    assert caught.value.status == 503

    # Loaded, then the provider fails: a new kid's refetch fails -> 503, and within the
    # cooldown (the last fetch failed) still 503; the held key keeps working.
    provider.mode = "ok"
    assert await s.keys.refresh()
    provider.mode = "error"
    s.keys._last_refetch = -1e9  # the cooldown started by the calls above is over
    assert (await outcome(s.auth, token(a_key, "NEW", "RS256")))[:2] == (503, "keys_unavailable")
    assert (await outcome(s.auth, token(a_key, "NEW", "RS256")))[:2] == (503, "keys_unavailable")
    assert (await outcome(s.auth, good))[0] == 200

    # The provider answers and has no such key: 401; within the cooldown 401 with Retry-After.
    provider.mode = "ok"
    s.keys._last_refetch = -1e9
    assert await outcome(s.auth, token(a_key, "NEW", "RS256")) == (
        401,
        "unauthorized",
        UNKNOWN_KID,
        None,
    )
    status, _, message, retry = await outcome(s.auth, token(a_key, "OTHER", "RS256"))
    assert (status, message) == (401, UNKNOWN_KID) and retry is not None and int(retry) >= 1
    # No kid at all: its own message, no fetch.
    fetched = provider.requests["jwks"]
    assert (await outcome(s.auth, token(a_key, None, "RS256")))[:3] == (
        401,
        "unauthorized",
        NO_KID,
    )
    assert provider.requests["jwks"] == fetched


async def test_an_unknown_kid_waits_at_most_the_fetch_timeout(
    provider: Provider, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edge.jwks.FETCH_TIMEOUT_S", 0.3)
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    s = authenticator(session, jwks_url=provider.url + "/certs")
    assert await s.keys.refresh()
    provider.delay_s = 1.5
    started = time.monotonic()
    assert (await outcome(s.auth, token(a_key, "B", "RS256")))[:2] == (503, "keys_unavailable")
    assert time.monotonic() - started < 1.0
    await s.keys.close()


async def test_a_scheduled_refresh_does_not_ride_on_an_unknown_kid_fetch(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    a_key = rsa_key()
    provider.jwks = {"keys": [public_jwk(a_key, "A")]}
    registry = CollectorRegistry()
    a = Authenticator(
        AuthSettings(
            mode="jwt", oidc_issuer=provider.issuer, issuer=provider.issuer, audience=AUDIENCE
        ),
        JwksMetrics(registry),
    )
    assert a.remote is not None
    a.remote.attach(session)
    assert await a.remote.refresh()
    provider.delay_s = 0.2
    unknown = asyncio.ensure_future(a.remote.key_for("B"))
    await eventually(lambda: provider.requests["jwks"] == 2, 5, "the unknown-kid fetch")
    assert await a.remote.refresh()
    with pytest.raises(UnknownKid):
        await unknown
    # The refresh made its own fetch, rereading discovery, counted as scheduled.
    assert provider.requests["discovery"] == 2
    assert fetches(registry, "ok", "scheduled") == 1
    assert fetches(registry, "ok", "unknown_kid") == 1


def test_retry_backoff_is_short_while_unloaded_and_jittered() -> None:
    keys = RemoteKeys(
        KeySource(jwks_url="https://idp.example.com/keys"),
        refresh_s=3600,
        min_refetch_s=10,
        grace_s=0,
    )
    keys._failures = 30
    delays = {keys.retry_delay() for _ in range(50)}
    assert all(RETRY_MAX_UNLOADED_S / 2 <= d <= RETRY_MAX_UNLOADED_S for d in delays)
    assert len(delays) > 1  # jittered
    keys.loaded = True
    assert max(keys.retry_delay() for _ in range(50)) > RETRY_MAX_UNLOADED_S
    keys._failures = 1
    assert all(0.5 <= keys.retry_delay() <= 1.0 for _ in range(20))


GOOD = public_jwk(rsa_key(), "good", "RS256")
EC_JWK = public_jwk(ec_key(), "ec")


@pytest.mark.parametrize(
    "bad",
    [
        {**GOOD, "kid": "x", "alg": ["RS256"]},
        {**GOOD, "kid": "x", "alg": {}},
        {**GOOD, "kid": "x", "use": ["sig"]},
        {**GOOD, "kid": "x", "kty": ["RSA"]},
        {**GOOD, "kid": "x", "n": 5},
        {**GOOD, "kid": "x", "n": "é"},
        {**EC_JWK, "kid": "x", "crv": ["P-256"]},
        {**EC_JWK, "kid": "x", "crv": {}},
        {**EC_JWK, "kid": "x", "x": 1},
        {**EC_JWK, "kid": "x", "crv": "secp256k1", "alg": "ES256"},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "x"},
        {"kty": "OKP", "crv": [1], "x": "AAAA", "kid": "x"},
        {**GOOD, "kid": 5},
        "not an object",
    ],
    ids=lambda bad: json.dumps(bad)[:40],
)
def test_one_bad_key_costs_only_itself(bad: object) -> None:
    assert set(parse_jwks({"keys": [GOOD, bad]})) == {"good"}


def test_weak_rsa_keys_and_algorithms_that_do_not_fit_the_key_are_refused() -> None:
    weak = rsa.generate_private_key(65537, 1024)
    held = parse_jwks(
        {
            "keys": [
                GOOD,
                public_jwk(weak, "weak"),
                {**EC_JWK, "kid": "p256-es512", "alg": "ES512"},
                {**GOOD, "kid": "rsa-es256", "alg": "ES256"},
                {**EC_JWK, "kid": "p256-es256", "alg": "ES256"},
            ]
        }
    )
    assert set(held) == {"good", "p256-es256"}


def test_a_kid_given_to_two_different_keys_is_dropped() -> None:
    no_alg = {k: v for k, v in GOOD.items() if k != "alg"}
    held = parse_jwks(
        {
            "keys": [
                GOOD,
                {**EC_JWK, "kid": "d1", "alg": "ES256"},
                {**GOOD, "kid": "d1", "alg": "RS256"},
                {**GOOD, "kid": "d2", "alg": "PS256"},
                {**no_alg, "kid": "d2"},
                {**EC_JWK, "kid": "same"},
                {**EC_JWK, "kid": "same"},  # listed twice, identical: harmless
            ]
        }
    )
    assert set(held) == {"good", "same"}


async def test_retired_keys_are_bounded(provider: Provider, session: aiohttp.ClientSession) -> None:
    keys = RemoteKeys(
        KeySource(jwks_url=provider.url + "/certs"), refresh_s=300, min_refetch_s=1, grace_s=3600
    )
    keys.attach(session)
    key = ec_key()
    for i in range(MAX_KEYS + 10):
        provider.jwks = {"keys": [public_jwk(key, f"k{i}")]}
        assert await keys.refresh()
    assert keys.key_count() == MAX_KEYS + 1
    assert keys.lookup(f"k{MAX_KEYS + 9}") and keys.lookup(f"k{MAX_KEYS + 8}")
    assert keys.lookup("k0") is None


async def test_error_texts_are_bounded_and_carry_no_credentials(
    provider: Provider, session: aiohttp.ClientSession
) -> None:
    provider.jwks = {"keys": [GOOD]}
    provider.mode = "error"
    url = provider.url.replace("://", "://reader:hunter2@") + "/certs"
    keys = RemoteKeys(KeySource(jwks_url=url), refresh_s=300, min_refetch_s=1, grace_s=0)
    keys.attach(session)
    assert not await keys.refresh()
    assert keys.last_error is not None and "500" in keys.last_error
    assert "hunter2" not in keys.last_error and "reader" not in keys.last_error
    provider.issuer_claimed = "x" * 500_000
    oidc = RemoteKeys(KeySource(issuer=provider.issuer), refresh_s=300, min_refetch_s=1, grace_s=0)
    oidc.attach(session)
    assert not await oidc.refresh()
    assert oidc.last_error is not None and len(oidc.last_error) <= MAX_ERROR_CHARS
    assert describe("see https://u:p@h.example/x") == "see https://h.example/x"


async def test_the_provider_session_uses_the_environment_proxy_and_keeps_no_cookies() -> None:
    session = provider_session()
    try:
        assert session.trust_env
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
    finally:
        await session.close()


def test_auth_off_fetches_no_keys_and_readiness_waits_for_none() -> None:
    env = {"CRM_EVENTS_AUTH_MODE": "off", "CRM_EVENTS_AUTH_OIDC_ISSUER": "https://idp.example/r"}
    settings = EdgeSettings.from_env(env)
    assert not settings.auth.remote_keys
    assert Authenticator(settings.auth).remote is None
    registry = CollectorRegistry()
    create_app(settings, registry=registry, bus=MemoryBus())
    assert registry.get_sample_value("crm_events_jwks_keys") is None


# -- https: keys are not read over a channel weaker than the issuer's -------------------------


def _tls_contexts(tmp_path: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1 and a client context
    trusting it."""
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_an_https_issuer_needs_https_keys_and_no_downgrading_redirect(
    tmp_path: Any,
) -> None:
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    plain_hits: list[str] = []

    async def plain(request: web.Request) -> web.Response:
        plain_hits.append(request.path)
        return web.json_response({"keys": [GOOD]})

    plain_server = TestServer(web.Application())
    plain_server.app.router.add_get("/certs", plain)
    await plain_server.start_server()
    # Refused before any request: the name does not even resolve.
    elsewhere = "http://keys.example.invalid/certs"

    async def discovery(request: web.Request) -> web.Response:
        issuer = f"https://127.0.0.1:{request.url.port}{ISSUER_PATH}"
        return web.json_response({"issuer": issuer, "jwks_uri": elsewhere})

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound(elsewhere)

    async def to_loopback(_: web.Request) -> web.Response:
        raise web.HTTPFound(str(plain_server.make_url("/certs")))

    app = web.Application()
    app.router.add_get(ISSUER_PATH + "/.well-known/openid-configuration", discovery)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/to-loopback", to_loopback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    base = f"https://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as s:
            with pytest.raises(FetchError, match="plain http jwks_uri"):
                await KeySource(issuer=base + ISSUER_PATH).discover(s)
            with pytest.raises(FetchError, match="redirects to plain http"):
                await get_json(s, base + "/redirect")
            # Loopback (a provider beside the edge) stays allowed.
            assert (await get_json(s, base + "/to-loopback"))["keys"] == [GOOD]
            assert plain_hits == ["/certs"]
    finally:
        await runner.cleanup()
        await plain_server.close()
