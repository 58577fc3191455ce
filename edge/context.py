"""Everything the edge's handlers need, built once per app and stored under one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from shared.httpkit import ApiError
from shared.settings import EdgeSettings

from .auth import Authenticator, Grant
from .bus import Bus
from .hub import Hub
from .limits import ConnectionLimiter, RateLimiter, client_ip
from .metrics import EdgeMetrics
from .subscription import Subscription


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
    shutting_down: bool = False

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
        return client_ip(request, self.settings.limits.trusted_proxies)
