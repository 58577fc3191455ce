"""Redis with an ACL user and TLS: ingest and edge connect with rediss://user:password and a
CA file, and the pipeline works end to end; a wrong password keeps them not ready."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from devtools.probes import TcpReady
from devtools.supervisor import ProcessSpec, Supervisor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event, free_port
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(180)


def make_certs(out: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=out)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
    )
    (out / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
        "-out",
        "redis.crt",
    )


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    run = Path(tmp_path_factory.mktemp("secure-redis"))
    make_certs(run)
    port = free_port()
    # An ACL user limited to the test prefixes; the default user is disabled.
    (run / "redis.conf").write_text(
        f"""port 0
tls-port {port}
bind 127.0.0.1
tls-cert-file {run / "redis.crt"}
tls-key-file {run / "redis.key"}
tls-ca-cert-file {run / "ca.crt"}
tls-auth-clients no
save ""
appendonly no
dir {run}
user default off
user crm on >s3cret-pass ~crm-test-* &crm-test-* +@all
"""
    )
    spec = ProcessSpec(
        name="redis-tls",
        argv=["redis-server", str(run / "redis.conf")],
        ready=TcpReady("127.0.0.1", port),
        ready_timeout_s=20,
        port=port,
    )
    sup = Supervisor(run)
    sup.start(spec)
    yield port, run / "ca.crt"
    sup.stop("redis-tls")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _tls_cluster(
    backends: Backends,
    secure_redis: tuple[int, Path],
    tmp_path_factory: pytest.TempPathFactory,
    password: str,
) -> Cluster:
    """One ingest and one edge (no nginx) on the TLS Redis as the ACL user ``crm``."""
    port, ca = secure_redis
    url = f"rediss://crm:{password}@127.0.0.1:{port}/0"
    return Cluster(
        Path(tmp_path_factory.mktemp("tls")),
        Backends(backends.kafka_bootstrap, url, "tls"),
        edges=1,
        with_nginx=False,
        env={"CRM_EVENTS_REDIS_TLS_CA_FILE": str(ca)},
    )


async def test_pipeline_over_tls_with_an_acl_user(
    backends: Backends,
    secure_redis: tuple[int, Path],
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    c = _tls_cluster(backends, secure_redis, tmp_path_factory, "s3cret-pass")
    with c.running():
        client = Collector(c.edge_url(1, "/crm-events")).start(session)
        await client.wait_for(lambda col: col.node is not None, 10, "stream open")
        await c.produce([(b"k", crm_event(1, "DealWon"))])
        await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, "event over TLS")
        assert client.data_frames[0].json()["event"]["Seq"] == 1
        await client.stop()


async def test_wrong_password_is_not_ready(
    backends: Backends,
    secure_redis: tuple[int, Path],
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    c = _tls_cluster(backends, secure_redis, tmp_path_factory, "wrong")
    # Started without waiting for readiness, which must never come.
    for name in c.names:
        c.sup.start(c.spec(name), wait=False)
    try:

        async def not_ready_reason() -> bool:
            async with session.get(c.edge_url(1, "/readyz")) as resp:
                return resp.status == 503 and (await resp.json())["redis"] is False

        await eventually(not_ready_reason, 20, "the edge to answer 503 with redis false")
        async with session.get(c.edge_url(1, "/healthz")) as resp:
            assert resp.status == 200
    finally:
        c.stop()
