"""The identity provider's signing keys, fetched over HTTP and held in memory.

With ``CRM_EVENTS_AUTH_JWKS_URL`` or ``CRM_EVENTS_AUTH_OIDC_ISSUER`` (edge/oidc.py finds the
document) the edge verifies tokens with the keys of the provider's JWKS document:

- **Fetched off the request path.** A supervised background task fetches the document at
  start and refreshes it every ``CRM_EVENTS_AUTH_JWKS_REFRESH_S`` (a little earlier, with
  jitter, so that a fleet of edges does not fetch in step). Fetches use the app's aiohttp
  session; PyJWT's ``PyJWKClient`` is not used because it reads with blocking ``urllib``,
  which would stall every stream of the edge while the provider answers.
- **An unknown ``kid`` refetches, rate-limited and single-flight.** A provider that rotates
  publishes the new key before signing with it, so a token naming a key the edge lacks most
  likely means the edge's copy is stale: the request waits for one refetch (at most
  ``FETCH_TIMEOUT_S``). Every request that meets an unknown kid while a fetch is in flight
  waits for that same fetch; after such a refetch, no other starts for
  ``CRM_EVENTS_AUTH_JWKS_MIN_REFETCH_S``, and a token with an unknown kid meanwhile is
  answered at once (counted in ``crm_events_jwks_refetches_limited_total``). A flood of
  made-up kids therefore costs the provider at most one request per that interval per edge.
- **Only a successful read can say a kid does not exist.** ``key_for`` raises UnknownKid (401)
  when the document, read successfully, lacks the kid (or, within the cooldown, lacked it at
  the last read, which succeeded), and KeysUnavailable (503 with Retry-After) when the keys
  were never fetched or the read failed or timed out: the token may be good, and a client
  takes a repeated 401 as final.
- **A failed fetch changes nothing.** The keys held stay in use (a provider outage must not
  log everybody out); the failure is counted and logged, and retried with jittered backoff
  (from 1 s, doubling, up to the refresh interval; up to ``RETRY_MAX_UNLOADED_S`` while no
  fetch ever succeeded, so that a not-ready edge notices a recovered provider soon).
- **Not ready until the first success.** The edge starts even when the provider is down,
  but ``/readyz`` answers 503 (``jwks``) until it holds keys: an edge that can verify no
  token should not be sent traffic.
- **Keys the provider stops publishing are kept for a grace period** of
  ``CRM_EVENTS_AUTH_JWKS_GRACE_S`` (default 3600 s) after the first document without them,
  then dropped. Providers usually publish a retired key for a while after rotating, but not
  all do, and tokens signed just before a rotation live on until their ``exp``: the grace
  period keeps them working. A time bound, rather than "the union of the last two
  documents", because how many documents pass before those tokens expire depends on the
  refresh interval and on how often the provider changes its document, while token
  lifetimes are a time (Keycloak's default access token lives 5 min, Entra ID's 60 to 90 min).
  Removing a key is also how a provider revokes a leaked one: set the grace to 0 to honour
  removals at the next refresh (a restart of the edges forgets retired keys at once).
- **Bounded.** Each fetch has a timeout, the body at most 1 MiB (edge/oidc.py), the document
  at most ``MAX_KEYS`` keys (and at most ``MAX_KEYS`` retired ones); only asymmetric signing
  keys are taken (RSA of at least 2048 bits, EC P-256/384/521, Ed25519/Ed448), each with the
  algorithms of its type and curve (its ``alg`` when given, which must fit them): never
  ``none``, never an HMAC algorithm with a published key (algorithm confusion). Each entry
  is judged alone, so one malformed key costs only itself; a kid given to two different keys
  is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from .metrics import JwksMetrics
from .oidc import FETCH_TIMEOUT_S, FetchError, KeySource, describe, get_json

log = logging.getLogger(__name__)

MAX_KEYS = 100
MAX_KID_CHARS = 256
"""A longer ``kid`` is refused without a fetch: no provider uses one, so it is made up."""
RETRY_INITIAL_S = 1.0
RETRY_MAX_UNLOADED_S = 30.0
"""Longest retry delay while no fetch ever succeeded: such an edge is not ready, so it must
notice a recovered provider soon, whatever the refresh interval."""
MIN_RSA_BITS = 2048
"""Shorter RSA keys are refused (NIST SP 800-131A disallows them for signatures)."""
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
ASYMMETRIC_ALGORITHMS = frozenset({*RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA"})
KEY_TYPES = ("RSA", "EC", "OKP")
EC_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
"""An EC key signs with the one algorithm of its curve (RFC 7518 section 3.4)."""
OKP_CURVES = ("Ed25519", "Ed448")


@dataclass(frozen=True, slots=True)
class VerifyKey:
    kid: str
    key: Any
    """The public key object PyJWT verifies with."""
    algorithms: tuple[str, ...]
    """The algorithms a token signed by this key may name."""


class _Unusable(Exception):
    """One entry of a document cannot be used; the others still can."""


def _text(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise _Unusable(f"'{name}' is not a string")
    return value


def _algorithms(raw: dict[str, Any]) -> tuple[str, ...]:
    """The algorithms the entry's key may verify, from its type, curve and ``alg``."""
    kty, declared = _text(raw, "kty"), _text(raw, "alg")
    if kty == "RSA":
        # An RSA key without "alg" (Entra ID publishes them so) signs with any RSA scheme.
        allowed: tuple[str, ...] = RSA_ALGORITHMS
    elif kty == "EC":
        curve = EC_CURVE_ALGORITHMS.get(_text(raw, "crv") or "")
        if curve is None:
            raise _Unusable(f"unsupported EC curve {raw.get('crv')!r}")
        allowed = (curve,)
    elif kty == "OKP":
        if _text(raw, "crv") not in OKP_CURVES:
            raise _Unusable(f"unsupported OKP curve {raw.get('crv')!r}")
        allowed = ("EdDSA",)
    else:
        raise _Unusable(f"not a signing key type: {kty!r}")
    if declared is None:
        return allowed
    if declared not in allowed:
        # Checked before PyJWT sees the key: "none", HMAC names, or a name that does not fit
        # the key (ES512 on a P-256 key) are never taken.
        raise _Unusable(f"'alg' {declared!r} does not fit a {kty} key")
    return (declared,)


