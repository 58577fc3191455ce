"""The edge process: SSE stream, history and operations endpoints over one subscription."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.breaker import BreakerMetrics, CircuitBreaker
from shared.contract import RedisKeys
from shared.httpkit import add_ops_routes, make_middlewares
from shared.redis_client import make_redis
from shared.redis_nodes import ClusterNodes
from shared.runtime import collect_periodically
from shared.settings import EdgeSettings
from shared.sse import comment_frame, retry_frame
from shared.tasks import Supervisor

from .auth import Authenticator
from .bus import BadInput, Bus
from .bus_cluster import ClusterBus
from .bus_redis import RedisBus
from .context import EdgeContext
from .cors import cors_middleware, cors_refusals_counter, cors_response_headers
from .history import history_handler
from .hub import Hub, live_client_objects
from .jwks import provider_session
from .limits import (
    ConnectionLimiter,
    RateLimiter,
    TrustedProxies,
    parser_limits,
    size_limit_middleware,
)
from .memory import MemoryDiagnostics, add_memory_route
from .metrics import EdgeMetrics, JwksMetrics
from .openapi import add_openapi_route
from .ops_page import add_ops_page_routes
from .stream import stream_handler
from .subscription import Subscription

log = logging.getLogger(__name__)

CONTEXT = web.AppKey("edge", EdgeContext)
BUS_PING_INTERVAL_S = 1.0


def create_app(
    settings: EdgeSettings,
    registry: CollectorRegistry | None = None,
    bus: Bus | None = None,
    tasks: Supervisor | None = None,
) -> web.Application:
    """Build the edge app. ``bus`` injects another Bus (the in-memory one in unit tests);
    by default a Redis bus is created and closed with the app. ``tasks`` injects the
    supervisor of the background tasks (tests control its restart delay)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = EdgeMetrics(registry, settings.node_id)
    supervisor = tasks if tasks is not None else Supervisor(registry)
    breakers = BreakerMetrics(registry)
    trusted = TrustedProxies(settings.limits.trusted_proxies)
    # Checked here, where both are known, so that --check-config refuses it too: a network
    # trusted to relay certificates is safe only behind the edge's own mutual TLS.
    settings.auth.check_cert_proxies(settings.tls.mutual)
    # Built here, not in the lifecycle, so a bad key or grants file fails before the port
    # is bound (SettingsError naming the setting). Its trusted peers are its own list
    # (CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES), not the X-Forwarded-For one above.
    authenticator = Authenticator(
        settings.auth,
        JwksMetrics(registry) if settings.auth.remote_keys else None,
        untrusted_cert_headers=metrics.untrusted_cert_headers,
    )
    remote_keys = authenticator.remote
    cors_refused = cors_refusals_counter(registry)
    app = web.Application(
        middlewares=[
            *make_middlewares(metrics),
            cors_middleware(settings.limits.cors_origins, cors_refused),
            size_limit_middleware(settings.limits, metrics.limit_rejections),
        ],
        handler_args=parser_limits(settings.limits),
    )
    # Headers go on in on_response_prepare so that streaming responses carry them too.
    app.on_response_prepare.append(
        cors_response_headers(settings.limits.cors_origins, cors_refused)
    )
    hub = Hub(ring_bytes=settings.replay_ring_bytes)
    metrics.ring_events.set_function(lambda: len(hub.ring))
    metrics.ring_bytes.set_function(lambda: hub.ring.held_bytes)
    metrics.client_objects.set_function(live_client_objects)
    hub.on_direct_write = lambda ts_ms: metrics.latency.observe(
        max(0.0, (hub.clock_ms() - ts_ms) / 1000.0)
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        closers: list[Callable[[], object]] = []
        active_bus = bus
        if active_bus is None and settings.redis.cluster is not None:
            nodes = ClusterNodes(
                settings.redis, settings.redis.cluster, f"{settings.node_id}:reads"
            )
            active_bus = ClusterBus(
                nodes, RedisKeys(settings.redis.prefix), BUS_PING_INTERVAL_S, settings.node_id
            )
            closers = [nodes.aclose]
        elif active_bus is None:
            redis = make_redis(settings.redis, f"{settings.node_id}:reads")
            pubsub_redis = make_redis(
                settings.redis, f"{settings.node_id}:subscription", for_pubsub=True
            )
            active_bus = RedisBus(
                redis, pubsub_redis, RedisKeys(settings.redis.prefix), BUS_PING_INTERVAL_S
            )
            closers = [redis.aclose, pubsub_redis.aclose]
        b = settings.breaker
        breaker = CircuitBreaker("redis", breakers, b.failures, b.reset_s, settings.backoff_max_s)
        subscription = Subscription(active_bus, hub, metrics, settings.resume_page, breaker)

        def count_bad_input(bad: BadInput) -> None:
            metrics.bad_messages.labels(reason=bad.reason).inc(bad.count)

        active_bus.bad_inputs.sink = count_bad_input
        limits = settings.limits
        ctx = EdgeContext(
            settings,
            metrics,
            hub,
            active_bus,
            subscription,
            auth=authenticator,
            connections=ConnectionLimiter(
                limits.max_connections, limits.max_connections_per_ip, metrics.limit_rejections
            ),
            history_rate=RateLimiter(
                limits.history_rate_per_s, limits.history_burst, metrics.limit_rejections
            ),
            trusted_proxies=trusted,
            preface=retry_frame(settings.retry_ms) + comment_frame(f"node {settings.node_id}"),
        )
        app[CONTEXT] = ctx
        # Watched: if it ever ends (a bug, an input nobody foresaw), /readyz names it and it
        # is restarted; its repairs then resume from the hub's positions, gap-free.
        supervisor.add("edge-subscription", subscription.run)
        keys_session: aiohttp.ClientSession | None = None
        if remote_keys is not None:
            # The identity provider's keys: fetched in the background with the app's own
            # session (closed below, after the task), never on the request path but for
            # an unknown kid.
            keys_session = provider_session()
            remote_keys.attach(keys_session)
            supervisor.add("edge-jwks", remote_keys.run)
        supervisor.start()
        log.info("edge started", extra={"port": settings.port, "redis": repr(settings.redis)})
        yield
        await supervisor.stop()
        if remote_keys is not None and keys_session is not None:
            await remote_keys.close()
            await keys_session.close()
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        log.info("edge stopped")

    async def on_shutdown(app: web.Application) -> None:
        # Ending each stream cleanly makes browsers reconnect (through the load balancer,
        # to another edge) at once, resuming with Last-Event-ID.
        ctx = app[CONTEXT]
        ctx.shutting_down = True
        ctx.closing.set()
        count = hub.client_count
        hub.close_all("shutdown")
        log.info("closing streams for shutdown", extra={"clients": count})

    async def ready() -> tuple[bool, dict[str, object]]:
        ctx = app[CONTEXT]
        subscribed = ctx.subscription.ready.is_set()
        redis_ok = await ctx.bus.ping()
        circuit = ctx.subscription.breaker.state.name.lower()
        failed = supervisor.failed
        # An edge that holds none of the provider's keys can verify no token: not ready.
        keys_ok = remote_keys is None or remote_keys.loaded
        ok = (
            subscribed
            and redis_ok
            and ctx.subscription.breaker.closed
            and not ctx.shutting_down
            and not failed
            and keys_ok
        )
        detail: dict[str, object] = {
            "failed_tasks": failed,
            "circuit": circuit,
            "redis": redis_ok,
            "subscribed": subscribed,
            "clients": hub.client_count,
            "node": settings.node_id,
        }
        if remote_keys is not None:
            detail["jwks"] = {
                "loaded": remote_keys.loaded,
                "keys": remote_keys.key_count(),
                "error": remote_keys.last_error,
            }
        return ok, detail

    async def crm_events(request: web.Request) -> web.StreamResponse:
        return await stream_handler(request, app[CONTEXT])

    async def history(request: web.Request) -> web.StreamResponse:
        return await history_handler(request, app[CONTEXT])

    async def scheduled_gc(_: web.Application) -> AsyncIterator[None]:
        if settings.gc_full_interval_s <= 0:
            yield
            return

        def record(seconds: float, found: int) -> None:
            metrics.gc_full_seconds.observe(seconds)
            metrics.gc_unreachable.inc(found)

        task = asyncio.create_task(collect_periodically(settings.gc_full_interval_s, record))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(scheduled_gc)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/crm-events", crm_events)
    app.router.add_get("/crm-events/history", history)
    add_ops_page_routes(app, auth_cookie=settings.auth.cookie)
    add_openapi_route(app)
    add_ops_routes(app, registry, metrics, ready)
    add_memory_route(app, MemoryDiagnostics(settings.memory_diagnostics))
    return app
