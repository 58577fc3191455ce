"""Client certificates (mutual TLS) on real load balancers and edges.

Certificates come from devtools/pki.py: one CA for the deployment (a client certificate
``crm-sync``, a revoked one, the CRL), and a second, foreign CA that issues a certificate with
the very same subject, so that a refusal can only come from the CA check, not from the grants.

Three deployments, one per module (each with one edge and its own Kafka topic):
- ``nginx``: nginx with its mutual-TLS listener, edges in ``jwt-or-cert``;
- ``both``: edges in ``jwt-and-cert`` that serve HTTPS and require nginx's own client
  certificate, of a CA of the proxy link alone (nginx -> edge over mutual TLS);
- ``haproxy``: HAProxy with a ``verify required`` bind, edges in ``jwt-or-cert``.

The edges trust 127.0.0.1 alone as a proxy. All of 127.0.0.0/8 is loopback on Linux, so a
client that binds 127.0.0.2 reaches an edge directly from an untrusted address.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.pki import Issued, LocalCA
from edge.auth import issue_token
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, EdgeTls, LbMtls, crm_event
from tests.sse_client import Collector

pytestmark = pytest.mark.timeout(120)

SECRET = "mtls-test-secret-0123456789-0123456789-abcdef"
HEADER = "X-Client-Cert"
SUBJECT_ORG = "crm-events test"


@dataclass(frozen=True)
class Pki:
    ca: LocalCA
    client: Issued
    revoked: Issued
    foreign: Issued
    """Same subject as ``client``, issued by another CA."""
    link: LocalCA
    """The CA of the nginx -> edge link alone: the clients' CA opens no edge."""
    grants: Path
    secret: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = Path(tmp_path_factory.mktemp("mtls-pki"))
    ca = LocalCA.open(base / "ca")
    client = ca.issue_client("crm-sync", common_name="crm-sync", organization=SUBJECT_ORG)
    revoked = ca.issue_client("crm-sync-old", common_name="crm-sync-old", organization=SUBJECT_ORG)
    ca.revoke(revoked.cert)
    other = LocalCA.open(base / "other", name="some other CA")
    foreign = other.issue_client("crm-sync", common_name="crm-sync", organization=SUBJECT_ORG)
    # The revoked certificate's subject is granted too: it is refused by the CRL, nothing else.
    grants = base / "grants.json"
    rules = [
        {"subject": c.certificate().subject.rfc4514_string(), "types": ["*"]}
        for c in (client, revoked)
    ]
    grants.write_text(json.dumps({"rules": rules}))
    secret = base / "jwt-secret"
    secret.write_text(SECRET)
    link = LocalCA.open(base / "link", name="proxy link CA")
    return Pki(ca, client, revoked, foreign, link, grants, secret)


def _env(pki: Pki, mode: str) -> dict[str, str]:
    return {
        "CRM_EVENTS_AUTH_MODE": mode,
        "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE": str(pki.grants),
        "CRM_EVENTS_JWT_SECRET_FILE": str(pki.secret),
        "CRM_EVENTS_TRUSTED_PROXIES": "127.0.0.1",
    }


def _deployment(
    tmp_path_factory: pytest.TempPathFactory, backends: Backends, name: str, **kwargs: object
) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp(name)), backends, edges=1, **kwargs)  # type: ignore[arg-type]
    with c.running():
        yield c


@pytest.fixture(scope="module")
def nginx(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Cluster]:
    yield from _deployment(
        tmp_path_factory,
        backends,
        "mtls-nginx",
        env=_env(pki, "jwt-or-cert"),
        lb_mtls=LbMtls.from_ca(pki.ca),
    )


@pytest.fixture(scope="module")
def both(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Cluster]:
    yield from _deployment(
        tmp_path_factory,
        backends,
        "mtls-both",
        env=_env(pki, "jwt-and-cert"),
        lb_mtls=LbMtls.from_ca(pki.ca),
        edge_tls=EdgeTls.from_ca(pki.link),
    )


@pytest.fixture(scope="module")
def haproxy(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Cluster]:
    yield from _deployment(
        tmp_path_factory,
        backends,
        "mtls-haproxy",
        env=_env(pki, "jwt-or-cert"),
        lb="haproxy",
        lb_mtls=LbMtls.from_ca(pki.ca),
    )