def _verify_key(raw: object) -> VerifyKey:
    if not isinstance(raw, dict):
        raise _Unusable("not a JSON object")
    kid = _text(raw, "kid")
    if not kid or len(kid) > MAX_KID_CHARS:
        raise _Unusable("no kid, or a kid too long")
    if _text(raw, "use") not in (None, "sig"):
        raise _Unusable("not for signatures")
    algorithms = _algorithms(raw)
    try:
        key = jwt.PyJWK(raw, algorithms[0]).key
    except Exception as exc:  # noqa: BLE001 - any bad field of one key must not cost the rest
        raise _Unusable(f"unreadable: {type(exc).__name__}") from None
    size = getattr(key, "key_size", None)
    if raw.get("kty") == "RSA" and (not isinstance(size, int) or size < MIN_RSA_BITS):
        raise _Unusable(f"RSA key of {size} bits (at least {MIN_RSA_BITS})")
    return VerifyKey(kid, key, algorithms)


def parse_jwks(document: dict[str, Any]) -> dict[str, VerifyKey]:
    """The usable signing keys of a JWKS document by kid; FetchError if there are none.

    Each entry is judged alone: one the edge cannot use (an unknown type, a wrong-typed
    field, a weak key) is skipped and logged, the others are kept. A kid given to two
    different entries is dropped altogether: which one a token means cannot be known."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise FetchError("the JWKS document has no 'keys' list")
    if len(entries) > MAX_KEYS:
        raise FetchError(f"the JWKS document has {len(entries)} keys (at most {MAX_KEYS})")
    keys: dict[str, VerifyKey] = {}
    raw_by_kid: dict[str, object] = {}
    ambiguous: set[str] = set()
    skipped: list[str] = []
    for index, raw in enumerate(entries):
        try:
            key = _verify_key(raw)
        except _Unusable as why:
            skipped.append(f"#{index}: {why}")
            continue
        if key.kid in raw_by_kid:
            if raw_by_kid[key.kid] != raw:
                ambiguous.add(key.kid)
            continue
        raw_by_kid[key.kid] = raw
        keys[key.kid] = key
    for kid in ambiguous:
        del keys[kid]
    if skipped or ambiguous:
        log.warning(
            "identity provider keys skipped",
            extra={"skipped": skipped[:10], "ambiguous_kids": sorted(ambiguous)[:10]},
        )
    if not keys:
        raise FetchError("the JWKS document has no usable signing key with a kid")
    return keys


class KeysUnavailable(Exception):
    """The provider's document could not be read (never yet, or not in the refetch this
    request waited for): whether the token's key exists is not known. Retry later."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the identity provider's keys are unavailable")
        self.retry_after_s = retry_after_s


