"""Who may read which events: JWT verification and the grant it yields.

A token comes from ``Authorization: Bearer``, else the auth cookie (a browser's
EventSource cannot set headers, but sends cookies), else ``?access_token=`` when that is
explicitly enabled. Its claims grant event types (``crm_types``: a list, or ``["*"]``) and
may require field equality on events (``crm_match``: ``{"TenantId": "t-1"}``). The same
grant applies to live delivery, resume and history. Tokens must carry ``exp``; a stream
ends when its token expires.

Client certificates (``CRM_EVENTS_AUTH_MODE`` ``cert``, ``jwt-or-cert``, ``jwt-and-cert``):
the load balancer verifies one at the TLS handshake and relays it in a header, believed only
from a peer in ``CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES`` (from any other peer it is ignored,
as if absent, and counted); rules grant by its subject or SANs (edge/client_cert.py), and a stream
ends at its ``notAfter`` as at a token's ``exp``. ``jwt-or-cert`` takes the certificate when
one is relayed, else the token; ``jwt-and-cert`` needs both and grants what both grant.

Keys: an HS256 secret, a PEM public key, a JWKS file, or an identity provider's JWKS over
HTTP (``CRM_EVENTS_AUTH_JWKS_URL``, ``CRM_EVENTS_AUTH_OIDC_ISSUER``: edge/jwks.py). Only the
last can make ``authenticate`` wait (one shared refetch when a token names an unknown key);
``verify`` never does I/O.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from prometheus_client import Counter

from shared.events import TYPE_RE
from shared.httpkit import ApiError
from shared.security_settings import AuthSettings

from .client_cert import CertGrants, CertificateError, ClientCert, parse_relayed
from .jwks import KeysUnavailable, RemoteKeys, UnknownKid, VerifyKey
from .limits import TrustedProxies
from .metrics import JwksMetrics
from .oidc import KeySource

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="crm-events"'}

TOKEN = "token"
CERT = "cert"
TOKEN_AND_CERT = "token+cert"


@dataclass(frozen=True, slots=True)
class Grant:
    types: frozenset[bytes] | None
    """Types the client may see; None means every type."""
    match: frozenset[tuple[str, str]]
    """Field values every delivered event must have."""
    expires_at: float | None
    """Unix time the grant ends (the token's ``exp``, the certificate's ``notAfter``, the
    earlier of both)."""
    subject: str | None = None
    source: str = TOKEN
    """What granted it, for messages: ``TOKEN``, ``CERT`` or ``TOKEN_AND_CERT``."""

    def narrow(self, requested: frozenset[bytes] | None) -> frozenset[bytes] | None:
        """The filter to apply for a request's ``types=``; refuses types not granted."""
        if self.types is None:
            return requested
        if requested is None:
            return self.types
        missing = requested - self.types
        if missing:
            names = ", ".join(sorted(t.decode() for t in missing))
            raise ApiError(403, "forbidden", f"{_NOT_GRANTED[self.source]}: {names}")
        return requested


_NOT_GRANTED = {
    TOKEN: "the token does not grant the event types",
    CERT: "the client certificate does not grant the event types",
    TOKEN_AND_CERT: "the token and the client certificate do not both grant the event types",
}


def intersect(token: Grant, cert: Grant) -> Grant:
    """What a token and a client certificate grant together (``jwt-and-cert``): the types
    both grant, every field constraint of either, until the earlier end."""
    types: frozenset[bytes] | None
    if token.types is None or cert.types is None:
        types = cert.types if token.types is None else token.types
    else:
        types = token.types & cert.types
        if not types:
            raise ApiError(
                403, "forbidden", "the token and the client certificate grant no type in common"
            )
    match = token.match | cert.match
    fields = [name for name, _ in match]
    clashing = sorted({name for name in fields if fields.count(name) > 1})
    if clashing:
        # Both constraints must hold, and no event has two values for one field: nothing
        # could be delivered, so say so rather than serve an empty stream.
        raise ApiError(
            403,
            "forbidden",
            f"the token and the client certificate require different values of {clashing[0]}",
        )
    ends = [t for t in (token.expires_at, cert.expires_at) if t is not None]
    return Grant(types, match, min(ends) if ends else None, token.subject, TOKEN_AND_CERT)


