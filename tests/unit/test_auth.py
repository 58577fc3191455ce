"""edge/auth.py: tokens, grants, refusals; and the edge app enforcing them over the
in-memory bus (types and field-equality claims, live, resume and history, expiry)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.auth import CERT, OPEN, TOKEN_AND_CERT, Authenticator, Grant, intersect, issue_token
from edge.bus_memory import MemoryBus
from shared.httpkit import ApiError
from shared.security_settings import AuthSettings
from shared.settings import EdgeSettings, RedisSettings
from tests.sse_client import Collector

SECRET = "s" * 40


def hs(
    types: list[str], match: dict[str, str] | None = None, ttl: float = 3600, **kw: object
) -> str:
    return issue_token(SECRET, types=types, match=match, ttl_s=ttl, **kw)  # type: ignore[arg-type]


def auth(**kw: object) -> Authenticator:
    return Authenticator(AuthSettings(mode="jwt", secret=SECRET, **kw))  # type: ignore[arg-type]


def test_grant_from_claims() -> None:
    grant = auth().verify(hs(["DealWon", "DealLost"], {"TenantId": "t-1"}))
    assert grant.types == {b"DealWon", b"DealLost"}
    assert grant.match == {("TenantId", "t-1")}
    assert grant.expires_at is not None and grant.expires_at > time.time()
    assert auth().verify(hs(["*"])).types is None


@pytest.mark.parametrize(
    ("token", "status"),
    [
        pytest.param(hs(["A"], ttl=-120), 401, id="expired"),
        pytest.param(issue_token("x" * 40, types=["A"]), 401, id="forged-other-secret"),
        pytest.param(hs(["A"])[:-3] + "abc", 401, id="tampered-signature"),
        pytest.param("not.a.token", 401, id="garbage"),
        pytest.param(jwt.encode({"crm_types": ["A"]}, SECRET, algorithm="HS256"), 401, id="no-exp"),
        pytest.param(
            jwt.encode({"exp": time.time() + 3600}, SECRET, algorithm="HS256"),
            403,
            id="no-types-claim",
        ),
        pytest.param(
            jwt.encode({"exp": time.time() + 3600, "crm_types": "A"}, SECRET, algorithm="HS256"),
            401,
            id="types-not-a-list",
        ),
        pytest.param(
            jwt.encode(
                {"exp": time.time() + 3600, "crm_types": ["A"], "crm_match": {"T": [1]}},
                SECRET,
                algorithm="HS256",
            ),
            401,
            id="match-not-scalar",
        ),
        pytest.param(
            jwt.encode({"exp": time.time() + 3600, "crm_types": ["A"]}, SECRET, algorithm="HS512"),
            401,
            id="wrong-algorithm",
        ),
        pytest.param(
            jwt.encode({"exp": time.time() + 3600, "crm_types": ["A"]}, None, algorithm="none"),
            401,
            id="alg-none",
        ),
        pytest.param(
            jwt.encode({"exp": str(int(time.time() + 3600)), "crm_types": ["A"]}, SECRET, "HS256"),
            401,
            id="exp-a-numeric-string",
        ),
    ],
)
def test_refusals(token: str, status: int) -> None:
    with pytest.raises(ApiError) as caught:
        auth().verify(token)
    assert caught.value.status == status
    if status == 401:
        assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_narrow_refuses_types_not_granted() -> None:
    grant = Grant(frozenset({b"A", b"B"}), frozenset(), None)
    assert grant.narrow(None) == {b"A", b"B"}
    assert grant.narrow(frozenset({b"A"})) == {b"A"}
    with pytest.raises(ApiError) as caught:
        grant.narrow(frozenset({b"A", b"C"}))
    assert caught.value.status == 403 and "C" in caught.value.message


# -- jwt-and-cert: what a token and a client certificate grant together -------------------------

TOKEN_AB = Grant(frozenset({b"A", b"B"}), frozenset({("TenantId", "t-1")}), 2000.0, "alice")
CERT_ALL = Grant(None, frozenset({("Region", "eu")}), 1000.0, "CN=crm-sync", CERT)


def test_together_the_types_both_grant_every_constraint_and_the_earlier_end() -> None:
    both = intersect(TOKEN_AB, CERT_ALL)
    assert both.types == {b"A", b"B"}  # the certificate grants every type
    assert both.match == {("TenantId", "t-1"), ("Region", "eu")}
    assert both.expires_at == 1000.0  # the certificate's notAfter comes first
    assert both.subject == "alice" and both.source == TOKEN_AND_CERT
    cert_bc = Grant(frozenset({b"B", b"C"}), frozenset(), 3000.0, "CN=x", CERT)
    narrower = intersect(TOKEN_AB, cert_bc)
    assert (narrower.types, narrower.expires_at) == ({b"B"}, 2000.0)  # here the token's exp
    assert intersect(OPEN, CERT_ALL).types is None
    with pytest.raises(ApiError) as caught:
        narrower.narrow(frozenset({b"A"}))
    assert caught.value.message == (
        "the token and the client certificate do not both grant the event types: A"
    )


@pytest.mark.parametrize(
    ("cert", "says"),
    [
        pytest.param(
            Grant(frozenset({b"C"}), frozenset(), 1.0, None, CERT), "no type in common", id="types"
        ),
        pytest.param(
            Grant(None, frozenset({("TenantId", "t-2")}), 1.0, None, CERT),
            "different values of TenantId",
            id="match",
        ),
    ],
)
def test_together_granting_nothing_is_403(cert: Grant, says: str) -> None:
    with pytest.raises(ApiError) as caught:
        intersect(TOKEN_AB, cert)
    assert caught.value.status == 403 and says in caught.value.message


def _keypair(kind: str) -> tuple[object, str, str]:
    key = (
        rsa.generate_private_key(65537, 2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, public, kind


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_tokens(alg: str) -> None:
    key, public, _ = _keypair(alg)
    a = Authenticator(AuthSettings(mode="jwt", public_key_pem=public))
    token = jwt.encode({"exp": time.time() + 3600, "crm_types": ["A"]}, key, algorithm=alg)
    assert a.verify(token).types == {b"A"}
    # Algorithm confusion: an HS256 token signed with the public key text must fail.
    forged = jwt.encode(
        {"exp": time.time() + 3600, "crm_types": ["*"]}, "x" * 40, algorithm="HS256"
    )
    with pytest.raises(ApiError):
        a.verify(forged)


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    key, _, _ = _keypair("RS256")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))  # type: ignore[attr-defined]
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    a = Authenticator(AuthSettings(mode="jwt", jwks_file=str(path)))
    good = jwt.encode(
        {"exp": time.time() + 3600, "crm_types": ["A"]},
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    assert a.verify(good).types == {b"A"}
    unknown = jwt.encode(
        {"exp": time.time() + 3600, "crm_types": ["A"]},
        key,
        algorithm="RS256",
        headers={"kid": "k2"},
    )
    with pytest.raises(ApiError):
        a.verify(unknown)


# -- the edge app over the in-memory bus ------------------------------------------------------


def envelope(seq: int, type_: str) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": type_, "event": {"Type": type_, "Seq": seq}}, separators=(",", ":"))
    return type_.encode(), 1_700_000_000_000, data.encode()


@pytest.fixture
async def edge() -> AsyncIterator[tuple[TestServer, MemoryBus]]:
    bus = MemoryBus()
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-auth",
        ping_interval_s=0.2,
        auth=AuthSettings(mode="jwt", secret=SECRET, leeway_s=0),
    )
    server = TestServer(create_app(settings, registry=CollectorRegistry(), bus=bus))
    await server.start_server()
    yield server, bus
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_refused_without_or_with_bad_tokens(
    edge: tuple[TestServer, MemoryBus], session: aiohttp.ClientSession
) -> None:
    server, _ = edge
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Basic abc"}, 401),
        (bearer(hs(["A"], ttl=-5)), 401),
        (bearer(issue_token("y" * 40, types=["A"])), 401),
        (bearer(hs(["A"])), 403),  # asks for B below
    ]:
        async with session.get(
            server.make_url("/crm-events/history?types=B"), headers=headers
        ) as resp:
            assert resp.status == status, headers
            body = await resp.json()
            assert body["error"] == ("unauthorized" if status == 401 else "forbidden")


async def test_cookie_carries_the_token(
    edge: tuple[TestServer, MemoryBus], session: aiohttp.ClientSession
) -> None:
    server, bus = edge
    bus.publish([envelope(1, "A")])
    async with session.get(
        server.make_url("/crm-events/history"), cookies={"crm_events_token": hs(["A"])}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["count"] == 1
    # The query string is refused unless explicitly enabled.
    async with session.get(server.make_url(f"/crm-events/history?access_token={hs(['A'])}")) as r:
        assert r.status == 401


async def test_claims_split_one_stream_into_disjoint_views(
    edge: tuple[TestServer, MemoryBus], session: aiohttp.ClientSession
) -> None:
    server, bus = edge
    tenant1 = Collector(
        str(server.make_url("/crm-events")), headers=bearer(hs(["*"], {"TenantId": "t-1"}))
    ).start(session)
    deals = Collector(str(server.make_url("/crm-events")), headers=bearer(hs(["DealWon"]))).start(
        session
    )
    await tenant1.wait_for(lambda c: c.node is not None, 5, "stream")
    await deals.wait_for(lambda c: c.node is not None, 5, "stream")
    bus.publish([envelope(1, "DealWon")], match=b"TenantId=t-1")
    bus.publish([envelope(2, "TicketOpened")], match=b"TenantId=t-1")
    bus.publish([envelope(3, "DealWon")], match=b"TenantId=t-2")
    bus.publish([envelope(4, "TicketOpened")], match=b"TenantId=t-2")
    await tenant1.wait_for(lambda c: len(c.data_frames) >= 2, 5, "tenant 1 events")
    await deals.wait_for(lambda c: len(c.data_frames) >= 2, 5, "deal events")
    assert [f.json()["event"]["Seq"] for f in tenant1.data_frames] == [1, 2]
    assert [f.json()["event"]["Seq"] for f in deals.data_frames] == [1, 3]
    # Resume and history honour the same grant.
    first = tenant1.data_frames[0].id or ""
    again = Collector(
        str(server.make_url("/crm-events")),
        headers={**bearer(hs(["TicketOpened"], {"TenantId": "t-2"})), "Last-Event-ID": first},
    ).start(session)
    await again.wait_for(lambda c: len(c.data_frames) >= 1, 5, "resumed events")
    async with session.get(
        server.make_url("/crm-events/history?n=10"),
        headers=bearer(hs(["TicketOpened"], {"TenantId": "t-2"})),
    ) as resp:
        history = (await resp.json())["items"]
    assert [f.json()["event"]["Seq"] for f in again.data_frames] == [4]
    assert [i["event"]["Seq"] for i in history] == [4]
    for c in (tenant1, deals, again):
        await c.stop()


async def test_stream_ends_when_the_token_expires(
    edge: tuple[TestServer, MemoryBus], session: aiohttp.ClientSession
) -> None:
    server, _ = edge
    client = Collector(
        str(server.make_url("/crm-events")), headers=bearer(hs(["*"], ttl=1.5))
    ).start(session)
    await asyncio.wait_for(client.ended.wait(), 10)
    assert client.received[-1].event == "auth_expired"
    assert client.received[-1].json()["error"] == "token_expired"


async def test_a_string_exp_never_opens_an_endless_stream(
    edge: tuple[TestServer, MemoryBus], session: aiohttp.ClientSession
) -> None:
    # PyJWT accepts a numeric string as exp; the edge used to arm no expiry timer for it.
    server, _ = edge
    token = jwt.encode({"exp": str(int(time.time() + 2)), "crm_types": ["*"]}, SECRET, "HS256")
    async with session.get(server.make_url("/crm-events"), headers=bearer(token)) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"


# -- tokens that are not ASCII: 401, never a 500 ---------------------------------------------

NOT_UTF8 = b"\xff\xfe.e30.eHg"
"""Header bytes that are not UTF-8: aiohttp hands them over as surrogate escapes, which
PyJWT cannot encode (UnicodeEncodeError) when it reads the token."""


def test_a_token_python_cannot_encode_is_refused_as_malformed() -> None:
    surrogates = NOT_UTF8.decode("utf-8", "surrogateescape")
    for token in (surrogates, "é.e30.eHg", surrogates.replace(".", "x") + ".a.b"):
        with pytest.raises(ApiError) as caught:
            auth().verify(token)
        assert caught.value.status == 401, token


@pytest.mark.parametrize(
    "header",
    [b"Authorization: Bearer " + NOT_UTF8, b"Cookie: crm_events_token=" + NOT_UTF8],
    ids=["bearer", "cookie"],
)
async def test_non_ascii_token_bytes_over_http_are_401_not_500(
    edge: tuple[TestServer, MemoryBus], header: bytes
) -> None:
    server, _ = edge
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /crm-events/history HTTP/1.1\r\nHost: edge\r\n"
        + header
        + b"\r\nConnection: close\r\n\r\n"
    )
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"] == "unauthorized"


async def test_a_query_token_that_is_not_ascii_is_refused(session: aiohttp.ClientSession) -> None:
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-auth-q",
        auth=AuthSettings(mode="jwt", secret=SECRET, query_token=True),
    )
    server = TestServer(create_app(settings, registry=CollectorRegistry(), bus=MemoryBus()))
    await server.start_server()
    try:
        url = server.make_url("/crm-events/history").with_query(access_token="é.e30.eHg")
        async with session.get(url) as resp:
            assert resp.status == 401
            assert (await resp.json())["message"] == "malformed token: not ASCII"
    finally:
        await server.close()


# -- the stream lives as long as its token is accepted ----------------------------------------


async def test_a_token_accepted_within_the_leeway_streams_until_exp_plus_leeway(
    session: aiohttp.ClientSession,
) -> None:
    leeway_s = 2
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-auth-leeway",
        ping_interval_s=0.2,
        auth=AuthSettings(mode="jwt", secret=SECRET, leeway_s=leeway_s),
    )
    server = TestServer(create_app(settings, registry=CollectorRegistry(), bus=MemoryBus()))
    await server.start_server()
    try:
        exp = time.time() - 0.5  # expired, but within the leeway: accepted
        token = jwt.encode({"exp": exp, "crm_types": ["*"]}, SECRET, "HS256")
        client = Collector(str(server.make_url("/crm-events")), headers=bearer(token)).start(
            session
        )
        await asyncio.wait_for(client.ended.wait(), 10)
        ended = time.time()
        assert client.received[-1].event == "auth_expired"
        # Not at once (at exp it would have ended immediately): at exp + leeway.
        assert ended >= exp + leeway_s - 0.05, ended - exp
    finally:
        await server.close()
