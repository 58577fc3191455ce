"""edge/client_cert.py and the certificate modes of edge/auth.py: the relayed header in both
encodings, the grants rules, the modes over HTTP (the in-memory bus), the trusted-peer check,
the end of a stream at the certificate's notAfter, and the edge served over mutual TLS.

Certificates come from devtools/pki.py (a local CA per module), except the short-lived one,
made here: the CA issues for whole days."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import math
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from devtools.pki import Issued, LocalCA
from edge import __main__ as edge_main
from edge.app import create_app
from edge.auth import Authenticator, issue_token
from edge.bus_memory import MemoryBus
from edge.client_cert import (
    GRANTS_SETTING,
    MAX_HEADER_CHARS,
    CertGrants,
    CertificateError,
    ClientCert,
    parse_relayed,
)
from shared.errors import SettingsError
from shared.httpkit import ApiError
from shared.security_settings import AuthSettings, EdgeTls, LimitSettings
from shared.settings import EdgeSettings, RedisSettings
from tests.sse_client import Collector

SECRET = "s" * 40
SUBJECT = "CN=crm-sync,O=crm-events local"
SPIFFE = "spiffe://acme/crm-sync"
HEADER = "X-Client-Cert"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.open(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def sync(ca: LocalCA) -> Issued:
    return ca.issue_client(
        "crm-sync", common_name="crm-sync", organization="crm-events local", uris=[SPIFFE]
    )


@pytest.fixture(scope="module")
def other(ca: LocalCA) -> Issued:
    """A certificate no rule names."""
    return ca.issue_client("stranger", common_name="stranger", dns=["stranger.example"])


def escaped_pem(issued: Issued) -> str:
    """As nginx's $ssl_client_escaped_cert."""
    return quote(issued.cert.read_text(), safe="")


def base64_der(cert: x509.Certificate) -> str:
    """As HAProxy's %[ssl_c_der,base64]."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


# -- the header ---------------------------------------------------------------------------------


def test_both_encodings_read_the_same_certificate(sync: Issued) -> None:
    cert = sync.certificate()
    pem = parse_relayed(escaped_pem(sync))
    der = parse_relayed(base64_der(cert))
    assert pem == der
    assert pem.subject_text == SUBJECT
    assert pem.sans == (("uri", SPIFFE),)
    assert pem.not_after == cert.not_valid_after_utc.timestamp()
    # A literal PEM (a proxy that does not escape) reads the same.
    assert parse_relayed(sync.cert.read_text()) == pem


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("-----BEGIN%20CERTIFICATE-----%0AMIIBnope%0A", id="broken-pem"),
        pytest.param(base64.b64encode(b"\x30\x03\x02\x01\x01").decode(), id="der-not-a-cert"),
        pytest.param("%FF%FE", id="escapes-not-utf8"),
        pytest.param("\udcff\udcfe", id="header-bytes-not-utf8"),
        pytest.param("A" * (MAX_HEADER_CHARS + 1), id="oversize"),
    ],
)
def test_unreadable_headers_are_refused(value: str) -> None:
    with pytest.raises(CertificateError):
        parse_relayed(value)


def test_a_key_is_not_a_certificate(sync: Issued) -> None:
    with pytest.raises(CertificateError, match="neither URL-escaped PEM nor base64 DER"):
        parse_relayed(quote(sync.key.read_text(), safe=""))


KEY = ec.generate_private_key(ec.SECP256R1())
SAN_OID = bytes.fromhex("0603551d11")  # 2.5.29.17, subjectAltName
IAN_OID = bytes.fromhex("0603551d12")  # 2.5.29.18, issuerAltName


def made(
    subject: x509.Name,
    *extensions: x509.ExtensionType,
    issuer: x509.Name | None = None,
) -> x509.Certificate:
    """A certificate as a client could present it (the edge checks no signature)."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(KEY, hashes.SHA256())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def x400_san() -> bytes:
    """A SAN holding an x400Address ([3]), which cryptography does not read: an otherName
    ([0], constructed) with its tag changed."""
    other = x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x0c\x01a")
    raw = der(made(cn("crm-sync"), x509.SubjectAlternativeName([other])))
    at = raw.index(b"\xa0", raw.index(SAN_OID) + len(SAN_OID))
    return raw[:at] + b"\xa3" + raw[at + 1 :]


