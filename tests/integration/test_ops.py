"""Operations endpoints, readiness against a Redis that goes away, and SIGTERM handoff."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.supervisor import ProcessSpec, Supervisor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event
from tests.harness.redis_server import private_redis as shared_private_redis
from tests.integration.checks import assert_exactly_once_in_order
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)

EDGE_METRICS = {
    "crm_events_sse_clients",
    "crm_events_messages",
    "crm_events_http_requests",
    "crm_events_delivery_latency_seconds",
    "crm_events_sse_disconnects",
    "crm_events_sse_resumes",
    "crm_events_sse_resets",
    "crm_events_ready",
    # Memory an alert watches (issue 18).
    "process_resident_memory_bytes",
    "crm_events_cache_bytes",
    "crm_events_replay_ring_bytes",
    "crm_events_client_objects",
    "crm_events_gc_full_collection_seconds",
    "crm_events_gc_unreachable_objects",
}
INGEST_METRICS = {
    "crm_events_messages",
    "crm_events_http_requests",
    "crm_events_consumer_lag",
    "crm_events_dead_letters",
    "crm_events_ingest_records",
    "crm_events_ingest_batch_duration_seconds",
    "crm_events_ready",
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def families(session: aiohttp.ClientSession, url: str) -> tuple[str, set[str]]:
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return text, {f.name for f in text_string_to_metric_families(text)}


async def test_every_process_exports_parseable_metrics(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    # Some traffic first, so that the lag gauge has partitions and the histogram samples.
    await cluster.produce((None, crm_event(i)) for i in range(10))
    async with session.get(cluster.edge_url(1, "/crm-events/history?n=1")) as resp:
        assert resp.status == 200
    targets = [(cluster.ingest_url(1, "/metrics"), INGEST_METRICS)] + [
        (cluster.edge_url(i, "/metrics"), EDGE_METRICS) for i in (1, 2)
    ]
    for url, required in targets:
        text, names = await families(session, url)
        assert required <= names, f"{url} lacks {sorted(required - names)}"
        promtool = shutil.which("promtool")
        if promtool:
            lint = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr

    async def lag_reported() -> bool:
        text, _ = await families(session, cluster.ingest_url(1, "/metrics"))
        return 'crm_events_consumer_lag{partition="0"' in text

    await eventually(lag_reported, 15, "consumer lag per partition")


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints(
    cluster: Cluster, session: aiohttp.ClientSession, path: str
) -> None:
    for url in (cluster.ingest_url(1, path), cluster.edge_url(1, path), cluster.edge_url(2, path)):
        async with session.get(url) as resp:
            assert resp.status == 200, url
            assert (await resp.json())["status"] in ("ok", "ready")


@pytest.fixture(scope="module")
def private_redis(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Supervisor, ProcessSpec]]:
    """A Redis of this module's own, so that stopping it disturbs no other test."""
    sup, spec = shared_private_redis(Path(tmp_path_factory.mktemp("private-redis")), False)
    sup.start(spec)
    yield sup, spec
    sup.stop("redis")


async def test_readyz_follows_redis(
    backends: Backends,
    private_redis: tuple[Supervisor, ProcessSpec],
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
) -> None:
    sup, spec = private_redis
    assert spec.port is not None
    local = Backends(backends.kafka_bootstrap, f"redis://127.0.0.1:{spec.port}/0", "private")
    c = Cluster(Path(tmp_path_factory.mktemp("ready")), local, edges=1, with_nginx=False)
    with c.running():
        urls = [c.edge_url(1, "/readyz"), c.ingest_url(1, "/readyz")]

        async def statuses() -> list[int]:
            out = []
            for url in urls:
                async with session.get(url) as resp:
                    out.append(resp.status)
            return out

        assert await statuses() == [200, 200]
        sup.stop("redis")
        await eventually(lambda: _all(statuses, 503), 20, "readyz 503 without Redis")
        async with session.get(c.edge_url(1, "/readyz")) as resp:
            body = await resp.json()
        assert body["error"] == "not_ready" and body["redis"] is False
        async with session.get(c.edge_url(1, "/healthz")) as resp:
            assert resp.status == 200, "alive even when not ready"
        sup.start(spec)
        await eventually(lambda: _all(statuses, 200), 30, "readyz 200 after Redis returns")
        # And the pipeline works again end to end.
        client = Collector(c.edge_url(1, "/crm-events")).start(session)
        await client.wait_for(lambda col: col.node is not None, 10, "stream open")
        await c.produce([(None, crm_event(7))])
        await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, "event after recovery")
        await client.stop()