OPEN = Grant(None, frozenset(), None, "anonymous")
"""The grant of every request when authentication is off."""


def _unauthorized(message: str, error: str = "invalid_token") -> ApiError:
    headers = {"WWW-Authenticate": f'Bearer realm="crm-events", error="{error}"'}
    return ApiError(401, "unauthorized", message, headers)


NO_CERT = "a client certificate is required: connect through the load balancer's mutual-TLS port"


UNKNOWN_KID = "the token's key id is not known"
NO_KID = "the token names no key id (kid)"
KEYS_UNAVAILABLE = "the identity provider's keys are unavailable; retry shortly"


def _invalid_certificate(message: str) -> ApiError:
    return ApiError(401, "invalid_certificate", message)


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _keys_unavailable(exc: KeysUnavailable) -> ApiError:
    # 503, not 401: the token may be good, and clients take a repeated 401 as final (they
    # would log their user out during a provider outage).
    return ApiError(
        503, "keys_unavailable", KEYS_UNAVAILABLE, {"Retry-After": _retry_after(exc.retry_after_s)}
    )


def _unknown_kid(exc: UnknownKid) -> ApiError:
    error = _unauthorized(UNKNOWN_KID)
    if exc.retry_after_s is not None:
        # Refused within the refetch cooldown, unchecked: say when a refetch may be tried.
        error.headers["Retry-After"] = _retry_after(exc.retry_after_s)
    return error


def _kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError) as exc:
        # ValueError (UnicodeError): a token that is not ASCII, e.g. bytes an HTTP header
        # carried that are not UTF-8 (token_from refuses those; this guards other callers).
        raise _unauthorized(f"malformed token: {exc}") from None
    return kid if isinstance(kid, str) else None


