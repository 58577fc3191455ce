"""Secure backends, end to end with real servers and certificates from devtools/pki.py.

- Redis with an ACL user and TLS: ingest and edge connect with rediss://user:password and a CA
  file, and the pipeline works; a wrong password keeps them not ready.
- Redis with ``tls-auth-clients yes`` (mutual TLS): with client certificates the pipeline
  works; without one, or with one of another CA, neither edge nor ingest becomes ready.
- Kafka with an SSL listener that requires client certificates: ingest consumes from it with a
  certificate of the broker's CA; without a certificate, or with one of another CA, the broker
  refuses the handshake and ingest never joins its group nor becomes ready.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.pki import LocalCA
from devtools.probes import TcpReady
from devtools.supervisor import ProcessSpec, Supervisor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event, free_port
from tests.harness.kafka_ssl import HANDSHAKE_FAILED, SslKafka, ssl_kafka
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(180)

ACL_PASSWORD = "s3cret-pass"


# -- Redis over TLS ------------------------------------------------------------------------------


class SecureRedis:
    """A Redis with a TLS port only, an ACL user ``crm`` and certificates of a local CA."""

    def __init__(self, run: Path, *, auth_clients: bool) -> None:
        self.run = run
        self.port = free_port()
        self.ca = LocalCA.open(run / "pki", name="crm-events test CA")
        server = self.ca.issue_server("redis")
        self.sup = Supervisor(run)
        # An ACL user limited to the test prefixes; the default user is disabled.
        (run / "redis.conf").write_text(
            f"""port 0
tls-port {self.port}
bind 127.0.0.1
tls-cert-file {server.cert}
tls-key-file {server.key}
tls-ca-cert-file {self.ca.cert_path}
tls-auth-clients {"yes" if auth_clients else "no"}
save ""
appendonly no
dir {run}
user default off
user crm on >{ACL_PASSWORD} ~crm-test-* &crm-test-* +@all
"""
        )
        self.spec = ProcessSpec(
            name="redis-tls",
            argv=["redis-server", str(run / "redis.conf")],
            ready=TcpReady("127.0.0.1", self.port),
            ready_timeout_s=20,
            port=self.port,
        )

    def url(self, password: str = ACL_PASSWORD) -> str:
        return f"rediss://crm:{password}@127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    """Server certificate only (``tls-auth-clients no``)."""
    redis = SecureRedis(Path(tmp_path_factory.mktemp("secure-redis")), auth_clients=False)
    redis.sup.start(redis.spec)
    yield redis
    redis.sup.stop(redis.spec.name)


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    """Client certificates required (``tls-auth-clients yes``)."""
    redis = SecureRedis(Path(tmp_path_factory.mktemp("mtls-redis")), auth_clients=True)
    redis.sup.start(redis.spec)
    yield redis
    redis.sup.stop(redis.spec.name)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _tls_cluster(
    backends: Backends,
    redis: SecureRedis,
    tmp_path_factory: pytest.TempPathFactory,
    password: str = ACL_PASSWORD,
    env: Mapping[str, str] | None = None,
) -> Cluster:
    """One ingest and one edge (no nginx) on the TLS Redis as the ACL user ``crm``."""
    return Cluster(
        Path(tmp_path_factory.mktemp("tls")),
        Backends(backends.kafka_bootstrap, redis.url(password), "tls"),
        edges=1,
        with_nginx=False,
        env={"CRM_EVENTS_REDIS_TLS_CA_FILE": str(redis.ca.cert_path), **(env or {})},
    )


async def _one_event_through(c: Cluster, session: aiohttp.ClientSession, what: str) -> None:
    client = Collector(c.edge_url(1, "/crm-events")).start(session)
    try:
        await client.wait_for(lambda col: col.node is not None, 10, "stream open")
        await c.produce([(b"k", crm_event(1, "DealWon"))])
        await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, what)
        assert client.data_frames[0].json()["event"]["Seq"] == 1
    finally:
        await client.stop()


async def _readyz(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


def _start_unready(c: Cluster) -> None:
    """Every process started without waiting for a readiness that must never come."""
    for name in c.names:
        c.sup.start(c.spec(name), wait=False)


async def test_pipeline_over_tls_with_an_acl_user(
    backends: Backends,
    secure_redis: SecureRedis,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    c = _tls_cluster(backends, secure_redis, tmp_path_factory)
    with c.running():
        await _one_event_through(c, session, "event over TLS")


async def test_wrong_password_is_not_ready(
    backends: Backends,
    secure_redis: SecureRedis,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    c = _tls_cluster(backends, secure_redis, tmp_path_factory, "wrong")
    _start_unready(c)
    try:

        async def not_ready_reason() -> bool:
            status, body = await _readyz(session, c.edge_url(1, "/readyz"))
            return status == 503 and body["redis"] is False

        await eventually(not_ready_reason, 20, "the edge to answer 503 with redis false")
        async with session.get(c.edge_url(1, "/healthz")) as resp:
            assert resp.status == 200
    finally:
        c.stop()


async def test_pipeline_over_mutual_tls_with_client_certificates(
    backends: Backends,
    mtls_redis: SecureRedis,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    # One certificate per service, as a deployment would issue them.
    client = mtls_redis.ca.issue_client("crm-events", common_name="crm-events")
    c = _tls_cluster(
        backends,
        mtls_redis,
        tmp_path_factory,
        env={
            "CRM_EVENTS_REDIS_TLS_CERT_FILE": str(client.cert),
            "CRM_EVENTS_REDIS_TLS_KEY_FILE": str(client.key),
        },
    )
    with c.running():
        await _one_event_through(c, session, "event over mutual TLS")


@pytest.mark.parametrize(
    ("credential", "alert"),
    [("no certificate", "certificate required"), ("another CA's certificate", "unknown ca")],
)
async def test_no_valid_client_certificate_for_mutual_tls_redis_is_not_ready(
    backends: Backends,
    mtls_redis: SecureRedis,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
    credential: str,
    alert: str,
) -> None:
    # The right CA and password; no certificate, or one the server's CA did not sign.
    env: dict[str, str] = {}
    if credential == "another CA's certificate":
        other = LocalCA.open(Path(tmp_path_factory.mktemp("other-ca")), name="another CA")
        forged = other.issue_client("crm-events", common_name="crm-events")
        env = {
            "CRM_EVENTS_REDIS_TLS_CERT_FILE": str(forged.cert),
            "CRM_EVENTS_REDIS_TLS_KEY_FILE": str(forged.key),
        }
    c = _tls_cluster(backends, mtls_redis, tmp_path_factory, env=env)
    _start_unready(c)
    try:
        for url in (c.edge_url(1, "/readyz"), c.ingest_url(1, "/readyz")):

            async def refused(url: str = url) -> bool:
                status, body = await _readyz(session, url)
                return status == 503 and body["redis"] is False

            await eventually(refused, 20, f"{url} to answer 503 with redis false")
        # Refused for the certificate (the server's TLS alert), not for anything else.
        await eventually(
            lambda: alert in c.log("edge1").lower(), 10, f"the edge to log the alert {alert!r}"
        )
    finally:
        c.stop()


# -- Kafka over mutual TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka_mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SslKafka]:
    """A private broker whose SSL listener requires client certificates (started once)."""
    with ssl_kafka(Path(tmp_path_factory.mktemp("kafka-ssl"))) as kafka:
        yield kafka


def _ssl_ingest(
    backends: Backends,
    kafka: SslKafka,
    tmp_path_factory: pytest.TempPathFactory,
    env: Mapping[str, str],
    edges: int,
) -> Cluster:
    """Ingest (and ``edges`` edges) on the stack's Redis, reading the SSL listener only."""
    return Cluster(
        Path(tmp_path_factory.mktemp("kafka-ssl-cluster")),
        Backends(kafka.ssl_bootstrap, backends.redis_url, "kafka-ssl"),
        edges=edges,
        with_nginx=False,
        env=env,
    )