async def _all(statuses: object, expected: int) -> bool:
    got = await statuses()  # type: ignore[operator]
    return all(s == expected for s in got)


async def test_sigterm_closes_streams_and_clients_resume_on_the_other_edge(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, session: aiohttp.ClientSession
) -> None:
    c = Cluster(Path(tmp_path_factory.mktemp("sigterm")), backends)
    with c.running():
        base = 70_000
        client = Collector(c.lb_url("/crm-events")).start(session)
        await client.wait_for(lambda col: col.node is not None, 10, "stream open")
        await c.produce((None, crm_event(base + i)) for i in range(50))
        await client.wait_for(lambda col: len(col.data_frames) >= 50, 30, "50 events")
        serving = "edge1" if client.node == "edge-1" else "edge2"
        t0 = time.monotonic()
        c.stop(serving, timeout_s=10)
        took = time.monotonic() - t0
        await eventually(client.ended.is_set, 5, "the stream to end on SIGTERM")
        assert took < 5, f"edge took {took:.1f}s to exit"
        assert "closing streams for shutdown" in c.log(serving)
        # Reconnect through the LB, as EventSource would, with the last id.
        last = client.data_frames[-1].id or ""
        await c.produce((None, crm_event(base + 50 + i)) for i in range(50))
        again = Collector(c.lb_url("/crm-events"), headers={"Last-Event-ID": last}).start(session)
        await again.wait_for(lambda col: len(col.data_frames) >= 50, 30, "the next 50 events")
        assert again.node != client.node
        assert_exactly_once_in_order(again.data_frames, set(range(base + 50, base + 100)))
        await again.stop()


async def _read_to_the_end(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, bytes, BaseException | None]:
    """Status, whole body, and the error that cut it short (None: a complete body)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            try:
                return resp.status, await resp.read(), None
            except aiohttp.ClientError as exc:
                return resp.status, b"", exc
    except aiohttp.ClientError as exc:
        return 0, b"", exc


def _established_to(port: int) -> int:
    """Server-side TCP connections in ESTABLISHED on ``port`` (accepted or in the accept
    queue): how many requests have reached a listener, without sending one to it."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


async def test_sigterm_ends_streams_opened_during_setup_with_a_complete_body(
    backends: Backends,
    private_redis: tuple[Supervisor, ProcessSpec],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Streams opened through the load balancer that are still being set up when SIGTERM
    comes (here: waiting for the edge to be ready, with Redis stopped) end cleanly: a 200
    with the preface and a complete chunked body, so an EventSource reconnects (to another
    edge), rather than a cut connection or an error status (after which it gives up)."""
    sup, spec = private_redis
    assert spec.port is not None
    local = Backends(backends.kafka_bootstrap, f"redis://127.0.0.1:{spec.port}/0", "private")
    waiting = 4
    c = Cluster(Path(tmp_path_factory.mktemp("drain")), local, edges=1)
    # A connection per request (no idle keep-alive), so that the edge's open connections
    # are the streams alone.
    connector = aiohttp.TCPConnector(force_close=True)
    with c.running():
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                sup.stop("redis")

                async def not_ready() -> bool:
                    async with session.get(c.edge_url(1, "/readyz")) as resp:
                        return resp.status == 503

                await eventually(not_ready, 20, "the edge not ready without Redis")
                streams = [
                    asyncio.create_task(_read_to_the_end(session, c.lb_url("/crm-events")))
                    for _ in range(waiting)
                ]
                # The edge holds a stream that is not ready for at most READY_WAIT_S (3 s),
                # then answers 503: SIGTERM must come within that, as soon as all are in.
                await eventually(
                    lambda: _established_to(c.edge_ports[0]) >= waiting,
                    2,
                    f"the {waiting} streams to reach the edge",
                )
                assert not any(s.done() for s in streams), "a stream was answered early"
                await asyncio.to_thread(c.stop, "edge1", timeout_s=10)
                results = await asyncio.gather(*streams)
            finally:
                if not sup.is_running("redis"):
                    sup.start(spec)
    for status, body, error in results:
        assert error is None, f"the stream was cut instead of ended: {error!r}"
        assert status == 200, (status, body[:200])
        assert body.startswith(b"retry: ") and b": node edge-1\n" in body
        assert b"data:" not in body
    assert "closing streams for shutdown" in c.log("edge1")