def duplicate_extension() -> bytes:
    """Two subjectAltName extensions: an issuerAltName's OID rewritten."""
    names = [x509.DNSName("a.example")]
    raw = der(
        made(cn("crm-sync"), x509.SubjectAlternativeName(names), x509.IssuerAlternativeName(names))
    )
    return raw.replace(IAN_OID, SAN_OID)


@pytest.mark.parametrize(
    ("raw", "raises"),
    [
        pytest.param(x400_san, x509.UnsupportedGeneralNameType, id="x400-san"),
        pytest.param(duplicate_extension, x509.DuplicateExtension, id="duplicate-extension"),
    ],
)
def test_names_and_extensions_cryptography_cannot_read_are_unreadable_not_a_crash(
    raw: Any, raises: type[Exception]
) -> None:
    value = raw()
    # The envelope loads; reading the extensions raises something that is not a ValueError.
    with pytest.raises(raises) as raised:
        _ = x509.load_der_x509_certificate(value).extensions
    assert not isinstance(raised.value, ValueError)
    for relayed in (base64.b64encode(value).decode(), quote(pem_of(value), safe="")):
        with pytest.raises(CertificateError, match="a malformed certificate"):
            parse_relayed(relayed)


def pem_of(raw: bytes) -> str:
    body = base64.encodebytes(raw).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


# -- the rules ------------------------------------------------------------------------------------


def write_rules(path: Path, rules: Any) -> str:
    path.write_text(json.dumps(rules if isinstance(rules, dict) else {"rules": rules}))
    return str(path)


def load_rules(tmp_path: Path, rules: list[dict[str, Any]]) -> CertGrants:
    return CertGrants.load(write_rules(tmp_path / "grants.json", rules))


def client(subject: str, *sans: tuple[str, str], issuer: str = "CN=some CA") -> ClientCert:
    return ClientCert(
        x509.Name.from_rfc4514_string(subject),
        x509.Name.from_rfc4514_string(issuer),
        sans,
        0.0,
        0.0,
    )


def test_the_first_rule_matching_the_subject_or_a_san_grants(tmp_path: Path) -> None:
    grants = load_rules(
        tmp_path,
        [
            {"dns": "dns.example", "types": ["A"]},
            {"subject": SUBJECT, "types": ["*"], "match": {"TenantId": "t-1", "Level": 3}},
            {"uri": SPIFFE, "types": ["B"]},
        ],
    )

    def rule(subject: str, *sans: tuple[str, str]) -> Any:
        return grants.rule_for(client(subject, *sans))

    by_subject = rule(SUBJECT, ("uri", SPIFFE))
    assert by_subject is not None and by_subject.types is None  # rule 2 comes before rule 3
    assert by_subject.match == {("TenantId", "t-1"), ("Level", "3")}
    by_san = rule("CN=someone-else", ("uri", SPIFFE))
    assert by_san is not None and by_san.types == {b"B"}
    first = rule(SUBJECT, ("dns", "dns.example"))
    assert first is not None and first.types == {b"A"}  # rule 1 wins over rule 2
    assert rule("CN=crm-sync", ("uri", "spiffe://acme/other")) is None  # exact values only


def test_a_san_rule_matches_only_a_san_of_its_type(tmp_path: Path) -> None:
    grants = load_rules(tmp_path, [{"email": "alice@acme.example", "types": ["*"]}])
    # A URI (or DNS) SAN of the same text is another identity, which a CA may well issue.
    for kind in ("uri", "dns"):
        assert grants.rule_for(client("CN=mallory", (kind, "alice@acme.example"))) is None
    assert grants.rule_for(client("CN=alice", ("email", "alice@acme.example"))) is not None
    # Read from a real certificate: each SAN is typed.
    sans = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("alice@acme.example"), x509.DNSName("d.example")]
    )
    relayed = parse_relayed(base64.b64encode(der(made(cn("mallory"), sans))).decode())
    assert relayed.sans == (("uri", "alice@acme.example"), ("dns", "d.example"))
    assert grants.rule_for(relayed) is None