class Authenticator:
    def __init__(
        self,
        settings: AuthSettings,
        jwks_metrics: JwksMetrics | None = None,
        *,
        untrusted_cert_headers: Counter | None = None,
    ) -> None:
        """``untrusted_cert_headers`` counts the certificate headers sent by peers not in
        ``settings.cert_trusted_proxies``. The grants file is read here, once: a bad one
        raises ``SettingsError`` naming CRM_EVENTS_CLIENT_CERT_GRANTS_FILE."""
        self._s = settings
        self._trusted = TrustedProxies(settings.cert_trusted_proxies)
        self._untrusted = untrusted_cert_headers
        self.cert_grants: CertGrants | None = None
        if settings.certs:
            assert settings.cert_grants_file is not None  # AuthSettings checks it
            self.cert_grants = CertGrants.load(settings.cert_grants_file)
        self.remote: RemoteKeys | None = None
        """The provider's keys, when they come over HTTP (the app starts and stops them)."""
        if settings.remote_keys:  # never when authentication is off
            self.remote = RemoteKeys(
                KeySource(settings.jwks_url, settings.oidc_issuer),
                refresh_s=settings.jwks_refresh_s,
                min_refetch_s=settings.jwks_min_refetch_s,
                grace_s=settings.jwks_grace_s,
                metrics=jwks_metrics,
            )
        self._keys: dict[str, Any] = {}
        self._key: Any = settings.secret if settings.secret is not None else None
        if settings.public_key_pem is not None:
            self._key = settings.public_key_pem
        if settings.jwks_file is not None:
            document = json.loads(Path(settings.jwks_file).read_text(encoding="utf-8"))
            for jwk in jwt.PyJWKSet.from_dict(document).keys:
                if jwk.key_id is None:
                    raise ValueError("every key of the JWKS file needs a kid")
                self._keys[jwk.key_id] = jwk.key

    @property
    def enabled(self) -> bool:
        return self._s.enabled

    def token_from(self, request: web.Request) -> str | None:
        token = self._token_from(request)
        if token is not None and not token.isascii():
            # A JWT is ASCII (base64url and dots). Non-UTF-8 header bytes arrive as
            # surrogate escapes that PyJWT cannot encode: refuse them here, as a bad token.
            raise _unauthorized("malformed token: not ASCII")
        return token

    def _token_from(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized(
                    "the Authorization header must be 'Bearer <token>'", "invalid_request"
                )
            return token.strip()
        cookie = request.cookies.get(self._s.cookie)
        if cookie:
            return cookie
        if self._s.query_token:
            values = request.query.getall("access_token", [])
            if len(values) > 1:
                raise ApiError(400, "invalid_query", "'access_token' is given more than once")
            if values:
                return values[0]
        return None

    async def authenticate(self, request: web.Request) -> Grant:
        mode = self._s.mode
        if mode == "off":
            return OPEN
        if mode == "jwt":
            return await self._token_grant(request)
        cert = self.relayed_cert(request)
        if mode == "cert" or (mode == "jwt-or-cert" and cert is not None):
            if cert is None:
                raise self._no_cert()
            return self.cert_grant(cert)
        if mode == "jwt-or-cert":
            if self.token_from(request) is None:
                raise _unauthorized(
                    "a bearer token or a client certificate is required", "invalid_request"
                )
            return await self._token_grant(request)
        # jwt-and-cert: every 401 before any 403, so that a client missing a credential
        # hears about it first.
        if cert is None:
            raise self._no_cert()
        token_grant = await self._token_grant(request)
        return intersect(token_grant, self.cert_grant(cert))

    async def _token_grant(self, request: web.Request) -> Grant:
        token = self.token_from(request)
        if token is None:
            raise _unauthorized("a bearer token is required", "invalid_request")
        return await self.verify_fetching(token)

    def _no_cert(self) -> ApiError:
        if self._s.tokens:
            return _unauthorized(NO_CERT, "invalid_request")
        # No HTTP authentication scheme names a TLS client certificate: no challenge.
        return ApiError(401, "unauthorized", NO_CERT)

    def relayed_cert(self, request: web.Request) -> ClientCert | None:
        """The certificate the proxy relayed, or None: no header, an empty one, or one from
        a peer that is not a trusted proxy (ignored and counted: a client may not speak for
        the proxy). A header that does not decode is 401 ``invalid_certificate``."""
        values = request.headers.getall(self._s.cert_header, ())
        if not values:
            return None
        # The peer itself, never an address a header names; and a list of its own
        # (CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES), not the X-Forwarded-For one: naming the
        # client's address is a far smaller power than asserting any client identity.
        if (request.remote or "unknown") not in self._trusted:
            if self._untrusted is not None:
                self._untrusted.inc()
            return None
        if len(values) > 1:
            raise _invalid_certificate("the client certificate header is given more than once")
        if not values[0].strip():
            return None  # what a proxy sends for a connection without a certificate
        try:
            return parse_relayed(values[0])
        except CertificateError as exc:
            raise _invalid_certificate(
                f"the relayed client certificate is unreadable: {exc}"
            ) from None

    def cert_grant(self, cert: ClientCert, now: float | None = None) -> Grant:
        """What the rules grant the certificate; expired (past ``notAfter`` and the leeway,
        as a token past ``exp``) is 401, no matching rule 403."""
        now = time.time() if now is None else now
        leeway = self._s.leeway_s
        if cert.not_after + leeway <= now:
            raise _invalid_certificate("the client certificate has expired")
        if cert.not_before - leeway > now:
            raise _invalid_certificate("the client certificate is not valid yet")
        assert self.cert_grants is not None  # a certificate is read only in its modes
        rule = self.cert_grants.rule_for(cert)
        if rule is None:
            raise ApiError(403, "forbidden", "the client certificate grants nothing")
        return Grant(rule.types, rule.match, cert.not_after, cert.subject_text, CERT)

    async def verify_fetching(self, token: str) -> Grant:
        """``verify``, except that a token naming a key the provider's document did not have
        when last fetched waits for one refetch (shared, rate-limited: edge/jwks.py)."""
        if self.remote is None:
            return self.verify(token)
        kid = _kid(token)
        if kid is None:
            raise _unauthorized(NO_KID)
        try:
            key = await self.remote.key_for(kid)
        except KeysUnavailable as exc:
            raise _keys_unavailable(exc) from None
        except UnknownKid as exc:
            raise _unknown_kid(exc) from None
        return self._verify_with(token, key.key, list(key.algorithms))

    def _remote_key(self, token: str) -> VerifyKey:
        assert self.remote is not None
        kid = _kid(token)
        if kid is None:
            raise _unauthorized(NO_KID)
        key = self.remote.lookup(kid)
        if key is None:
            if not self.remote.loaded:
                raise _keys_unavailable(KeysUnavailable(1.0))
            raise _unauthorized(UNKNOWN_KID)
        return key

    def _key_for(self, token: str) -> Any:
        if not self._keys:
            return self._key
        kid = _kid(token)
        if kid not in self._keys:
            raise _unauthorized(UNKNOWN_KID)
        return self._keys[kid]

    def verify(self, token: str, now: float | None = None) -> Grant:
        """Verify with the keys held (a remote provider's keys as last fetched; no I/O)."""
        if self.remote is not None:
            key = self._remote_key(token)
            return self._verify_with(token, key.key, list(key.algorithms), now)
        return self._verify_with(token, self._key_for(token), self._s.algorithms, now)

    def _verify_with(
        self, token: str, key: Any, algorithms: list[str], now: float | None = None
    ) -> Grant:
        s = self._s
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp"], "verify_aud": s.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except (jwt.PyJWTError, ValueError) as exc:
            # ValueError: see _kid (a token PyJWT cannot encode as ASCII).
            raise _unauthorized(f"the token is not valid: {exc}") from None
        grant = self._grant(claims)
        if grant.expires_at is not None and grant.expires_at + s.leeway_s <= (now or time.time()):
            raise _unauthorized("the token has expired")
        return grant

    def _grant(self, claims: dict[str, Any]) -> Grant:
        raw_types = claims.get(self._s.types_claim)
        if raw_types is None:
            raise ApiError(403, "forbidden", f"the token has no '{self._s.types_claim}' claim")
        if not isinstance(raw_types, list) or not all(isinstance(t, str) for t in raw_types):
            raise _unauthorized(f"'{self._s.types_claim}' must be a list of event types")
        types: frozenset[bytes] | None
        if "*" in raw_types:
            types = None
        else:
            if not all(TYPE_RE.fullmatch(t) for t in raw_types):
                raise _unauthorized(f"'{self._s.types_claim}' holds an invalid event type")
            types = frozenset(t.encode() for t in raw_types)
        raw_match = claims.get(self._s.match_claim, {})
        if not isinstance(raw_match, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
            for k, v in raw_match.items()
        ):
            raise _unauthorized(f"'{self._s.match_claim}' must map field names to values")
        exp = claims.get("exp")
        # RFC 7519 makes exp a NumericDate: a JSON number. PyJWT also accepts a numeric
        # string, which the expiry timer would not see; such a token would never end its
        # stream, so it is refused rather than guessed at.
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _unauthorized("'exp' must be a number (seconds since the epoch)")
        subject = claims.get("sub")
        return Grant(
            types,
            frozenset((k, str(v)) for k, v in raw_match.items()),
            float(exp),
            subject if isinstance(subject, str) else None,
        )


def issue_token(
    secret: str,
    *,
    types: list[str],
    match: dict[str, str] | None = None,
    ttl_s: float = 3600,
    subject: str = "developer",
    now: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token, for the local stack's development token and for tests. ``audience``
    and ``issuer`` become ``aud`` and ``iss``: an edge with CRM_EVENTS_JWT_AUDIENCE or
    CRM_EVENTS_JWT_ISSUER set refuses a token without them."""
    issued = now if now is not None else time.time()
    claims: dict[str, Any] = {
        "sub": subject,
        "iat": int(issued),
        "exp": int(issued + ttl_s),
        "crm_types": types,
    }
    if match:
        claims["crm_match"] = match
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
