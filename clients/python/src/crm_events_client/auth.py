"""Bearer tokens: a static one, or a provider called before expiry, on ``auth_expired``
and on a 401.

A provider is any callable, sync or async, returning the token (``str``) or a ``Token``
with its expiry. Without an explicit expiry the ``exp`` claim is read from the JWT's
payload, base64 only: the signature is the server's business, and the client needs no JWT
library to know when to ask for a new token.

A provider that raises (an identity provider's blip) raises ``TokenProviderError`` here;
the stream and history calls retry it with backoff rather than end. A proactive renewal
that fails keeps the current token (it is still valid) and tries again later, after
``RENEW_RETRY_S`` doubling to ``RENEW_RETRY_CAP_S``.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .errors import TokenProviderError

DEFAULT_REFRESH_MARGIN_S = 30.0
"""Refresh at most this long before expiry..."""
REFRESH_FRACTION = 0.1
"""...or when only this fraction of the token's lifetime is left, whichever comes later
(so that a 5-minute token is renewed 30 s early and a 4-second one 0.4 s early)."""
RENEW_RETRY_S = 1.0
"""After a failed proactive renewal, the next try waits about this long..."""
RENEW_RETRY_CAP_S = 30.0
"""...doubling with each failure in a row, up to this."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    """The bearer token (kept out of ``repr``, so it does not end up in logs)."""
    expires_at: float | None = None
    """Unix time it expires; None: read ``exp`` from the JWT, else unknown."""
    issued_at: float | None = None
    """Unix time it was issued; None: the JWT's ``iat``, else when the provider returned it."""


TokenResult = str | Token
TokenProvider = Callable[[], TokenResult | Awaitable[TokenResult]]
"""Returns the token to use now: called at start, before expiry, after ``auth_expired``
and after a 401."""


def jwt_claims(token: str) -> dict[str, object] | None:
    """The JWT's payload claims, unverified; None when ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT, unverified; None when there is none."""
    claims = jwt_claims(token)
    return _number(claims.get("exp")) if claims is not None else None


def refresh_at(
    token: Token, now: float, margin_s: float = DEFAULT_REFRESH_MARGIN_S
) -> float | None:
    """When to renew ``token`` (Unix time), or None if its expiry is not known."""
    if token.expires_at is None:
        return None
    issued = token.issued_at if token.issued_at is not None else now
    lifetime = max(0.0, token.expires_at - issued)
    return token.expires_at - min(margin_s, lifetime * REFRESH_FRACTION)


class TokenSource:
    """The token in use, and when and how to get the next one."""

    def __init__(
        self,
        token: str | TokenProvider | None,
        margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._provider: TokenProvider | None = None
        self._current: Token | None = None
        self._obtained_at = clock()
        if callable(token):
            self._provider = token
        elif token is not None:
            self._current = self._complete(Token(token.strip()), clock())
        self._margin_s = margin_s
        self._clock = clock
        self.calls = 0
        """How many times the provider was called."""
        self.renew_retry_s = RENEW_RETRY_S
        """The first wait after a failed proactive renewal (doubles, up to the cap)."""
        self._renew_failures = 0
        self._renew_not_before: float | None = None

    @property
    def can_refresh(self) -> bool:
        return self._provider is not None

    @staticmethod
    def _complete(token: Token, now: float) -> Token:
        claims = jwt_claims(token.value) or {}
        expires = token.expires_at if token.expires_at is not None else _number(claims.get("exp"))
        issued = token.issued_at if token.issued_at is not None else _number(claims.get("iat"))
        return Token(token.value, expires, issued if issued is not None else now)

    async def current(self) -> Token | None:
        """The token to send (calls the provider the first time)."""
        if self._current is None and self._provider is not None:
            await self.refresh()
        return self._current

    async def refresh(self) -> Token | None:
        """A new token from the provider (the current one when there is no provider).
        Raises ``TokenProviderError`` when the provider fails; the current token stays."""
        if self._provider is None:
            return self._current
        self.calls += 1
        try:
            result = self._provider()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the provider is the caller's code: any failure is its own
            raise TokenProviderError(f"the token provider failed: {exc!r}") from exc
        token = result if isinstance(result, Token) else Token(result)
        if not token.value.strip():
            raise TokenProviderError("the token provider returned an empty token")
        stripped = Token(token.value.strip(), token.expires_at, token.issued_at)
        self._obtained_at = self._clock()
        self._current = self._complete(stripped, self._obtained_at)
        self._renew_failures, self._renew_not_before = 0, None
        return self._current

    def renewal_failed(self) -> float:
        """Note a failed proactive renewal: the next one waits (jittered, doubling). Returns
        the delay in seconds."""
        window = min(RENEW_RETRY_CAP_S, self.renew_retry_s * 2.0 ** min(self._renew_failures, 16))
        self._renew_failures += 1
        delay = window * (0.5 + random.random() / 2)
        self._renew_not_before = self._clock() + delay
        return delay

    def expired(self, now: float | None = None) -> bool:
        """True when the current token's known expiry is at or before now."""
        token = self._current
        if token is None or token.expires_at is None:
            return False
        return token.expires_at <= (self._clock() if now is None else now)

    def lifetime_s(self) -> float | None:
        """The current token's whole lifetime (expiry minus issue), when known."""
        token = self._current
        if token is None or token.expires_at is None or token.issued_at is None:
            return None
        return max(0.0, token.expires_at - token.issued_at)

    def refresh_due(self) -> float | None:
        """Unix time to renew the current token proactively (None: never; no provider, or
        an expiry that is not known)."""
        if self._provider is None or self._current is None:
            return None
        due = refresh_at(self._current, self._obtained_at, self._margin_s)
        if due is not None and due <= self._obtained_at:
            # Already due when the provider gave it (expired, or about to): renewing again
            # at once would loop; the server's auth_expired or 401 decides instead.
            return None
        if due is not None and self._renew_not_before is not None:
            due = max(due, self._renew_not_before)
        return due

    async def headers(self) -> dict[str, str]:
        token = await self.current()
        return {"Authorization": f"Bearer {token.value}"} if token is not None else {}