def test_a_rule_naming_an_issuer_matches_only_certificates_of_that_ca(
    tmp_path: Path, ca: LocalCA, sync: Issued, strangers_ca: LocalCA
) -> None:
    ours = ca.ca_cert.subject.rfc4514_string()
    grants = load_rules(
        tmp_path,
        [
            {"subject": SUBJECT, "issuer": ours, "types": ["A"]},
            {"uri": SPIFFE, "issuer": ours, "types": ["B"]},
        ],
    )
    genuine = parse_relayed(escaped_pem(sync))
    rule = grants.rule_for(genuine)
    assert rule is not None and rule.types == {b"A"}
    # The same subject and SAN from another CA (one the load balancer also trusts).
    lookalike = strangers_ca.issue_client(
        "crm-sync", common_name="crm-sync", organization="crm-events local", uris=[SPIFFE]
    )
    assert grants.rule_for(parse_relayed(escaped_pem(lookalike))) is None


def test_subjects_compare_as_names_so_a_multi_valued_rdn_matches_in_any_order(
    tmp_path: Path,
) -> None:
    rdn = x509.RelativeDistinguishedName(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b"),
            x509.NameAttribute(NameOID.COMMON_NAME, "a"),
        ]
    )
    relayed = parse_relayed(base64.b64encode(der(made(x509.Name([rdn])))).decode())
    assert relayed.subject_text == "CN=a+O=b"  # DER (set) order, whatever the builder's
    for written in ("O=b+CN=a", "CN=a+O=b"):
        grants = load_rules(tmp_path, [{"subject": written, "types": ["*"]}])
        assert grants.rule_for(relayed) is not None, written
    # Still attribute by attribute: not the same name.
    grants = load_rules(tmp_path, [{"subject": "CN=a,O=b", "types": ["*"]}])
    assert grants.rule_for(relayed) is None


def test_an_email_attribute_is_written_as_the_edge_prints_it(tmp_path: Path) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "x"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@b.example"),
        ]
    )
    relayed = parse_relayed(base64.b64encode(der(made(subject))).decode())
    printed = relayed.subject_text
    assert printed == "1.2.840.113549.1.9.1=a@b.example,CN=x"
    grants = load_rules(tmp_path, [{"subject": printed, "types": ["*"]}])
    assert grants.rule_for(relayed) is not None
    for openssl_style in ("emailAddress=a@b.example,CN=x", "CN=x,E=a@b.example"):
        with pytest.raises(SettingsError, match=r"written '1\.2\.840\.113549\.1\.9\.1="):
            load_rules(tmp_path, [{"subject": openssl_style, "types": ["*"]}])


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param("{not json", "is not JSON", id="not-json"),
        pytest.param([], "non-empty list", id="no-rules"),
        pytest.param({"rule": []}, '{"rules": [...]}', id="misspelt-top"),
        pytest.param(
            [{"types": ["*"]}],
            "rule 1: give exactly one of 'subject', 'uri', 'dns' and 'email'",
            id="no-subject-or-san",
        ),
        pytest.param(
            [{"subject": SUBJECT, "uri": SPIFFE, "types": ["*"]}], "exactly one", id="both"
        ),
        pytest.param(
            [{"uri": SPIFFE, "dns": "x.example", "types": ["*"]}], "exactly one", id="two-sans"
        ),
        pytest.param(
            [{"san": SPIFFE, "types": ["*"]}],
            "rule 1: 'san' is not a rule key: name the SAN's type, 'uri', 'dns' or 'email'",
            id="untyped-san",
        ),
        pytest.param([{"uri": SPIFFE}], "'types' must be", id="no-types"),
        pytest.param([{"uri": SPIFFE, "types": []}], "'types' must be", id="empty-types"),
        pytest.param([{"uri": SPIFFE, "types": ["a b"]}], "invalid event type", id="bad-type"),
        pytest.param([{"uri": SPIFFE, "typs": ["A"]}], "unknown key 'typs'", id="typo"),
        pytest.param([{"dns": "", "types": ["A"]}], "'dns' must be a non-empty", id="empty-dns"),
        pytest.param(
            [{"uri": SPIFFE, "types": ["A"], "match": {"TenantId": True}}],
            "'match' must map",
            id="bool-match",
        ),
        pytest.param(
            [{"uri": SPIFFE, "types": ["A"]}, {"subject": "CN=crm-sync, O=x", "types": ["A"]}],
            "rule 2: 'subject' 'CN=crm-sync, O=x' would never match: write it 'CN=crm-sync,O=x'",
            id="subject-not-as-printed",
        ),
        pytest.param([{"subject": "no equals sign", "types": ["A"]}], "RFC 4514", id="not-a-dn"),
        pytest.param(
            [{"email": "a@b.example", "issuer": "cn=Acme CA", "types": ["A"]}],
            "'issuer' 'cn=Acme CA' is not an RFC 4514 name",
            id="bad-issuer",
        ),
        pytest.param(
            [{"uri": SPIFFE, "issuer": 7, "types": ["A"]}],
            "'issuer' must be a non-empty string",
            id="issuer-not-text",
        ),
    ],
)
def test_a_bad_rules_file_names_the_setting_file_and_rule(
    tmp_path: Path, content: Any, says: str
) -> None:
    path = tmp_path / "grants.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_rules(path, content)
    with pytest.raises(SettingsError) as caught:
        CertGrants.load(str(path))
    assert caught.value.name == GRANTS_SETTING
    assert str(path) in str(caught.value)
    assert says in str(caught.value)


