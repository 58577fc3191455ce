"""CORS (edge/cors.py) over aiohttp's test server: a tiny app wired like the edge (JSON errors
and metrics outermost, then CORS), and the real edge app's SSE stream over the in-memory bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter

from edge.app import create_app
from edge.bus_memory import MemoryBus
from edge.cors import (
    MAX_AGE_S,
    cors_middleware,
    cors_refusals_counter,
    cors_response_headers,
    normalize_origins,
)
from shared.httpkit import ApiError, make_middlewares
from shared.metrics import CommonMetrics
from shared.settings import EdgeSettings

LISTED = "https://crm.example.com"
OTHER = "https://evil.example.net"
ORIGINS = frozenset({LISTED, "http://localhost:5173"})
CORS_RESPONSE_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Max-Age",
)


@dataclass
class Served:
    server: TestServer
    registry: CollectorRegistry
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def refusals(self, kind: str, reason: str) -> float:
        value = self.registry.get_sample_value(
            "crm_events_cors_refusals_total", {"kind": kind, "reason": reason}
        )
        return 0.0 if value is None else value


def tiny_app(origins: frozenset[str], registry: CollectorRegistry) -> web.Application:
    refused: Counter = cors_refusals_counter(registry)
    metrics = CommonMetrics(registry, "edge", "cors-test")
    app = web.Application(
        middlewares=[*make_middlewares(metrics), cors_middleware(origins, refused)]
    )
    app.on_response_prepare.append(cors_response_headers(origins, refused))

    async def stream(request: web.Request) -> web.StreamResponse:
        # Headers go out with the first write, long before the handler returns.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        await asyncio.sleep(30)
        return response

    async def history(request: web.Request) -> web.Response:
        if "n" in request.query:
            raise ApiError(400, "invalid_n", "'n' must be an integer from 1 to 1000")
        if "token" in request.query:
            raise ApiError(
                401, "unauthorized", "no token", {"WWW-Authenticate": 'Bearer realm="crm-events"'}
            )
        return web.json_response({"items": [], "count": 0, "next_after": None, "reset": None})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/crm-events", stream)
    app.router.add_get("/crm-events/history", history)
    app.router.add_get("/healthz", healthz)
    return app


ServeFactory = Callable[[frozenset[str]], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    async def start(origins: frozenset[str]) -> Served:
        registry = CollectorRegistry()
        server = TestServer(tiny_app(origins, registry))
        await server.start_server()
        served = Served(server, registry, aiohttp.ClientSession())
        started.append(served)
        return served

    yield start
    for served in started:
        await served.session.close()
        await served.server.close()


def preflight(origin: str, method: str = "GET", headers: str | None = None) -> dict[str, str]:
    result = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        result["Access-Control-Request-Headers"] = headers
    return result


def vary(resp: aiohttp.ClientResponse) -> set[str]:
    return {v.strip().lower() for v in resp.headers.get("Vary", "").split(",") if v.strip()}


async def test_listed_origin_gets_cors_headers_on_json(serve: ServeFactory) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.get(edge.url("/crm-events/history"), headers={"Origin": LISTED}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == LISTED
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Retry-After", "WWW-Authenticate"} <= exposed
        assert "origin" in vary(r)
        assert "Access-Control-Allow-Methods" not in r.headers


async def test_listed_origin_gets_cors_headers_on_a_stream_before_it_ends(
    serve: ServeFactory,
) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.get(edge.url("/crm-events"), headers={"Origin": LISTED}) as r:
        assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5) == b"retry: 2000\n\n"
        assert r.headers["Access-Control-Allow-Origin"] == LISTED
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "origin" in vary(r)


async def test_error_answers_carry_cors_headers_so_pages_can_read_them(
    serve: ServeFactory,
) -> None:
    edge = await serve(ORIGINS)
    for query, status, code in (("n=0", 400, "invalid_n"), ("token=x", 401, "unauthorized")):
        async with edge.session.get(
            edge.url(f"/crm-events/history?{query}"), headers={"Origin": LISTED}
        ) as r:
            assert r.status == status
            assert (await r.json())["error"] == code
            assert r.headers["Access-Control-Allow-Origin"] == LISTED
            assert r.headers["Access-Control-Allow-Credentials"] == "true"


async def test_unlisted_origin_gets_no_cors_headers_and_is_counted(serve: ServeFactory) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.get(edge.url("/crm-events/history"), headers={"Origin": OTHER}) as r:
        assert r.status == 200
        assert not [h for h in CORS_RESPONSE_HEADERS if h in r.headers]
        assert "origin" in vary(r)
    assert edge.refusals("request", "origin") == 1


async def test_no_origin_means_no_cors_headers_and_no_refusal(serve: ServeFactory) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.get(edge.url("/crm-events/history")) as r:
        assert r.status == 200
        assert not [h for h in CORS_RESPONSE_HEADERS if h in r.headers]
        assert "origin" in vary(r)
    assert edge.refusals("request", "origin") == 0


async def test_same_origin_request_is_not_a_refusal(serve: ServeFactory) -> None:
    edge = await serve(ORIGINS)
    own = f"http://{edge.server.host}:{edge.server.port}"
    async with edge.session.get(edge.url("/crm-events/history"), headers={"Origin": own}) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
    assert edge.refusals("request", "origin") == 0


@pytest.mark.parametrize("path", ["/crm-events", "/crm-events/history", "/openapi.yaml"])
async def test_preflight_of_listed_origin_is_204(serve: ServeFactory, path: str) -> None:
    edge = await serve(ORIGINS)
    headers = preflight(LISTED, "GET", "authorization, last-event-id")
    async with edge.session.options(edge.url(path), headers=headers) as r:
        assert r.status == 204
        assert await r.read() == b""
        assert r.headers["Access-Control-Allow-Origin"] == LISTED
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert r.headers["Access-Control-Allow-Methods"] == "GET"
        assert r.headers["Access-Control-Allow-Headers"] == (
            "Authorization, Last-Event-ID, Content-Type"
        )
        assert r.headers["Access-Control-Max-Age"] == str(MAX_AGE_S)
        assert {
            "origin",
            "access-control-request-method",
            "access-control-request-headers",
        } <= vary(r)


async def test_preflight_of_unlisted_origin_is_403_json(serve: ServeFactory) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.options(edge.url("/crm-events"), headers=preflight(OTHER)) as r:
        assert r.status == 403
        assert r.content_type == "application/json"
        body = await r.json()
        assert body["error"] == "cors_forbidden"
        assert body["message"]
        assert not [h for h in CORS_RESPONSE_HEADERS if h in r.headers]
    assert edge.refusals("preflight", "origin") == 1
    assert edge.refusals("request", "origin") == 0


@pytest.mark.parametrize(
    ("method", "headers", "reason"),
    [
        ("POST", None, "method"),
        ("DELETE", "authorization", "method"),
        ("GET", "authorization, x-custom", "headers"),
    ],
)
async def test_preflight_asking_for_more_than_get_is_403(
    serve: ServeFactory, method: str, headers: str | None, reason: str
) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.options(
        edge.url("/crm-events/history"), headers=preflight(LISTED, method, headers)
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "cors_forbidden"
    assert edge.refusals("preflight", reason) == 1


async def test_options_without_preflight_headers_or_off_the_api_is_not_cors(
    serve: ServeFactory,
) -> None:
    edge = await serve(ORIGINS)
    async with edge.session.options(edge.url("/crm-events"), headers={"Origin": LISTED}) as r:
        assert r.status == 405
        assert (await r.json())["error"] == "method_not_allowed"
    async with edge.session.options(edge.url("/healthz"), headers=preflight(LISTED)) as r:
        assert r.status == 405
        assert "Access-Control-Allow-Origin" not in r.headers
    async with edge.session.get(edge.url("/healthz"), headers={"Origin": LISTED}) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Vary" not in r.headers


async def test_empty_allowlist_turns_cors_off(serve: ServeFactory) -> None:
    edge = await serve(frozenset())
    async with edge.session.options(edge.url("/crm-events"), headers=preflight(LISTED)) as r:
        assert r.status == 405
        assert (await r.json())["error"] == "method_not_allowed"
        assert not [h for h in CORS_RESPONSE_HEADERS if h in r.headers]
        assert "Vary" not in r.headers
    async with edge.session.get(edge.url("/crm-events/history"), headers={"Origin": LISTED}) as r:
        assert r.status == 200
        assert not [h for h in CORS_RESPONSE_HEADERS if h in r.headers]
        assert "Vary" not in r.headers
    assert edge.refusals("preflight", "origin") == edge.refusals("request", "origin") == 0


def test_origins_are_normalized_and_wildcards_refused() -> None:
    assert normalize_origins([" HTTPS://CRM.example.com/ ", "", "http://localhost:5173"]) == {
        "https://crm.example.com",
        "http://localhost:5173",
    }
    for bad in ("*", "crm.example.com", "https://crm.example.com/app", "ftp://x.example"):
        with pytest.raises(ValueError, match=r"origin|credentials"):
            normalize_origins([bad])


async def test_the_edge_app_answers_cors_on_its_stream() -> None:
    """The edge as wired by ``create_app`` (``CRM_EVENTS_CORS_ORIGINS``): its own SSE handler
    (aiohttp-sse) prepares the response itself, and the headers still land before the first
    byte; a preflight from another origin is refused."""
    settings = EdgeSettings.from_env(
        {
            "CRM_EVENTS_AUTH_MODE": "off",
            "CRM_EVENTS_CORS_ORIGINS": f"{LISTED},http://localhost:5173",
            "CRM_EVENTS_NODE_ID": "edge-cors",
        }
    )
    registry = CollectorRegistry()
    server = TestServer(create_app(settings, registry=registry, bus=MemoryBus(maxlen=10)))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/crm-events"))
            async with session.get(url, headers={"Origin": LISTED}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/event-stream"
                assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5) == (
                    b"retry: 2000\n\n"
                )
                assert r.headers["Access-Control-Allow-Origin"] == LISTED
                assert r.headers["Access-Control-Allow-Credentials"] == "true"
            async with session.options(url, headers=preflight(OTHER)) as r:
                assert r.status == 403
                assert (await r.json())["error"] == "cors_forbidden"
        refused = registry.get_sample_value(
            "crm_events_cors_refusals_total", {"kind": "preflight", "reason": "origin"}
        )
        assert refused == 1
    finally:
        await server.close()
