"""Reconnect churn leaves nothing behind: 10,000 short SSE streams through the in-process
edge, from a few hundred loopback addresses, and afterwards the hub, the per-address
limiters, the metrics' label children, the tasks and the caches hold nothing for them.

The edge is the real app over the in-memory bus, served by a real aiohttp server; each
client socket is bound to its own 127.0.0.0/8 address, so per-address structures see
as many keys as a load balancer's many clients would give them."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler
from aiohttp_sse import EventSourceResponse
from prometheus_client import CollectorRegistry

from edge.app import CONTEXT, create_app
from edge.bus_memory import MemoryBus
from edge.context import EdgeContext
from edge.hub import Client
from edge.limits import MAX_TRACKED_CLIENTS, TrustedProxies
from shared.cursor import Cursor
from shared.settings import EdgeSettings
from tests.unit.test_edge_app import EPOCH, envelope
from tests.waiting import eventually

CONNECTIONS = 10_000
ADDRESSES = 250
"""Source addresses 127.0.1.0 .. 127.0.1.249: 40 streams from each."""
CONCURRENCY = 50
EVENTS = 30

ENV = {
    "CRM_EVENTS_AUTH_MODE": "off",
    "CRM_EVENTS_NODE_ID": "edge-churn",
    # No loopback peer is a trusted proxy: every stream is keyed on its own peer address,
    # and the X-Forwarded-For the clients send (below) must be ignored.
    "CRM_EVENTS_TRUSTED_PROXIES": "192.0.2.1",
    "CRM_EVENTS_MAX_CONNECTIONS_PER_IP": str(CONCURRENCY),
    "CRM_EVENTS_MAX_CONNECTIONS": str(10 * CONCURRENCY),
    "CRM_EVENTS_SSE_PING_INTERVAL_S": "30",
    "CRM_EVENTS_REPLAY_RING_BYTES": str(1 << 20),
    "CRM_EVENTS_REPLAY_CACHE_BYTES": str(64 << 10),
    "CRM_EVENTS_HISTORY_CACHE_BYTES": str(64 << 10),
    "CRM_EVENTS_RESUME_PAGE": "7",
}


def address(i: int) -> str:
    return f"127.0.1.{i}"


def label_children(registry: CollectorRegistry) -> dict[str, int]:
    """Label children of each metric object, and the series each family exports (which
    covers custom collectors that keep no children of their own)."""
    counts: dict[str, int] = {}
    for collector, names in list(registry._collector_to_names.items()):
        children = getattr(collector, "_metrics", None)
        if children is not None:
            counts["children:" + min(names)] = len(children)
    for family in registry.collect():
        counts["series:" + family.name] = len(
            {tuple(sorted(s.labels.items())) for s in family.samples}
        )
    return counts


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def per_address_state(ctx: EdgeContext) -> dict[str, int]:
    """Every per-address structure of edge/limits.py that the edge holds."""
    auth_trusted: TrustedProxies = ctx.auth._trusted
    return {
        "connections.total": ctx.connections.held,
        "connections.per_ip": len(ctx.connections._per_ip),
        "history_rate.buckets": len(ctx.history_rate._buckets),
        "trusted_proxies.memo": len(ctx.trusted_proxies._known),
        "auth.cert_trusted_proxies.memo": len(auth_trusted._known),
    }


def requests(cursors: list[bytes]) -> Iterator[tuple[str, dict[str, str], bytes]]:
    """(query, headers, what to read before closing), cycling over the kinds of stream."""
    spoof = {"X-Forwarded-For": "198.51.100.7"}
    for n in range(CONNECTIONS):
        kind = n % 4
        if kind == 0:
            yield "", spoof, b"retry:"
        elif kind == 1:
            yield "?types=ContactCreated,DealWon", {}, b": node"
        elif kind == 2:
            # Resume from an old position: read one replayed event, then leave mid-replay.
            yield "", {"Last-Event-ID": cursors[n % len(cursors)].decode()}, b"id: "
        else:
            yield "?types=ContactCreated", {"Last-Event-ID": cursors[-1].decode()}, b": node"


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    until: bytes,
    ctx: EdgeContext,
    peak: list[int],
) -> None:
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        peak[0] = max(peak[0], ctx.connections.held)
        while True:
            frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert frame, "the stream ended early"
            if frame.startswith(until):
                return


async def churn(server: TestServer, ctx: EdgeContext, cursors: list[bytes]) -> int:
    """CONNECTIONS streams, CONCURRENCY at a time, each from the address of its batch,
    then one history request from each address. Returns the most streams held at once."""
    peak = [0]
    work = list(requests(cursors))
    per_address = CONNECTIONS // ADDRESSES
    gate = asyncio.Semaphore(CONCURRENCY)

    async def from_address(i: int) -> None:
        connector = aiohttp.TCPConnector(local_addr=(address(i), 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for query, headers, until in work[i * per_address : (i + 1) * per_address]:
                url = str(server.make_url("/crm-events" + query))
                async with gate:
                    await one_stream(session, url, headers, until, ctx, peak)
            async with gate, session.get(server.make_url("/crm-events/history?n=5")) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

    await asyncio.gather(*(from_address(i) for i in range(ADDRESSES)))
    return peak[0]


async def test_10000_short_streams_leave_nothing_behind() -> None:
    bus = MemoryBus(maxlen=1000, partitions=1, epoch=EPOCH)
    registry = CollectorRegistry()
    app = create_app(EdgeSettings.from_env(ENV), registry=registry, bus=bus)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        ctx = app[CONTEXT]
        await eventually(ctx.subscription.ready.is_set, 5, "the edge to subscribe")
        entries = bus.publish([envelope(i) for i in range(EVENTS)])
        hub = ctx.hub
        await eventually(lambda: hub.positions[0] == entries[-1].position, 5, "dispatch")
        cursors = [Cursor(EPOCH, (e.position,)).encode() for e in entries[: EVENTS - 5]]
        cursors.append(hub.cursor().encode())
        assert server.runner is not None
        web_server = server.runner.server
        assert isinstance(web_server, web.Server)

        # Warm-up: one of each kind of request, so that label children created on first
        # use (each route's request counter and duration, the resume outcome) exist in the
        # baseline; after it, a child per connection or address would show as growth.
        await churn_some(server, ctx, cursors)
        await settled(ctx, web_server, registry)
        children_before = label_children(registry)
        tasks_before = len(asyncio.all_tasks())
        state_before = per_address_state(ctx)
        gc.collect()

        resumed_before = (
            registry.get_sample_value("crm_events_sse_resumes_total", {"outcome": "resumed"}) or 0.0
        )
        started = time.monotonic()
        peak = await churn(server, ctx, cursors)
        elapsed = time.monotonic() - started
        await settled(ctx, web_server, registry)

        opened = registry.get_sample_value("crm_events_sse_connections_total") or 0.0
        assert opened >= CONNECTIONS
        resumed = registry.get_sample_value("crm_events_sse_resumes_total", {"outcome": "resumed"})
        assert (resumed or 0.0) - resumed_before == CONNECTIONS // 2
        # The streams did overlap: the caps and the hub were exercised concurrently.
        assert peak > CONCURRENCY // 2
        state_after = per_address_state(ctx)
        children_after = label_children(registry)
        tasks_after = len(asyncio.all_tasks())
        clients_live = live(Client)
        responses_live = live(EventSourceResponse)
        handlers_live = live(RequestHandler)
        print(
            f"\n{CONNECTIONS} streams from {ADDRESSES} addresses in {elapsed:.1f}s "
            f"({CONNECTIONS / elapsed:.0f}/s), at most {peak} at once"
            f"\nper-address state before {state_before} after {state_after}"
            f"\nlabel children before {sum(children_before.values())} "
            f"after {sum(children_after.values())}"
            f"\ntasks before {tasks_before} after {tasks_after}"
            f"\nlive Client {clients_live} EventSourceResponse {responses_live} "
            f"RequestHandler {handlers_live}"
            f"\ncaches replay {ctx.replay_pages.held_bytes}/{ctx.replay_pages.budget_bytes} "
            f"history {ctx.history_bodies.held_bytes}/{ctx.history_bodies.budget_bytes}"
        )

        # The hub and the connection caps hold no one.
        assert hub.client_count == 0
        assert not hub._groups and not hub._ahead and not hub._ahead_at
        assert state_after["connections.total"] == 0
        assert state_after["connections.per_ip"] == 0
        # The history token buckets are kept per address by design (a bucket that has
        # refilled is dropped only when MAX_TRACKED_CLIENTS newer addresses push it out):
        # one per address that asked, none per stream.
        assert (
            state_after["history_rate.buckets"] == state_before["history_rate.buckets"] + ADDRESSES
        )
        assert state_after["history_rate.buckets"] <= MAX_TRACKED_CLIENTS
        # The proxy memo keeps one bool per peer seen, cleared at MAX_REMEMBERED.
        assert state_after["trusted_proxies.memo"] <= TrustedProxies.MAX_REMEMBERED
        assert (
            state_after["trusted_proxies.memo"] <= state_before["trusted_proxies.memo"] + ADDRESSES
        )
        assert state_after["auth.cert_trusted_proxies.memo"] == 0
        # No metric grew a child per connection, address or cursor.
        assert children_after == children_before
        # Nothing the connections started is still running.
        assert tasks_after == tasks_before
        # No per-connection object outlives its connection.
        assert clients_live == 0
        # ... and the gauge an alert watches for that says so too.
        assert registry.get_sample_value("crm_events_client_objects") == 0
        assert responses_live == 0
        assert handlers_live == 0
        # The caches keyed by cursors stay within their budgets.
        assert ctx.replay_pages.held_bytes <= ctx.replay_pages.budget_bytes
        assert ctx.history_bodies.held_bytes <= ctx.history_bodies.budget_bytes
        # X-Forwarded-For from an untrusted peer named no one.
        assert "198.51.100.7" not in ctx.trusted_proxies._known
    finally:
        await server.close()


async def churn_some(server: TestServer, ctx: EdgeContext, cursors: list[bytes]) -> None:
    """One stream of each kind, and a check that the probes below see a stream's objects
    while it is open (so that their zeros afterwards mean something)."""
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for (query, headers, until), _ in zip(requests(cursors), range(8), strict=False):
            url = str(server.make_url("/crm-events" + query))
            await one_stream(session, url, headers, until, ctx, [0])
        async with session.get(server.make_url("/crm-events/history?n=5")) as resp:
            assert resp.status == 200, await resp.text()
        async with session.get(server.make_url("/crm-events")) as resp:
            await resp.content.readuntil(b"\n\n")
            assert ctx.hub.client_count == 1
            assert per_address_state(ctx)["connections.per_ip"] == 1
            assert live(Client) == 1
            assert live(EventSourceResponse) == 1
            assert live(RequestHandler) >= 1


async def settled(ctx: EdgeContext, web_server: web.Server, registry: CollectorRegistry) -> None:
    """Wait until the edge has seen every disconnect and ended every handler."""

    def done() -> bool:
        opened = registry.get_sample_value("crm_events_sse_connections_total") or 0.0
        ended = sum(
            s.value
            for m in registry.collect()
            if m.name == "crm_events_sse_disconnects"
            for s in m.samples
            if s.name.endswith("_total")
        )
        return (
            ctx.hub.client_count == 0
            and ctx.connections.held == 0
            and not web_server.connections
            and opened == ended
        )

    await eventually(done, 10, "the edge to process every disconnect")
