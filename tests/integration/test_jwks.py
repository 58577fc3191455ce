"""Real edges behind nginx verifying tokens with an OpenID Connect provider's keys: a
provider (discovery document + JWKS over HTTP, in this process on its own thread and loop)
rotates its signing key mid-stream. The open stream keeps flowing, tokens of the new key are
accepted without restarting an edge, tokens of the old key keep working until they expire,
and a flood of tokens naming unknown keys costs the provider at most one request per edge
within the cooldown."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event, free_port
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)
MIN_REFETCH_S = 5
REALM = "/realms/crm"
AUDIENCE = "crm-events"


class Provider:
    """An identity provider's public side: the discovery document and the JWKS, served by
    aiohttp on a loop of its own (the edges fetch from it while the test's loop waits)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}{REALM}"
        self.jwks: list[dict[str, Any]] = []
        self.requests: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> Provider:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self) -> None:
        async def discovery(_: web.Request) -> web.Response:
            self.requests["discovery"] += 1
            return web.json_response(
                {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/protocol/openid-connect/certs"}
            )

        async def certs(_: web.Request) -> web.Response:
            self.requests["jwks"] += 1
            return web.json_response({"keys": list(self.jwks)})

        app = web.Application()
        app.router.add_get(REALM + "/.well-known/openid-configuration", discovery)
        app.router.add_get(REALM + "/protocol/openid-connect/certs", certs)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "RS256"
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "ES256"
    return {**jwk, "kid": kid, "use": "sig"}


KEY_A = rsa.generate_private_key(65537, 2048)
KEY_B = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with Provider() as p:
        p.jwks = [public_jwk(KEY_A, "key-a")]
        yield p


@pytest.fixture(scope="module")
def oidc(
    provider: Provider, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("oidc")),
        backends,
        edges=2,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_AUTH_OIDC_ISSUER": provider.issuer,
            "CRM_EVENTS_JWT_AUDIENCE": AUDIENCE,
            "CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S": str(MIN_REFETCH_S),
            "CRM_EVENTS_JWT_LEEWAY_S": "0",
        },
    )
    # The edges become ready only once they hold the provider's keys.
    with c.running():
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(issuer: str, key: Any, kid: str, ttl: float = 300) -> dict[str, str]:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    claims = {
        "iss": issuer,
        "aud": AUDIENCE,
        "exp": int(time.time() + ttl),
        "crm_types": ["*"],
        "sub": kid,
    }
    return {"Authorization": "Bearer " + jwt.encode(claims, key, alg, headers={"kid": kid})}


async def status_of(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def metric(session: aiohttp.ClientSession, url: str, sample: str) -> float:
    async with session.get(url) as resp:
        text = await resp.text()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert found, f"{sample} not exported by {url}"
    return float(found.group(1))


UNKNOWN_KID_OK = 'crm_events_jwks_fetches_total{reason="unknown_kid",result="ok"}'
LIMITED = "crm_events_jwks_refetches_limited_total"


async def test_rotation_mid_stream_without_restarting_an_edge(
    oidc: Cluster, provider: Provider, session: aiohttp.ClientSession
) -> None:
    c = oidc
    stream = Collector(
        c.lb_url("/crm-events"), headers=bearer(provider.issuer, KEY_A, "key-a")
    ).start(session)
    await stream.wait_for(lambda s: s.node is not None, 10, "the stream to open")
    await c.produce([(None, crm_event(i)) for i in range(5)])
    await stream.wait_for(lambda s: len(s.data_frames) >= 5, 20, "events before the rotation")
    short_a = bearer(provider.issuer, KEY_A, "key-a", ttl=8)

    # The provider rotates to key B and drops A from its document at once.
    provider.jwks = [public_jwk(KEY_B, "key-b")]
    new_b = bearer(provider.issuer, KEY_B, "key-b")
    for i in (1, 2):
        history = c.edge_url(i, "/crm-events/history?n=1")
        assert await status_of(session, history, new_b) == 200, f"edge{i} took key B"
        assert await metric(session, c.edge_url(i, "/metrics"), UNKNOWN_KID_OK) == 1
        # Tokens of the retired key A still work on both edges (its grace period).
        assert await status_of(session, history, short_a) == 200, f"edge{i} kept key A"
    assert await status_of(session, c.lb_url("/crm-events/history?n=1"), new_b) == 200

    # The stream opened with key A keeps flowing on the same connection.
    await c.produce([(None, crm_event(i)) for i in range(5, 10)])
    await stream.wait_for(lambda s: len(s.data_frames) >= 10, 20, "events after the rotation")
    assert not stream.ended.is_set()
    assert {f.json()["event"]["Seq"] for f in stream.data_frames} == set(range(10))

    # ...until the short A token expires: then it is refused like any expired token.
    async def expired() -> bool:
        async with session.get(c.lb_url("/crm-events/history?n=1"), headers=short_a) as r:
            return r.status == 401 and "expired" in (await r.json())["message"]

    await eventually(expired, 15, "the short-lived key A token to expire")
    await stream.stop()


async def test_a_flood_of_unknown_kids_is_rate_limited(
    oidc: Cluster, provider: Provider, session: aiohttp.ClientSession
) -> None:
    c = oidc
    forged_key = ec.generate_private_key(ec.SECP256R1())
    fetched_before = provider.requests["jwks"]
    limited_before = [await metric(session, c.edge_url(i, "/metrics"), LIMITED) for i in (1, 2)]

    async def wave(i: int, tag: str) -> list[int]:
        url = c.edge_url(i, "/crm-events/history?n=1")
        tokens = [bearer(provider.issuer, forged_key, f"{tag}-{n}") for n in range(100)]
        return await asyncio.gather(*(status_of(session, url, t) for t in tokens))

    for i in (1, 2):
        assert await wave(i, f"first-{i}") == [401] * 100
        # Right after, within the cooldown: every one is refused without a fetch.
        assert await wave(i, f"second-{i}") == [401] * 100
    # One refetch per edge at most (none if the rotation's refetch is still cooling down).
    assert provider.requests["jwks"] - fetched_before <= 2
    for i, before in zip((1, 2), limited_before, strict=True):
        limited = await metric(session, c.edge_url(i, "/metrics"), LIMITED)
        assert limited - before >= 100, f"edge{i} counted its refused refetches"
    # Through the load balancer too: refused as unauthorized, with the JSON error.
    async with session.get(
        c.lb_url("/crm-events/history"), headers=bearer(provider.issuer, forged_key, "x")
    ) as r:
        assert r.status == 401
        assert await r.json() == {
            "error": "unauthorized",
            "message": "the token's key id is not known",
        }
