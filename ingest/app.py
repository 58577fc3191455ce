"""The ingest process: the Kafka worker plus its own /healthz, /readyz and /metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.breaker import BreakerMetrics, CircuitBreaker
from shared.contract import RedisKeys
from shared.httpkit import add_ops_routes, make_middlewares
from shared.redis_nodes import Nodes, make_nodes
from shared.settings import IngestSettings
from shared.tasks import Supervisor

from .metrics import IngestMetrics
from .worker import IngestWorker
from .writer import BatchWriter

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", IngestSettings)
METRICS = web.AppKey("metrics", IngestMetrics)
REDIS = web.AppKey("redis", Nodes)
WORKER = web.AppKey("worker", IngestWorker)
REGISTRY = web.AppKey("registry", CollectorRegistry)
TASKS = web.AppKey("tasks", Supervisor)


def create_app(
    settings: IngestSettings,
    registry: CollectorRegistry | None = None,
    tasks: Supervisor | None = None,
) -> web.Application:
    """Build the ingest app. ``tasks`` injects the supervisor of the background tasks
    (tests control its restart delay)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = IngestMetrics(registry, settings.node_id)
    app = web.Application(middlewares=make_middlewares(metrics))
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[REGISTRY] = registry
    app[TASKS] = tasks if tasks is not None else Supervisor(registry)

    async def ready() -> tuple[bool, dict[str, object]]:
        worker = app.get(WORKER)
        redis_ok = await app[REDIS].ping(timeout_s=1.0)
        failed = app[TASKS].failed
        detail: dict[str, object] = {
            "failed_tasks": failed,
            "redis": redis_ok,
            "group_joined": bool(worker and worker.joined),
            "circuits": {
                "kafka": worker.kafka.state.name.lower() if worker else "unknown",
                "redis": worker.redis.state.name.lower() if worker else "unknown",
            },
        }
        return bool(worker and worker.ready and redis_ok and not failed), detail

    add_ops_routes(app, registry, metrics, ready)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = make_nodes(settings.redis, f"{settings.node_id}:ingest")
    app[REDIS] = redis
    writer = BatchWriter(
        redis,
        RedisKeys(settings.redis.prefix),
        settings.kafka_topic,
        settings.stream_maxlen,
        settings.dead_maxlen,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    breakers = BreakerMetrics(app[REGISTRY])
    b = settings.breaker
    worker = IngestWorker(
        settings,
        writer,
        app[METRICS],
        kafka_breaker=CircuitBreaker(
            "kafka", breakers, b.failures, b.reset_s, settings.backoff_max_s
        ),
        redis_breaker=CircuitBreaker(
            "redis", breakers, b.failures, b.reset_s, settings.backoff_max_s
        ),
    )
    app[WORKER] = worker
    # Watched: a crash of the consume loop (or of the committer or Kafka probe, which end
    # the consumer session with their error) makes /readyz name it, and it is restarted
    # with a new consumer; what was applied but not committed is re-read and skipped.
    supervisor = app[TASKS]
    supervisor.add("ingest-worker", worker.run)
    supervisor.start()
    log.info(
        "ingest started",
        extra={
            "topic": settings.kafka_topic,
            "group": settings.kafka_group,
            "redis": repr(settings.redis),
        },
    )
    yield
    log.info("ingest stopping")
    await supervisor.stop()
    await redis.aclose()
    log.info("ingest stopped")
