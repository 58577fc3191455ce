"""Everything the edge's handlers need, built once per app and stored under one AppKey."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from shared.httpkit import ApiError
from shared.ids import StreamId
from shared.settings import EdgeSettings

from .auth import Authenticator, Grant
from .bus import Bus
from .hub import Hub
from .limits import ConnectionLimiter, RateLimiter, TrustedProxies, client_ip
from .lru import Lru
from .metrics import EdgeMetrics
from .subscription import Subscription

CACHED_REPLAY_PAGES = 64
CACHED_HISTORY_BODIES = 256


@dataclass(slots=True)
class EdgeContext:
    settings: EdgeSettings
    metrics: EdgeMetrics
    hub: Hub
    bus: Bus
    subscription: Subscription
    auth: Authenticator
    connections: ConnectionLimiter
    history_rate: RateLimiter
    trusted_proxies: TrustedProxies
    preface: bytes
    """Sent first on every stream: the ``retry:`` hint and a comment naming the node."""
    shutting_down: bool = False
    replay_pages: Lru[tuple[object, ...], tuple[bytes, bytes, StreamId, int]] = field(
        default_factory=lambda: Lru(CACHED_REPLAY_PAGES)
    )
    """Joined frames of ring pages (as is and as one HTTP chunk), keyed by (after, head,
    filter group): a reconnect storm resumes thousands of clients from the same place, so
    each page is joined once."""
    history_bodies: Lru[tuple[object, ...], bytes] = field(
        default_factory=lambda: Lru(CACHED_HISTORY_BODIES)
    )
    """History responses served from the ring, keyed by the ring's last id and the query."""

    def grant(self, request: web.Request) -> Grant:
        """Authenticate the request, counting refusals."""
        try:
            return self.auth.authenticate(request)
        except ApiError as exc:
            self.metrics.auth_failures.labels(reason=exc.code).inc()
            raise

    def narrow(self, grant: Grant, requested: frozenset[bytes] | None) -> frozenset[bytes] | None:
        try:
            return grant.narrow(requested)
        except ApiError as exc:
            self.metrics.auth_failures.labels(reason=exc.code).inc()
            raise

    def client_ip(self, request: web.Request) -> str:
        return client_ip(request, self.trusted_proxies)
