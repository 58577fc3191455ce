"""Everything the edge's handlers need, built once per app and stored under one AppKey."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from shared.httpkit import ApiError
from shared.settings import EdgeSettings

from .auth import Authenticator, Grant
from .bus import Bus
from .hub import Hub
from .limits import ConnectionLimiter, RateLimiter, TrustedProxies, client_ip
from .lru import ByteLru
from .metrics import EdgeMetrics
from .replay import CachedPage, PageKey, Resumer
from .subscription import Subscription

K = TypeVar("K")
V = TypeVar("V")

CACHE_ITEM_SHARE = 8
"""An entry larger than 1/8 of its cache's budget is not cached: one request cannot evict
more than that share of what other clients use, and a full cache holds at least 8 entries."""


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
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set with ``shutting_down``: wakes streams still being set up, so that they end within
    the drain rather than stream on until the server cancels them."""
    replay_pages: ByteLru[PageKey, CachedPage] = field(init=False)
    """Joined frames of ring pages (as is and as one HTTP chunk), keyed by (the ring's
    generation, the client's cursor at the page, partition, position, head, filter group):
    a reconnect storm resumes thousands of clients from the same place, so each page is
    joined once. At most ``settings.replay_cache_bytes``."""
    history_bodies: ByteLru[tuple[object, ...], bytes] = field(init=False)
    """History responses served from the ring, keyed by the ring's version (bumped by every
    change) and the query. At most ``settings.history_cache_bytes``."""
    resumer: Resumer = field(init=False)

    def __post_init__(self) -> None:
        # Keys and sizes are client-chosen, so both caches are bounded by bytes.
        self.replay_pages = self._cache("replay", self.settings.replay_cache_bytes)
        self.history_bodies = self._cache("history", self.settings.history_cache_bytes)
        self.resumer = Resumer(
            self.bus, self.hub, self.metrics, self.settings.resume_page, self.replay_pages
        )

    def _cache(self, name: str, budget_bytes: int) -> ByteLru[K, V]:
        # Admission on the second request: under reconnect churn nearly every key (a
        # client's own resume position, a query at the ring's moving head) is asked once.
        cache: ByteLru[K, V] = ByteLru(
            budget_bytes, budget_bytes // CACHE_ITEM_SHARE, admit_second=True
        )
        # Read at scrape time: nothing to keep in step on the request path.
        self.metrics.cache_bytes.labels(cache=name).set_function(lambda: cache.held_bytes)
        self.metrics.cache_entries.labels(cache=name).set_function(lambda: len(cache))
        return cache

    async def grant(self, request: web.Request) -> Grant:
        """Authenticate the request, counting refusals. Waits only when a token names a key
        the edge does not hold yet (one shared refetch from the identity provider)."""
        try:
            return await self.auth.authenticate(request)
        except ApiError as exc:
            # A 503 keys_unavailable refuses no one (the token was not checked); the
            # provider's trouble shows in the crm_events_jwks_* metrics instead.
            if exc.status in (401, 403):
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
