"""CORS for the edge's API: an allowlist of origins, empty (off) by default.

Two pieces, both built from the same allowlist:

* ``cors_middleware`` answers preflight requests (``OPTIONS`` with ``Origin`` and
  ``Access-Control-Request-Method``) for the API paths itself: 204 with the allowed method
  and headers for a listed origin, 403 ``cors_forbidden`` JSON for any other origin or for a
  method or header the API does not take. Put it after the JSON-error/metrics middleware
  (so refusals are counted like any answer) and before authentication (a preflight never
  carries credentials).
* ``cors_response_headers`` is an ``on_response_prepare`` signal handler that adds
  ``Access-Control-Allow-Origin: <origin>``, ``-Allow-Credentials: true`` and
  ``-Expose-Headers`` to every response to a listed origin, error answers included (so a
  page can read a 401's JSON). It runs inside ``prepare()``, before the status line is
  written, which is the only moment that works for the SSE stream: its headers are on the
  wire long before the handler returns.

Responses to other origins get no CORS headers, so the browser keeps them from the page.
Every response on the API paths gets ``Vary: Origin`` while the allowlist is non-empty,
because it depends on ``Origin``; with an empty allowlist nothing here adds anything and a
preflight is an ordinary ``OPTIONS`` (405).

Origins are compared exactly, as browsers send them (``scheme://host[:port]``, lower
case, no path); ``"*"`` is refused, because credentials are never allowed for any origin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter

from shared.httpkit import json_error

__all__ = [
    "ALLOWED_HEADERS",
    "ALLOWED_METHODS",
    "CORS_PATHS",
    "EXPOSED_HEADERS",
    "MAX_AGE_S",
    "ResponsePrepareHook",
    "cors_middleware",
    "cors_refusals_counter",
    "cors_response_headers",
    "normalize_origins",
]

#: The paths a browser on another origin may call.
CORS_PATHS = frozenset({"/crm-events", "/crm-events/history", "/openapi.yaml"})
ALLOWED_METHODS = "GET"
#: Request headers a page may send; ``Content-Type`` for fetch() wrappers that always set it.
ALLOWED_HEADERS = "Authorization, Last-Event-ID, Content-Type"
#: Response headers a page may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate, ETag"
#: How long a browser may cache a preflight (Chrome caps it at 7200).
MAX_AGE_S = 600

_METHODS = frozenset({"GET", "HEAD"})
_HEADERS = frozenset(h.strip().lower() for h in ALLOWED_HEADERS.split(","))
# ``kind``: preflight (answered 403 here) or request (an actual request from an unlisted
# origin, answered without CORS headers). ``reason``: what was not allowed.
_REFUSALS = (
    ("preflight", "origin"),
    ("preflight", "method"),
    ("preflight", "headers"),
    ("request", "origin"),
)

ResponsePrepareHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def cors_refusals_counter(registry: CollectorRegistry) -> Counter:
    """The counter both pieces take as ``refused``: ``crm_events_cors_refusals_total``."""
    counter = Counter(
        "crm_events_cors_refusals",
        "Cross-origin requests refused by CORS, by kind (preflight answered 403, or an actual "
        "request answered without CORS headers) and reason (origin, method, headers).",
        ["kind", "reason"],
        registry=registry,
    )
    for kind, reason in _REFUSALS:
        counter.labels(kind=kind, reason=reason)
    return counter


def normalize_origins(origins: Iterable[str]) -> frozenset[str]:
    """Lower-case, without a trailing ``/``; raises ``ValueError`` for ``*`` or a non-origin."""
    result: set[str] = set()
    for raw in origins:
        origin = raw.strip().rstrip("/").lower()
        if not origin:
            continue
        if origin == "*":
            raise ValueError("'*' is not allowed: credentials are sent only to listed origins")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ValueError(f"{raw!r} is not an origin (scheme://host[:port])")
        result.add(origin)
    return frozenset(result)


def _same_origin(request: web.Request, origin: str) -> bool:
    # Browsers send Origin on some same-origin requests too; those need no CORS headers
    # and are no refusal. The scheme may differ behind a TLS-terminating proxy.
    return urlsplit(origin).netloc == request.host.lower()


def _add_vary(response: web.StreamResponse, *names: str) -> None:
    present = [v.strip() for v in response.headers.get(hdrs.VARY, "").split(",") if v.strip()]
    lower = {v.lower() for v in present}
    if "*" in lower:
        return
    present.extend(n for n in names if n.lower() not in lower)
    response.headers[hdrs.VARY] = ", ".join(present)


def cors_middleware(
    allowed_origins: frozenset[str],
    refused: Counter | None = None,
    *,
    paths: frozenset[str] = CORS_PATHS,
    max_age_s: int = MAX_AGE_S,
) -> Middleware:
    """Answer CORS preflights for ``paths``; every other request passes through."""
    origins = normalize_origins(allowed_origins)

    def refuse(reason: str, message: str) -> web.Response:
        if refused is not None:
            refused.labels(kind="preflight", reason=reason).inc()
        return json_error(403, "cors_forbidden", message)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        wanted = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
        if (
            not origins
            or request.method != hdrs.METH_OPTIONS
            or origin is None
            or wanted is None
            or request.path not in paths
        ):
            return await handler(request)
        if origin.lower() not in origins:
            return refuse("origin", "this origin is not allowed to call the API")
        if wanted.upper() not in _METHODS:
            return refuse("method", f"the API allows only {ALLOWED_METHODS}, not {wanted!r}")
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        extra = sorted({h.strip().lower() for h in asked.split(",") if h.strip()} - _HEADERS)
        if extra:
            return refuse("headers", f"request headers not allowed: {', '.join(extra)}")
        response = web.Response(status=204)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOWED_METHODS
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOWED_HEADERS
        response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(max_age_s)
        _add_vary(response, "Access-Control-Request-Method", "Access-Control-Request-Headers")
        return response

    return cors


def cors_response_headers(
    allowed_origins: frozenset[str],
    refused: Counter | None = None,
    *,
    paths: frozenset[str] = CORS_PATHS,
) -> ResponsePrepareHook:
    """An ``on_response_prepare`` handler adding the CORS headers of a response."""
    origins = normalize_origins(allowed_origins)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if not origins or request.path not in paths:
            return
        _add_vary(response, "Origin")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return
        if origin.lower() not in origins:
            preflight = request.method == hdrs.METH_OPTIONS
            if refused is not None and not preflight and not _same_origin(request, origin):
                refused.labels(kind="request", reason="origin").inc()
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        if request.method != hdrs.METH_OPTIONS:
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS

    return on_prepare