# -- the modes over HTTP --------------------------------------------------------------------------


def envelope(seq: int, type_: str) -> tuple[bytes, int, bytes]:
    data = json.dumps({"type": type_, "event": {"Type": type_, "Seq": seq}}, separators=(",", ":"))
    return type_.encode(), 1_700_000_000_000, data.encode()


class Edge:
    def __init__(self, server: TestServer, bus: MemoryBus, registry: CollectorRegistry) -> None:
        self.server, self.bus, self.registry = server, bus, registry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def history(
        self, session: aiohttp.ClientSession, headers: dict[str, str], query: str = ""
    ) -> tuple[int, Any]:
        async with session.get(
            self.server.make_url("/crm-events/history" + query), headers=headers
        ) as resp:
            return resp.status, await resp.json()


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    return write_rules(
        tmp_path / "grants.json",
        [
            {"subject": SUBJECT, "types": ["A", "B"], "match": {"TenantId": "t-1"}},
            {"dns": "only-c.example", "types": ["C"]},
        ],
    )


@pytest.fixture
async def start_edge(rules_file: str) -> AsyncIterator[Any]:
    started: list[TestServer] = []

    async def start(
        mode: str,
        *,
        leeway_s: int = 30,
        cert_trusted: str = "127.0.0.1",
        forwarded_trusted: str = "127.0.0.1",
    ) -> Edge:
        bus, registry = MemoryBus(), CollectorRegistry()
        settings = EdgeSettings(
            redis=RedisSettings(),
            node_id="edge-cert",
            ping_interval_s=0.2,
            auth=AuthSettings(
                mode=mode,
                secret=SECRET,
                leeway_s=leeway_s,
                cert_grants_file=rules_file,
                cert_trusted_proxies=frozenset({cert_trusted}),
            ),
            # The default header cap (CRM_EVENTS_MAX_HEADER_BYTES): a certificate header just
            # over its own cap, with a token beside it, must still reach the edge's check.
            limits=LimitSettings(trusted_proxies=frozenset({forwarded_trusted})),
        )
        server = TestServer(create_app(settings, registry=registry, bus=bus))
        await server.start_server()
        started.append(server)
        bus.publish([envelope(1, "A"), envelope(2, "B"), envelope(3, "C")], match=b"TenantId=t-1")
        bus.publish([envelope(4, "A")], match=b"TenantId=t-2")
        return Edge(server, bus, registry)

    yield start
    for server in started:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def seqs(body: Any) -> list[int]:
    return [item["event"]["Seq"] for item in body["items"]]


def bearer(types: list[str], **kw: Any) -> dict[str, str]:
    return {"Authorization": "Bearer " + issue_token(SECRET, types=types, **kw)}