async def test_ingest_consumes_from_a_kafka_listener_requiring_client_certificates(
    backends: Backends,
    kafka_mtls: SslKafka,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    ingest_cert = kafka_mtls.client("ingest")
    c = _ssl_ingest(backends, kafka_mtls, tmp_path_factory, kafka_mtls.env(ingest_cert), 1)
    with c.running():
        # Ready means it joined its group: through the SSL listener, the only one it knows.
        assert await kafka_mtls.group_members(c.group) == 1
        client = Collector(c.edge_url(1, "/crm-events")).start(session)
        try:
            await client.wait_for(lambda col: col.node is not None, 10, "stream open")
            records = [(b"k", crm_event(seq, "DealWon")) for seq in (1, 2, 3)]
            await kafka_mtls.produce(c.topic, records, kafka_mtls.client("producer"))
            await client.wait_for(
                lambda col: len(col.data_frames) >= 3, 30, "events from the SSL listener"
            )
            assert [f.json()["event"]["Seq"] for f in client.data_frames] == [1, 2, 3]
        finally:
            await client.stop()


@pytest.mark.parametrize("credential", ["no certificate", "another CA's certificate"])
async def test_ingest_without_a_valid_client_certificate_is_refused_by_kafka(
    backends: Backends,
    kafka_mtls: SslKafka,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
    credential: str,
) -> None:
    env = kafka_mtls.env(None)
    if credential == "another CA's certificate":
        # Same subject as the accepted one; only the signer differs.
        other = LocalCA.open(Path(tmp_path_factory.mktemp("other-ca")), name="another CA")
        forged = other.issue_client("ingest", common_name="ingest", organization="crm-events")
        env |= {
            "CRM_EVENTS_KAFKA_SSL_CERT_FILE": str(forged.cert),
            "CRM_EVENTS_KAFKA_SSL_KEY_FILE": str(forged.key),
        }
    refusals_before = kafka_mtls.log_text().count(HANDSHAKE_FAILED)
    c = _ssl_ingest(backends, kafka_mtls, tmp_path_factory, env, 0)
    _start_unready(c)
    try:

        async def kafka_circuit_open() -> bool:
            status, body = await _readyz(session, c.ingest_url(1, "/readyz"))
            return status == 503 and body["circuits"]["kafka"] != "closed"

        # Failures, not slowness: the ingest's own Kafka circuit opens on them.
        await eventually(kafka_circuit_open, 30, "ingest's Kafka circuit to open")
        await eventually(
            lambda: kafka_mtls.log_text().count(HANDSHAKE_FAILED) > refusals_before,
            5,
            "the broker to log the refused handshake",
        )
        status, body = await _readyz(session, c.ingest_url(1, "/readyz"))
        assert status == 503 and body["group_joined"] is False, body
        assert await kafka_mtls.group_members(c.group) == 0
    finally:
        c.stop()