def _tls(pki: Pki, cert: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


@pytest.fixture
async def sessions() -> AsyncIterator[list[aiohttp.ClientSession]]:
    """Closes whatever sessions a test opened with :func:`_session`."""
    opened: list[aiohttp.ClientSession] = []
    yield opened
    for s in opened:
        await s.close()


def _session(
    opened: list[aiohttp.ClientSession],
    tls: ssl.SSLContext | None = None,
    local_addr: str | None = None,
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        ssl=tls if tls is not None else False,
        local_addr=(local_addr, 0) if local_addr else None,
        force_close=True,
    )
    s = aiohttp.ClientSession(connector=connector)
    opened.append(s)
    return s


def _bearer() -> dict[str, str]:
    token = issue_token(SECRET, types=["*"], ttl_s=600, subject="mtls-test")
    return {"Authorization": f"Bearer {token}"}


def _forged(cert: Issued) -> dict[str, str]:
    """The header as nginx relays a verified certificate: the PEM, URL-escaped."""
    return {HEADER: urllib.parse.quote(cert.cert.read_text(), safe="")}


async def _edge_counters(c: Cluster, session: aiohttp.ClientSession) -> dict[str, float]:
    """What the edge counts when a request reaches it: streams opened, requests refused by
    authentication, headers ignored from untrusted peers. (Not its request count: a stream an
    earlier test closed is counted when the edge notices, at any time.)"""
    async with session.get(c.edge_url(1, "/metrics")) as resp:
        text = await resp.text()
    out = {"refused": 0.0, "streams": 0.0, "untrusted": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "crm_events_auth_failures_total":
                out["refused"] += sample.value
            elif sample.name == "crm_events_sse_connections_total":
                out["streams"] += sample.value
            elif sample.name == "crm_events_untrusted_cert_headers_total":
                out["untrusted"] += sample.value
    return out


async def _status_of_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Status, content type and (for an error) body of a stream request; a stream that opens
    is closed at once."""
    async with session.get(url, headers=headers or {}) as resp:
        body = "" if resp.status == 200 else await resp.text()
        return resp.status, resp.content_type, body


async def _events_arrive(
    c: Cluster, session: aiohttp.ClientSession, url: str, seq: int, headers: dict[str, str]
) -> None:
    stream = Collector(url, headers=headers).start(session)
    try:
        await stream.wait_for(lambda s: s.node is not None or s.ended.is_set(), 15, "stream open")
        assert stream.status == 200 and not stream.ended.is_set(), stream.status
        await c.produce([(b"k", crm_event(seq))])
        await stream.wait_for(
            lambda s: any(json.loads(f.data)["event"]["Seq"] == seq for f in s.data_frames),
            30,
            f"event {seq} through {url}",
        )
    finally:
        await stream.stop()


# -- nginx --------------------------------------------------------------------------------------


async def test_nginx_a_valid_client_certificate_streams_events(
    nginx: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    session = _session(sessions, _tls(pki, pki.client))
    await _events_arrive(nginx, session, nginx.lb_mtls_url("/crm-events"), 1, {})


@pytest.mark.parametrize(
    ("which", "status", "error"),
    [
        ("none", 401, "client_certificate_required"),
        ("foreign", 403, "invalid_client_certificate"),
        ("revoked", 403, "invalid_client_certificate"),
    ],
)
async def test_nginx_refuses_a_missing_foreign_or_revoked_certificate_before_the_edge(
    nginx: Cluster,
    pki: Pki,
    sessions: list[aiohttp.ClientSession],
    which: str,
    status: int,
    error: str,
) -> None:
    cert = {"none": None, "foreign": pki.foreign, "revoked": pki.revoked}[which]
    session = _session(sessions, _tls(pki, cert))
    plain = _session(sessions)
    before = await _edge_counters(nginx, plain)
    got = await _status_of_stream(session, nginx.lb_mtls_url("/crm-events"))
    assert got[:2] == (status, "application/json"), got
    assert json.loads(got[2])["error"] == error, got
    # Answered by nginx itself: the edge saw no request and opened no stream.
    after = await _edge_counters(nginx, plain)
    assert after == before, (before, after)


async def test_nginx_blanks_a_forged_header_on_its_plain_listener(
    nginx: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    plain = _session(sessions)
    # The same header sent straight to the edge from 127.0.0.1 (a trusted proxy) opens a
    # stream: the header is good, so only nginx blanking it can make the next request fail.
    direct = await _status_of_stream(plain, nginx.edge_url(1, "/crm-events"), _forged(pki.client))
    assert direct[0] == 200, direct
    status, ctype, body = await _status_of_stream(
        plain, nginx.lb_url("/crm-events"), _forged(pki.client)
    )
    assert (status, ctype) == (401, "application/json"), body
    assert json.loads(body)["error"] == "unauthorized"


async def test_edge_ignores_the_header_from_an_untrusted_address(
    nginx: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    plain = _session(sessions)
    untrusted = _session(sessions, local_addr="127.0.0.2")
    before = await _edge_counters(nginx, plain)
    status, ctype, body = await _status_of_stream(
        untrusted, nginx.edge_url(1, "/crm-events"), _forged(pki.client)
    )
    assert (status, ctype) == (401, "application/json"), body
    after = await _edge_counters(nginx, plain)
    # Counted as a header ignored, then refused for lack of a token or certificate.
    assert after == {
        "untrusted": before["untrusted"] + 1,
        "refused": before["refused"] + 1,
        "streams": before["streams"],
    }


# -- both a token and a certificate; nginx -> edge over mutual TLS ------------------------------


async def test_jwt_and_cert_needs_both_over_mutual_tls_to_the_edge(
    both: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    with_cert = _session(sessions, _tls(pki, pki.client))
    # Both: events arrive, through nginx's proxy link to an edge that speaks only mutual TLS.
    await _events_arrive(both, with_cert, both.lb_mtls_url("/crm-events"), 2, _bearer())
    # A certificate alone, and a token alone (the plain listener has no certificate): 401.
    status, _, body = await _status_of_stream(with_cert, both.lb_mtls_url("/crm-events"))
    assert status == 401, body
    plain = _session(sessions)
    status, _, body = await _status_of_stream(plain, both.lb_url("/crm-events"), _bearer())
    assert status == 401, body


async def test_an_edge_with_tls_refuses_a_client_without_the_proxy_certificate(
    both: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    assert both.edge_tls is not None
    proxy = _session(sessions, both.edge_tls.client_context())
    async with proxy.get(both.edge_url(1, "/readyz")) as resp:
        assert resp.status == 200
    # No certificate, or a client certificate that nginx's listener accepts (another CA's).
    with_client_cert = both.edge_tls.client_context(with_cert=False)
    with_client_cert.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    for tls in (both.edge_tls.client_context(with_cert=False), with_client_cert):
        stranger = _session(sessions, tls)
        with pytest.raises(aiohttp.ClientError):
            async with stranger.get(both.edge_url(1, "/readyz")) as resp:
                await resp.read()


# -- HAProxy ----------------------------------------------------------------------------------


async def test_haproxy_a_valid_client_certificate_streams_events(
    haproxy: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    session = _session(sessions, _tls(pki, pki.client))
    await _events_arrive(haproxy, session, haproxy.lb_mtls_url("/crm-events"), 3, {})


@pytest.mark.parametrize("which", ["none", "foreign", "revoked"])
async def test_haproxy_refuses_a_missing_foreign_or_revoked_certificate_at_the_handshake(
    haproxy: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession], which: str
) -> None:
    cert = {"none": None, "foreign": pki.foreign, "revoked": pki.revoked}[which]
    session = _session(sessions, _tls(pki, cert))
    plain = _session(sessions)
    before = await _edge_counters(haproxy, plain)
    with pytest.raises(aiohttp.ClientError):
        async with session.get(haproxy.lb_mtls_url("/crm-events")) as resp:
            await resp.read()
    assert await _edge_counters(haproxy, plain) == before


async def test_haproxy_drops_a_forged_header_on_its_plain_listener(
    haproxy: Cluster, pki: Pki, sessions: list[aiohttp.ClientSession]
) -> None:
    plain = _session(sessions)
    status, ctype, body = await _status_of_stream(
        plain, haproxy.lb_url("/crm-events"), _forged(pki.client)
    )
    assert (status, ctype) == (401, "application/json"), body