class UnknownKid(Exception):
    """The document as last read, successfully, has no key of this id."""

    def __init__(self, retry_after_s: float | None = None) -> None:
        super().__init__("the token's key id is not known")
        self.retry_after_s = retry_after_s
        """Set when no refetch was tried (the cooldown): when one may be."""


def provider_session() -> aiohttp.ClientSession:
    """The HTTP session for the provider's documents. Proxies come from the environment
    (``HTTPS_PROXY``, ``NO_PROXY``): an edge whose egress goes through a proxy reaches the
    provider only so. No cookie jar: a provider's cookies serve no purpose here and would
    only accumulate."""
    return aiohttp.ClientSession(trust_env=True, cookie_jar=aiohttp.DummyCookieJar())


class RemoteKeys:
    """The keys of one provider: looked up by kid, refreshed by ``run`` (a supervised task),
    refetched on an unknown kid by ``key_for``."""

    def __init__(
        self,
        source: KeySource,
        *,
        refresh_s: float,
        min_refetch_s: float,
        grace_s: float,
        metrics: JwksMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._refresh_s = refresh_s
        self._min_refetch_s = min_refetch_s
        self._grace_s = grace_s
        self._metrics = metrics
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._current: dict[str, VerifyKey] = {}
        self._retired: dict[str, tuple[VerifyKey, float]] = {}
        """Keys no longer published, with the monotonic time they stop verifying."""
        self._jwks_url: str | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._inflight_reason = ""
        self._last_ok = False
        """Whether the last fetch that ended succeeded."""
        self._last_refetch = -math.inf
        """When the last fetch for an unknown kid started (the cooldown's start)."""
        self._failures = 0
        self.loaded = False
        """Whether a fetch ever succeeded (readiness)."""
        self.last_error: str | None = None
        if metrics is not None:
            metrics.keys.set_function(self.key_count)

    def attach(self, session: aiohttp.ClientSession) -> None:
        """Use ``session`` (owned by the app's lifecycle) for every fetch."""
        self._session = session

    def key_count(self) -> int:
        now = self._clock()
        return len(self._current) + sum(1 for _, until in self._retired.values() if until > now)

    def lookup(self, kid: str) -> VerifyKey | None:
        """The key for ``kid`` among those held; never fetches."""
        found = self._current.get(kid)
        if found is not None:
            return found
        retired = self._retired.get(kid)
        if retired is not None and retired[1] > self._clock():
            return retired[0]
        return None

    async def key_for(self, kid: str) -> VerifyKey:
        """The key for ``kid``, refetching the document once if it is unknown (shared with
        every concurrent caller; not within the cooldown; waited for at most
        ``FETCH_TIMEOUT_S``). UnknownKid: a successful read has no such key (or none may be
        tried yet and the last read succeeded); KeysUnavailable: the provider could not be
        read, so the token may well be good."""
        found = self.lookup(kid)
        if found is not None:
            return found
        if len(kid) > MAX_KID_CHARS:
            raise UnknownKid()
        task = self._inflight
        if task is None:
            remaining = self._min_refetch_s - (self._clock() - self._last_refetch)
            if remaining > 0:
                if self._metrics is not None:
                    self._metrics.refetches_limited.inc()
                if not self._last_ok:
                    raise KeysUnavailable(remaining)
                raise UnknownKid(remaining)
            self._last_refetch = self._clock()
            task = self._start_fetch("unknown_kid")
        try:
            # Shielded: a client that leaves (or times out) must not cancel the fetch others
            # wait for. Bounded: discovery and the keys together may take two reads.
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                ok = await asyncio.shield(task)
        except TimeoutError:
            raise KeysUnavailable(self._min_refetch_s) from None
        found = self.lookup(kid)
        if found is not None:
            return found
        if not ok:
            raise KeysUnavailable(self._min_refetch_s)
        raise UnknownKid()

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch in flight); whether the keys are fresh."""
        task = self._inflight
        while task is not None and self._inflight_reason == "unknown_kid":
            # That fetch rereads the keys only; a refresh also rereads the discovery
            # document (a provider may move its keys), so it waits and then fetches itself.
            await asyncio.shield(task)
            task = self._inflight
        if task is None:
            task = self._start_fetch("scheduled" if self.loaded else "start")
        return await asyncio.shield(task)

    def retry_delay(self) -> float:
        """How long ``run`` waits after ``self._failures`` failures in a row: doubling from
        ``RETRY_INITIAL_S``, with jitter (a fleet of edges must not retry in step), up to
        the refresh interval, or ``RETRY_MAX_UNLOADED_S`` while no fetch ever succeeded."""
        cap = self._refresh_s if self.loaded else min(self._refresh_s, RETRY_MAX_UNLOADED_S)
        backoff = min(cap, RETRY_INITIAL_S * 2.0 ** min(max(self._failures - 1, 0), 20))
        return backoff * random.uniform(0.5, 1.0)

    async def run(self) -> None:
        """Fetch at start, then refresh periodically; retry failures with backoff."""
        while True:
            ok = await self.refresh()
            await asyncio.sleep(
                self._refresh_s * random.uniform(0.9, 1.0) if ok else self.retry_delay()
            )

    async def close(self) -> None:
        """Cancel a fetch still in flight (before the session closes)."""
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start_fetch(self, reason: str) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._fetch(reason))
        self._inflight = task
        self._inflight_reason = reason

        def done(finished: asyncio.Task[bool]) -> None:
            if self._inflight is finished:
                self._inflight = None

        task.add_done_callback(done)
        return task

    async def _fetch(self, reason: str) -> bool:
        session = self._session
        try:
            if session is None:
                raise FetchError("no HTTP session (the edge is not started)")
            # The discovery document is read again on every periodic refresh, so that a
            # provider moving its JWKS is followed; an unknown kid only rereads the keys.
            if self._jwks_url is None or reason != "unknown_kid":
                self._jwks_url = await self.source.discover(session)
            keys = parse_jwks(await get_json(session, self._jwks_url))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the held keys stay
            self._failures += 1
            self._last_ok = False
            self.last_error = describe(str(exc) if isinstance(exc, FetchError) else repr(exc))
            self._count("error", reason)
            log.warning(
                "identity provider keys not fetched; keeping the keys held",
                extra={"reason": reason, "error": self.last_error, "keys": self.key_count()},
            )
            return False
        self._apply(keys)
        self._failures = 0
        self._last_ok = True
        self.last_error = None
        self.loaded = True
        self._count("ok", reason)
        if self._metrics is not None:
            self._metrics.last_success.set(time.time())
        return True

    def _apply(self, keys: dict[str, VerifyKey]) -> None:
        now = self._clock()
        for kid, key in self._current.items():
            if kid not in keys:
                self._retired[kid] = (key, now + self._grace_s)
                log.info("identity provider stopped publishing a key", extra={"kid": kid})
        kept = [
            (kid, held) for kid, held in self._retired.items() if kid not in keys and held[1] > now
        ]
        # Bounded like a document: a provider rotating faster than the grace period must not
        # grow the edge; the keys retired last are kept.
        kept.sort(key=lambda item: item[1][1], reverse=True)
        self._retired = dict(kept[:MAX_KEYS])
        added = keys.keys() - self._current.keys()
        if added:
            log.info("identity provider keys added", extra={"kids": sorted(added)})
        self._current = keys

    def _count(self, result: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.fetches.labels(result=result, reason=reason).inc()
