"""Request metrics of shared/httpkit.py and the build info of shared/metrics.py: the duration
histogram times non-streaming answers per route template (never the raw path), those whose
client left first included, leaves SSE streams out, keeps the method label bounded, and
crm_events_build_info carries the version and the revision."""

from __future__ import annotations

import asyncio
import gzip
import tomllib
import types
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.bus_memory import MemoryBus
from shared import httpkit, version
from shared.httpkit import ApiError, add_ops_routes, make_middlewares
from shared.metrics import CommonMetrics, render
from shared.settings import EdgeSettings, RedisSettings
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
DURATION = "crm_events_http_request_duration_seconds"
HANDLER_S = 0.2
SLOW_S = 7.0


class FakeClock:
    """Stands in for ``time`` in shared.httpkit: handlers move it, so durations are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


class Tiny:
    def __init__(
        self, server: TestServer, registry: CollectorRegistry, entered: asyncio.Event
    ) -> None:
        self.server = server
        self.registry = registry
        self.entered = entered
        """Set by the handlers that wait for their client to leave, once they wait."""

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(httpkit, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


@pytest.fixture
async def tiny(clock: FakeClock) -> AsyncIterator[Tiny]:
    registry = CollectorRegistry()
    metrics = CommonMetrics(registry, "edge", "metrics-test", environ={})
    app = web.Application(middlewares=make_middlewares(metrics))

    async def item(_: web.Request) -> web.Response:
        clock.now += HANDLER_S
        return web.json_response({"ok": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        clock.now += 30.0  # a long stay: must not show in the histogram
        await response.write(b"data: x\n\n")
        await response.write_eof()
        return response

    async def refuse(_: web.Request) -> web.Response:
        clock.now += HANDLER_S
        raise ApiError(400, "invalid_n", "bad n")

    async def slow(_: web.Request) -> web.Response:
        clock.now += SLOW_S  # e.g. a history query on a slow Redis: the client gives up
        tiny_entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def held_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: x\n\n")
        clock.now += 30.0  # a long stay, ended by the client: must not show in the histogram
        tiny_entered.set()
        await asyncio.Event().wait()
        return response

    tiny_entered = asyncio.Event()
    app.router.add_get("/items/{id}", item)
    app.router.add_get("/stream", stream)
    app.router.add_get("/refuse", refuse)
    app.router.add_get("/slow/{id}", slow)
    app.router.add_get("/held-stream", held_stream)

    async def ready() -> tuple[bool, dict[str, object]]:
        return True, {}

    add_ops_routes(app, registry, metrics, ready)
    server = TestServer(app)
    await server.start_server()
    try:
        yield Tiny(server, registry, tiny_entered)
    finally:
        await server.close()


async def test_duration_is_observed_per_route_template(tiny: Tiny) -> None:
    async with aiohttp.ClientSession() as session:
        for i in (1, 2):
            async with session.get(tiny.url(f"/items/{i}")) as r:
                assert r.status == 200

    labels = {"path": "/items/{id}", "method": "GET"}
    assert sample(tiny.registry, f"{DURATION}_count", labels) == 2
    assert sample(tiny.registry, f"{DURATION}_sum", labels) == pytest.approx(2 * HANDLER_S)
    assert sample(tiny.registry, f"{DURATION}_bucket", {**labels, "le": "0.25"}) == 2
    assert sample(tiny.registry, f"{DURATION}_bucket", {**labels, "le": "0.1"}) == 0
    exposition = render(tiny.registry).decode()
    assert 'path="/items/1"' not in exposition
    assert 'path="/items/2"' not in exposition


async def test_a_streamed_response_is_counted_but_not_timed(tiny: Tiny) -> None:
    async with aiohttp.ClientSession() as session, session.get(tiny.url("/stream")) as r:
        assert await r.read() == b"data: x\n\n"

    counted = {"path": "/stream", "method": "GET", "status": "200"}
    assert sample(tiny.registry, "crm_events_http_requests_total", counted) == 1
    assert sample(tiny.registry, f"{DURATION}_count", {"path": "/stream", "method": "GET"}) is None


async def test_an_error_answer_is_timed(tiny: Tiny) -> None:
    async with aiohttp.ClientSession() as session, session.get(tiny.url("/refuse")) as r:
        assert r.status == 400

    labels = {"path": "/refuse", "method": "GET"}
    assert sample(tiny.registry, f"{DURATION}_count", labels) == 1
    assert sample(tiny.registry, f"{DURATION}_sum", labels) == pytest.approx(HANDLER_S)


async def leave_mid_request(tiny: Tiny, path: str) -> None:
    """Send a GET, wait until its handler runs, then close the connection (the client gives
    up)."""
    tiny.entered.clear()
    _, writer = await asyncio.open_connection(tiny.server.host, tiny.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(tiny.entered.wait(), 5)
    writer.close()
    await writer.wait_closed()


async def test_a_request_whose_client_went_away_is_timed_unless_it_streamed(tiny: Tiny) -> None:
    """The slowest answers are the likeliest to lose their client (a history query on a slow
    Redis): leaving them out would hide them from the p99. A stream the client ends is its
    stay, not an answer time, and stays out."""
    gone = {"method": "GET", "status": str(httpkit.CLIENT_GONE)}
    await leave_mid_request(tiny, "/slow/1")
    await leave_mid_request(tiny, "/held-stream")
    for path in ("/slow/{id}", "/held-stream"):
        await eventually(
            lambda p=path: sample(
                tiny.registry, "crm_events_http_requests_total", {**gone, "path": p}
            ),
            5,
            f"{path} counted as the client's departure",
        )

    slow = {"path": "/slow/{id}", "method": "GET"}
    assert sample(tiny.registry, f"{DURATION}_count", slow) == 1
    assert sample(tiny.registry, f"{DURATION}_sum", slow) == pytest.approx(SLOW_S)
    assert sample(tiny.registry, f"{DURATION}_bucket", {**slow, "le": "5.0"}) == 0
    held = {"path": "/held-stream", "method": "GET"}
    assert sample(tiny.registry, f"{DURATION}_count", held) is None
    assert 'path="/slow/1"' not in render(tiny.registry).decode()


async def test_a_method_outside_the_known_set_is_labelled_other(tiny: Tiny) -> None:
    async with aiohttp.ClientSession() as session:
        for verb in ("PROPFIND", "PURGE"):
            async with session.request(verb, tiny.url("/items/1")) as r:
                assert r.status == 405

    exposition = render(tiny.registry).decode()
    assert "PROPFIND" not in exposition and "PURGE" not in exposition
    counted = {"path": "unmatched", "method": "other", "status": "405"}
    assert sample(tiny.registry, "crm_events_http_requests_total", counted) == 2
    timed = {"path": "unmatched", "method": "other"}
    assert sample(tiny.registry, f"{DURATION}_count", timed) == 2


async def test_the_ops_routes_are_exported_before_any_request(tiny: Tiny) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        labels = {"path": path, "method": "GET"}
        assert sample(tiny.registry, f"{DURATION}_count", labels) == 0, path


# -- /metrics: prometheus_client's aiohttp handler ----------------------------------------------


def family_names(text: str) -> set[str]:
    """The metric families an exposition declares (its ``# TYPE`` lines)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


async def test_metrics_speaks_text_by_default_openmetrics_on_request_and_gzip(tiny: Tiny) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(tiny.url("/healthz")) as r:
            assert r.status == 200  # so that crm_events_http_requests_total has a sample
        async with session.get(tiny.url("/metrics"), headers={"Accept-Encoding": ""}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "Content-Encoding" not in r.headers
            plain = (await r.read()).decode()
        openmetrics_accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        async with session.get(
            tiny.url("/metrics"), headers={"Accept": openmetrics_accept, "Accept-Encoding": ""}
        ) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            openmetrics = (await r.read()).decode()
        async with session.get(tiny.url("/metrics"), headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            unzipped = gzip.decompress(await r.read()).decode()

    assert openmetrics.endswith("# EOF\n") and not plain.rstrip().endswith("# EOF")
    # The same families and names either way: OpenMetrics names a counter's family without
    # _total (its samples keep it) and carries _created inside the family, where the text
    # format declares a separate gauge.
    assert "crm_events_http_requests_total{" in openmetrics
    assert "crm_events_http_requests_total{" in plain
    assert family_names(unzipped) == family_names(plain)
    in_plain = {n.removesuffix("_total") for n in family_names(plain) if not n.endswith("_created")}
    assert in_plain == family_names(openmetrics)
    assert "crm_events_build_info" in family_names(plain)
    # Each scrape is counted by the request middleware like any other route: three before
    # the one that looks.
    async with (
        aiohttp.ClientSession() as session,
        session.get(tiny.url("/metrics")) as r,
    ):
        text = await r.text()
    assert 'crm_events_http_requests_total{method="GET",path="/metrics",status="200"} 3.0' in text


# -- the real edge app: history is timed, the SSE stream is not ---------------------------------


async def test_edge_times_history_and_not_the_stream() -> None:
    registry = CollectorRegistry()
    settings = EdgeSettings(
        redis=RedisSettings(), node_id="edge-metrics", ping_interval_s=0.1, backoff_max_s=0.05
    )
    server = TestServer(create_app(settings, registry=registry, bus=MemoryBus(maxlen=50)))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(server.make_url("/crm-events/history?n=5")) as r:
                    assert r.status == 200
            async with session.get(server.make_url("/crm-events")) as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")
                # The server ends the stream (shutdown drain): its handler returns normally,
                # as after a token expiry, rather than seeing the client leave.
                await server.close()
    finally:
        await server.close()

    stream = {"path": "/crm-events", "method": "GET"}
    assert sample(registry, "crm_events_http_requests_total", {**stream, "status": "200"}) == 1
    assert sample(registry, f"{DURATION}_count", stream) is None
    history = {"path": "/crm-events/history", "method": "GET"}
    assert sample(registry, f"{DURATION}_count", history) == 3


# -- crm_events_build_info ----------------------------------------------------------------------


def pyproject_version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


def test_the_version_comes_from_pyproject() -> None:
    assert version.version() == pyproject_version() == metadata.version("crm-events")


@pytest.mark.parametrize(
    ("environ", "revision"),
    [
        pytest.param({"CRM_EVENTS_REVISION": "3f2c1ab"}, "3f2c1ab", id="set"),
        pytest.param({"CRM_EVENTS_REVISION": "  3f2c1ab\n"}, "3f2c1ab", id="stripped"),
        pytest.param({}, "unknown", id="absent"),
        pytest.param({"CRM_EVENTS_REVISION": " "}, "unknown", id="blank"),
        pytest.param({"CRM_EVENTS_REVISION": "a" * 100}, "a" * 64, id="cut-at-64"),
    ],
)
def test_build_info_carries_version_and_revision(environ: dict[str, str], revision: str) -> None:
    registry = CollectorRegistry()
    CommonMetrics(registry, "ingest", "node-7", environ=environ)

    labels = {
        "role": "ingest",
        "node": "node-7",
        "version": pyproject_version(),
        "revision": revision,
    }
    assert sample(registry, "crm_events_build_info", labels) == 1
    (family,) = [m for m in registry.collect() if m.name == "crm_events_build_info"]
    assert len(family.samples) == 1


def test_version_line_names_the_revision_only_when_known() -> None:
    v = pyproject_version()
    assert version.describe("crm-events-edge", {}) == f"crm-events-edge {v}"
    assert (
        version.describe("crm-events-edge", {"CRM_EVENTS_REVISION": "abc"})
        == f"crm-events-edge {v} (revision abc)"
    )
