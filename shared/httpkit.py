"""aiohttp pieces both processes use: JSON errors, request metrics, and the operations
endpoints (/healthz, /readyz, /metrics).

/metrics is prometheus_client's own aiohttp handler: it negotiates the format (OpenMetrics
when the scraper's ``Accept`` asks for ``application/openmetrics-text``, as Prometheus does;
the classic text format otherwise), compresses when ``Accept-Encoding`` allows (gzip), and
honours ``name[]=`` to select families."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from .metrics import CommonMetrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]


class ApiError(Exception):
    """Raised by handlers for a client-visible error; rendered as JSON by the middleware."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


_STATUS_CODES = {
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "method not allowed on this resource"),
    413: ("request_too_large", "request entity too large"),
}


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    if resource is None:
        return "unmatched"
    return resource.canonical


# Any other method is counted as "other": the method is the client's choice, and a label the
# client chooses must not make one series per request.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The status label of a request whose client went away before the answer.
CLIENT_GONE = 499


def _answer_started(request: web.Request) -> bool:
    """Whether the handler already sent part of its answer itself (a stream it prepared and
    wrote to). A handler that returns its response has sent nothing yet: the server writes
    that response after the middlewares return."""
    return request.writer.output_size > 0


def _method_label(request: web.Request) -> str:
    method = request.method
    return method if method in KNOWN_METHODS else "other"


def make_middlewares(metrics: CommonMetrics) -> list[web.middleware]:  # type: ignore[valid-type]
    children: dict[tuple[str, str, int], Counter] = {}
    durations: dict[tuple[str, str], Histogram] = {}

    @web.middleware
    async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        # A handler that prepared its response itself streamed the body (SSE): its duration
        # is the client's stay, so it is left out of the request-duration histogram.
        streamed = False
        try:
            response = await handler(request)
            status = response.status
            streamed = response.prepared
            return response
        except ApiError as exc:
            status = exc.status
            return json_error(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            code, message = _STATUS_CODES.get(exc.status, ("http_error", exc.reason))
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return json_error(exc.status, code, message, headers)
        except (asyncio.CancelledError, ConnectionResetError, BrokenPipeError):
            # The client went away. Still timed (the slowest answers are the likeliest to lose
            # their client), unless the handler was streaming: that was the client's stay.
            status = CLIENT_GONE
            streamed = _answer_started(request)
            raise
        except Exception:
            log.exception("unhandled error", extra={"path": request.path})
            return json_error(500, "internal", "internal server error")
        finally:
            route = _route_label(request)
            method = _method_label(request)
            key = (route, method, status)
            counter = children.get(key)
            if counter is None:
                # Bounded: routes are canonical (unmatched paths share one label), methods
                # and statuses are few.
                counter = metrics.http_requests.labels(
                    path=route, method=method, status=str(status)
                )
                children[key] = counter
            counter.inc()
            if not streamed:
                histogram = durations.get((route, method))
                if histogram is None:
                    histogram = metrics.http_request_duration.labels(path=route, method=method)
                    durations[(route, method)] = histogram
                histogram.observe(time.perf_counter() - started)

    return [errors_and_metrics]


def add_ops_routes(
    app: web.Application, registry: CollectorRegistry, metrics: CommonMetrics, ready: ReadyCheck
) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = await ready()
        metrics.ready.set(1 if ok else 0)
        body = {"status": "ready" if ok else "not_ready", **detail}
        if ok:
            return web.json_response(body)
        return web.json_response(
            {"error": "not_ready", "message": "not ready to serve", **body}, status=503
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    # Exported (at zero) from the first scrape, before any other route has been requested.
    for path in ("/healthz", "/readyz", "/metrics"):
        metrics.http_request_duration.labels(path=path, method="GET")