async def test_cert_mode_grants_by_the_rules_in_either_encoding(
    start_edge: Any, session: aiohttp.ClientSession, sync: Issued, other: Issued
) -> None:
    edge = await start_edge("cert")
    for value in (escaped_pem(sync), base64_der(sync.certificate())):
        status, body = await edge.history(session, {HEADER: value})
        assert status == 200, body
        assert seqs(body) == [1, 2]  # types A and B, tenant t-1 only
    status, body = await edge.history(session, {HEADER: escaped_pem(sync)}, "?types=C")
    assert (status, body["error"]) == (403, "forbidden")
    assert "client certificate does not grant" in body["message"]
    # A token alone does not do in this mode; a certificate no rule names grants nothing.
    async with session.get(
        edge.server.make_url("/crm-events/history"), headers=bearer(["*"])
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"
        # No HTTP scheme names a TLS client certificate: no Bearer challenge in this mode.
        assert "WWW-Authenticate" not in resp.headers
    status, body = await edge.history(session, {HEADER: escaped_pem(other)})
    assert (status, body) == (
        403,
        {"error": "forbidden", "message": "the client certificate grants nothing"},
    )
    assert edge.metric("crm_events_auth_failures_total", reason="forbidden") == 2


async def test_an_unreadable_header_is_401_invalid_certificate(
    start_edge: Any, session: aiohttp.ClientSession
) -> None:
    edge = await start_edge("jwt-or-cert")
    values = {
        "garbage": "neither URL-escaped PEM",
        # Over the certificate cap, under the default cap on all headers (not 431).
        "A" * (MAX_HEADER_CHARS + 1): f"longer than {MAX_HEADER_CHARS}",
        # Parses, but holds a SAN type cryptography cannot read (not a 500).
        base64.b64encode(x400_san()).decode(): "a malformed certificate",
    }
    for value, says in values.items():
        # A token is there too: a relayed certificate that is wrong is not skipped for it.
        status, body = await edge.history(session, {HEADER: value, **bearer(["*"])})
        assert (status, body["error"]) == (401, "invalid_certificate"), body
        assert says in body["message"]
    assert edge.metric("crm_events_auth_failures_total", reason="invalid_certificate") == 3
    async with session.get(
        edge.server.make_url("/crm-events/history"), headers={HEADER: "garbage"}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_a_header_from_an_untrusted_peer_is_ignored_and_counted(
    start_edge: Any, sync: Issued
) -> None:
    # 127.0.0.0/8 is all loopback: a client bound to 127.0.0.2 is a peer the edge (trusting
    # 127.0.0.1 only) does not trust, on the same machine.
    edge = await start_edge("jwt-or-cert")
    forged = {HEADER: escaped_pem(sync)}
    untrusted = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=untrusted) as outsider:
        status, body = await edge.history(outsider, forged)
        assert (status, body["error"]) == (401, "unauthorized")  # as if no header came
        # With a token, the token's grant applies, not the certificate's wider one.
        status, body = await edge.history(outsider, {**forged, **bearer(["C"])}, "?types=A")
        assert (status, body["error"]) == (403, "forbidden")
        assert "the token does not grant" in body["message"]
    assert edge.metric("crm_events_untrusted_cert_headers_total") == 2
    async with aiohttp.ClientSession() as proxy:  # from 127.0.0.1: believed
        status, body = await edge.history(proxy, forged)
        assert (status, seqs(body)) == (200, [1, 2])
    assert edge.metric("crm_events_untrusted_cert_headers_total") == 2


async def test_the_certificate_header_has_its_own_trusted_proxies(
    sync: Issued, start_edge: Any
) -> None:
    # 127.0.0.1 may name the client in X-Forwarded-For (CRM_EVENTS_TRUSTED_PROXIES), but only
    # 127.0.0.2 may relay a certificate (CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES).
    edge = await start_edge("cert", cert_trusted="127.0.0.2", forwarded_trusted="127.0.0.1")
    relayed = {HEADER: escaped_pem(sync)}
    async with aiohttp.ClientSession() as forwarder:  # from 127.0.0.1
        status, body = await edge.history(forwarder, relayed)
        assert (status, body["error"]) == (401, "unauthorized")  # as if no header came
    assert edge.metric("crm_events_untrusted_cert_headers_total") == 1
    relay = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=relay) as proxy:
        status, body = await edge.history(proxy, relayed)
        assert (status, seqs(body)) == (200, [1, 2])
    assert edge.metric("crm_events_untrusted_cert_headers_total") == 1


async def test_jwt_or_cert_takes_either(
    start_edge: Any, session: aiohttp.ClientSession, sync: Issued
) -> None:
    edge = await start_edge("jwt-or-cert")
    status, body = await edge.history(session, bearer(["C"]))
    assert (status, seqs(body)) == (200, [3])
    status, body = await edge.history(session, {HEADER: escaped_pem(sync)})
    assert (status, seqs(body)) == (200, [1, 2])
    async with session.get(edge.server.make_url("/crm-events/history")) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="crm-events"')
        assert "client certificate" in (await resp.json())["message"]


