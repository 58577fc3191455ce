"""How much one edge serves and one client may take: connection caps, a history rate limit,
request size caps, and the client address behind the load balancer.

Every refusal is an ``ApiError`` (JSON) and is counted in
``crm_events_limit_rejections_total{limit}``.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain

from aiohttp import web
from prometheus_client import Counter

from shared.httpkit import ApiError, Handler
from shared.security_settings import LimitSettings

LIMITS = ("connections", "connections_per_ip", "history_rate", "request_line", "headers", "types")
MAX_TRACKED_CLIENTS = 100_000
"""Bound on the per-address rate-limit table; the least recently seen are forgotten."""


class TrustedProxies:
    """The proxies whose X-Forwarded-For is believed, parsed once; answers per address are
    remembered (peers are mostly the same few load balancers)."""

    MAX_REMEMBERED = 4096

    def __init__(self, networks: frozenset[str]) -> None:
        self._networks = [ipaddress.ip_network(net, strict=False) for net in networks]
        self._known: dict[str, bool] = {}

    def __contains__(self, address: str) -> bool:
        known = self._known.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self._networks)
            if len(self._known) >= self.MAX_REMEMBERED:
                self._known.clear()
            self._known[address] = known
        return known


def client_ip(request: web.Request, trusted: TrustedProxies) -> str:
    """The client's address: the peer, or — when the peer is a trusted proxy — the right-most
    untrusted address of X-Forwarded-For (entries further left are client-supplied)."""
    peer = request.remote or "unknown"
    if peer not in trusted:
        return peer
    # Several header lines are one comma-separated list (RFC 9110); the proxy appends its
    # peer to the last one, so reading only the first line would believe a client's own line.
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if hop not in trusted:
            return hop
    return peer


class ConnectionLimiter:
    """Caps SSE streams per edge and per client address."""

    def __init__(self, max_total: int, max_per_ip: int, rejected: Counter) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self._total = 0
        self._per_ip: dict[str, int] = {}
        self._rejected = rejected

    @property
    def held(self) -> int:
        """Streams holding a slot now (set up or serving)."""
        return self._total

    def acquire(self, ip: str) -> None:
        if self._total >= self.max_total:
            self._rejected.labels(limit="connections").inc()
            raise ApiError(
                503, "edge_full", "this edge serves its maximum of streams", {"Retry-After": "5"}
            )
        held = self._per_ip.get(ip, 0)
        if held >= self.max_per_ip:
            self._rejected.labels(limit="connections_per_ip").inc()
            raise ApiError(
                429,
                "too_many_connections",
                f"at most {self.max_per_ip} streams per client address",
                {"Retry-After": "5"},
            )
        self._total += 1
        self._per_ip[ip] = held + 1

    def release(self, ip: str) -> None:
        self._total -= 1
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)


class RateLimiter:
    """A token bucket per client address."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        rejected: Counter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._rejected = rejected

    def take(self, ip: str) -> None:
        now = self._clock()
        tokens, stamp = self._buckets.pop(ip, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            self._rejected.labels(limit="history_rate").inc()
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise ApiError(
                429,
                "rate_limited",
                "too many history requests; slow down",
                {"Retry-After": str(max(1, wait))},
            )
        self._buckets[ip] = (tokens - 1.0, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)


def parser_limits(limits: LimitSettings) -> dict[str, int]:
    """aiohttp's HTTP parser limits (``Application(handler_args=...)``), set above the edge's
    own caps so that a request over a cap reaches ``size_limit_middleware`` and gets its JSON
    414/431. The parser stays as a backstop: past these it answers a plain-text 400."""
    return {
        "max_line_size": max(65_536, 4 * limits.max_request_line_bytes),
        "max_field_size": max(65_536, limits.max_header_bytes),
        # Each header counts at least 5 bytes against max_header_bytes, so a request with
        # more headers than this is over that cap anyway.
        "max_headers": max(1_024, limits.max_header_bytes // 4),
    }


def size_limit_middleware(settings: LimitSettings, rejected: Counter) -> web.middleware:  # type: ignore[valid-type]
    """Refuse oversized request lines (414) and header sections (431) with JSON errors.

    aiohttp's own parser limits stay as a higher backstop; these are the configured caps."""
    max_line = settings.max_request_line_bytes
    max_headers = settings.max_header_bytes

    @web.middleware
    async def limit_sizes(request: web.Request, handler: Handler) -> web.StreamResponse:
        # "GET <target> HTTP/1.1"
        line = len(request.method) + len(request.raw_path) + 10
        if line > max_line:
            rejected.labels(limit="request_line").inc()
            raise ApiError(
                414, "request_line_too_long", f"the request line is longer than {max_line} bytes"
            )
        raw = request.raw_headers
        size = sum(map(len, chain.from_iterable(raw))) + 4 * len(raw)
        if size > max_headers:
            rejected.labels(limit="headers").inc()
            raise ApiError(
                431, "headers_too_large", f"the request headers are larger than {max_headers} bytes"
            )
        return await handler(request)

    return limit_sizes
