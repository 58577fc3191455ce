"""Where an identity provider's keys are: bounded JSON reads over HTTP and OpenID Connect
discovery.

With ``CRM_EVENTS_AUTH_OIDC_ISSUER`` the edge reads ``<issuer>/.well-known/openid-configuration``
(OpenID Connect Discovery 1.0, section 4), checks that the document's ``issuer`` is exactly the
configured one (section 4.3: a document claiming another issuer is refused, else a wrong or
hijacked URL would hand the edge someone else's keys) and takes its ``jwks_uri``. With
``CRM_EVENTS_AUTH_JWKS_URL`` the URL is used as given.

Every read is bounded: a total timeout, at most ``MAX_BODY_BYTES`` of body (the provider's
answer is kept in memory and parsed; a misbehaving or hostile server must not grow the edge),
a few redirects, and a JSON object or nothing.

Keys are trusted only as far as the channel they came over: once a read starts at an https://
URL (an https issuer's discovery document and the ``jwks_uri`` it names), every redirect and
the ``jwks_uri`` must be https too, else a network attacker could substitute the keys. Plain
http is accepted only for loopback hosts (a provider beside the edge, tests). The keys may live
on another host than the issuer (Google's are on www.googleapis.com): only the scheme is
checked.

Error texts end up in /readyz and the logs: ``describe`` strips credentials from URLs and
bounds the length (a discovery document's ``issuer`` is provider-controlled text).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

FETCH_TIMEOUT_S = 5.0
"""One document's read, redirects and connection included. An unknown-kid request waits at
most this long in all (edge/jwks.py), even when discovery and the keys are both read."""
MAX_BODY_BYTES = 1 << 20
"""Real JWKS and discovery documents are a few KiB; 1 MiB leaves ample room."""
MAX_REDIRECTS = 3
DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_ERROR_CHARS = 200
"""Longest error text kept (shown in /readyz and logged)."""

_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")


def describe(text: str) -> str:
    """``text`` fit for /readyz and logs: no ``user:password@`` in URLs, at most
    ``MAX_ERROR_CHARS`` characters."""
    text = _USERINFO_RE.sub(r"\1", text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text


class FetchError(Exception):
    """A provider document could not be fetched or is not acceptable; the text is short
    (logged and shown in /readyz, through ``describe``)."""


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secure_enough(url: str) -> bool:
    return url.startswith("https://") or is_loopback(url)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET ``url`` and return its body as a JSON object, within the bounds above."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            body = await _read(session, url)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        raise FetchError(f"{url} did not send JSON") from None
    if not isinstance(document, dict):
        raise FetchError(f"{url} did not send a JSON object")
    return document


async def _read(session: aiohttp.ClientSession, url: str) -> bytearray:
    """The body at ``url``, following redirects by hand: an https read must not be
    downgraded to plain http, which is checked before the redirect is followed."""
    target = url
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(
            target, allow_redirects=False, headers={"Accept": "application/json"}
        ) as resp:
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                following = urljoin(target, resp.headers["Location"])
                if url.startswith("https://") and not _secure_enough(following):
                    raise FetchError(f"{url} redirects to plain http ({following})")
                target = following
                continue
            if resp.status != 200:
                raise FetchError(f"{url} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_BODY_BYTES:
                raise FetchError(
                    f"{url} sent {resp.content_length} bytes (at most {MAX_BODY_BYTES})"
                )
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise FetchError(f"{url} sent more than {MAX_BODY_BYTES} bytes")
            return body
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True, slots=True)
class KeySource:
    """The JWKS URL as configured, or the issuer whose discovery document names it."""

    jwks_url: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        if (self.jwks_url is None) == (self.issuer is None):
            raise ValueError("give exactly one of jwks_url and issuer")

    @property
    def discovery_url(self) -> str | None:
        if self.issuer is None:
            return None
        # Discovery appends the path to the issuer without its trailing slash (section 4).
        return self.issuer.rstrip("/") + DISCOVERY_PATH

    async def discover(self, session: aiohttp.ClientSession) -> str:
        """The JWKS URL: as configured, or read (and checked) from the discovery document."""
        if self.jwks_url is not None:
            return self.jwks_url
        assert self.discovery_url is not None
        document = await get_json(session, self.discovery_url)
        claimed = document.get("issuer")
        if claimed != self.issuer:
            # The claimed issuer is the provider's text: shortened (describe) when shown.
            raise FetchError(
                f"{self.discovery_url} names the issuer {claimed!r:.80}, not {self.issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise FetchError(f"{self.discovery_url} has no http(s) jwks_uri")
        if self.discovery_url.startswith("https://") and not _secure_enough(jwks_uri):
            raise FetchError(
                f"{self.discovery_url} names a plain http jwks_uri ({jwks_uri}) for an https issuer"
            )
        return jwks_uri