async def test_jwt_and_cert_needs_both_and_grants_what_both_grant(
    start_edge: Any, session: aiohttp.ClientSession, sync: Issued
) -> None:
    edge = await start_edge("jwt-and-cert")
    cert = {HEADER: escaped_pem(sync)}  # A, B of tenant t-1
    for headers in (cert, bearer(["*"])):
        status, body = await edge.history(session, headers)
        assert (status, body["error"]) == (401, "unauthorized")
    # Types: both must grant (B); match: both constraints (t-1 from the certificate).
    status, body = await edge.history(session, {**cert, **bearer(["B", "C"])})
    assert (status, seqs(body)) == (200, [2])
    status, body = await edge.history(session, {**cert, **bearer(["B"])}, "?types=A")
    assert (status, body["error"]) == (403, "forbidden")
    assert "do not both grant" in body["message"]
    status, body = await edge.history(session, {**cert, **bearer(["C"])})
    assert (status, body["error"]) == (403, "forbidden")  # no type in common
    token = bearer(["*"], match={"TenantId": "t-2"})
    status, body = await edge.history(session, {**cert, **token})
    assert (status, body["error"]) == (403, "forbidden")  # t-1 and t-2: nothing
    assert "different values of TenantId" in body["message"]


def short_lived(issued: Issued, ca: LocalCA, not_after: float) -> x509.Certificate:
    """The subject of ``issued`` on a certificate ending at ``not_after`` (whole seconds)."""
    key = ec.generate_private_key(ec.SECP256R1())
    end = dt.datetime.fromtimestamp(not_after, dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(issued.certificate().subject)
        .issuer_name(ca.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(end - dt.timedelta(hours=1))
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )


async def test_a_stream_ends_at_the_certificates_not_after_before_the_tokens_exp(
    start_edge: Any, session: aiohttp.ClientSession, sync: Issued, ca: LocalCA
) -> None:
    edge = await start_edge("jwt-and-cert", leeway_s=0)
    now = time.time()
    # notAfter has whole seconds: the next one, unless it is too close to be usable.
    not_after = math.floor(now) + (2 if now % 1 > 0.7 else 1)
    cert = short_lived(sync, ca, not_after)
    client = Collector(
        str(edge.server.make_url("/crm-events")),
        headers={HEADER: base64_der(cert), **bearer(["*"], ttl_s=3600)},
    ).start(session)
    await asyncio.wait_for(client.ended.wait(), 5)
    assert client.status == 200
    assert client.received[-1].event == "auth_expired"
    # One machine code whatever ran out; the text names both credentials.
    assert client.received[-1].json() == {
        "error": "token_expired",
        "message": "the access token or the client certificate has expired",
    }
    assert not_after - 0.05 <= time.time() < not_after + 1.0
    assert edge.metric("crm_events_sse_disconnects_total", reason="token_expired") == 1
    # Past notAfter (and the leeway) it is refused, as an expired token is.
    status, body = await edge.history(session, {HEADER: base64_der(cert), **bearer(["*"])})
    assert (status, body["error"]) == (401, "invalid_certificate")
    assert body["message"] == "the client certificate has expired"


# -- the edge over mutual TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(ca: LocalCA) -> EdgeTls:
    server = ca.issue_server("edge")
    return EdgeTls(str(server.cert), str(server.key), str(ca.cert_path))


def client_context(ca: LocalCA, cert: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


@pytest.fixture
async def tls_edge(tls: EdgeTls) -> AsyncIterator[TestServer]:
    settings = EdgeSettings(redis=RedisSettings(), node_id="edge-tls", tls=tls)
    server = TestServer(create_app(settings, registry=CollectorRegistry(), bus=MemoryBus()))
    await server.start_server(ssl=tls.context)
    yield server
    await server.close()


@pytest.fixture(scope="module")
def strangers_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.open(tmp_path_factory.mktemp("other-pki"), name="another CA")


async def test_over_mutual_tls_only_a_peer_with_a_certificate_of_the_ca_connects(
    tls_edge: TestServer, ca: LocalCA, strangers_ca: LocalCA
) -> None:
    url = tls_edge.make_url("/crm-events/history")
    assert url.scheme == "https"
    proxy = ca.issue_client("proxy", common_name="nginx")
    async with aiohttp.ClientSession() as s, s.get(url, ssl=client_context(ca, proxy)) as resp:
        assert resp.status == 200
        assert (await resp.json())["count"] == 0
    impostor = strangers_ca.issue_client("proxy", common_name="nginx")
    for cert in (None, impostor):
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession() as s, s.get(url, ssl=client_context(ca, cert)):
                pass
    # Plain HTTP to the TLS port gets nowhere either.
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as s, s.get(url.with_scheme("http")) as resp:
            await resp.read()


def test_the_tls_context_requires_a_client_certificate(tls: EdgeTls) -> None:
    assert tls.context is not None and tls.mutual
    assert tls.context.verify_mode == ssl.CERT_REQUIRED
    assert tls.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert "context" not in repr(tls)
    assert EdgeTls().context is None


def test_expiry_and_not_yet_valid_allow_the_leeway(rules_file: str, sync: Issued) -> None:
    auth = Authenticator(AuthSettings(mode="cert", cert_grants_file=rules_file, leeway_s=30))
    cert = parse_relayed(escaped_pem(sync))
    assert auth.cert_grant(cert).expires_at == cert.not_after
    assert auth.cert_grant(cert, now=cert.not_after + 29).types == {b"A", b"B"}
    assert auth.cert_grant(cert, now=cert.not_before - 29).types == {b"A", b"B"}
    for now in (cert.not_after + 30, cert.not_before - 31):
        with pytest.raises(ApiError) as caught:
            auth.cert_grant(cert, now=now)
        assert (caught.value.status, caught.value.code) == (401, "invalid_certificate")


def test_the_edge_does_not_start_with_a_bad_rules_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for key in list(os.environ):
        if key.startswith("CRM_EVENTS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CRM_EVENTS_AUTH_MODE", "cert")
    monkeypatch.setenv(
        "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE", write_rules(tmp_path / "g.json", [{"san": "x"}])
    )
    with pytest.raises(SystemExit) as exited:
        edge_main.main(["--check-config"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"crm-events-edge: error: bad setting {GRANTS_SETTING}: {tmp_path / 'g.json'}: rule 1: "
    )


@pytest.mark.parametrize(
    ("mode", "proxies", "mutual", "refused"),
    [
        pytest.param("cert", "10.0.0.0/8", False, True, id="network"),
        pytest.param("jwt-or-cert", "127.0.0.1,10.1.2.0/31", False, True, id="two-addresses"),
        pytest.param("cert", "10.0.0.0/8", True, False, id="behind-edge-mtls"),
        pytest.param("cert", "10.1.2.3/32,fd00::1/128,127.0.0.1", False, False, id="addresses"),
        pytest.param("jwt", "10.0.0.0/8", False, False, id="no-certificates"),
    ],
)
def test_a_network_trusted_to_relay_certificates_needs_the_edges_mutual_tls(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    ca: LocalCA,
    mode: str,
    proxies: str,
    mutual: bool,
    refused: bool,
) -> None:
    for key in list(os.environ):
        if key.startswith("CRM_EVENTS_"):
            monkeypatch.delenv(key)
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    env = {
        "AUTH_MODE": mode,
        "JWT_SECRET_FILE": str(secret),
        "CLIENT_CERT_GRANTS_FILE": write_rules(tmp_path / "g.json", [{"uri": "x", "types": ["*"]}]),
        "CLIENT_CERT_TRUSTED_PROXIES": proxies,
    }
    if mutual:
        edge = ca.issue_server("edge")
        env |= {
            "EDGE_TLS_CERT_FILE": str(edge.cert),
            "EDGE_TLS_KEY_FILE": str(edge.key),
            "EDGE_TLS_CLIENT_CA_FILE": str(ca.cert_path),
        }
    for key, value in env.items():
        monkeypatch.setenv("CRM_EVENTS_" + key, value)
    if not refused:
        edge_main.main(["--check-config"])
        return
    with pytest.raises(SystemExit) as exited:
        edge_main.main(["--check-config"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "crm-events-edge: error: bad setting CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES:"
    )
    assert "is a network, not one address" in err and "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE" in err
