"""The Command Center: ``GET /ops/crm-events``, an operator's live view of the stream.

Plain HTML, CSS and JavaScript from ``edge/static/``, no build step and nothing fetched from
elsewhere: the page talks only to this origin's ``/crm-events/history`` and ``/crm-events``.
Every edge serves it, so it works through the load balancer and on each edge directly.

Routes:

* ``GET /ops/crm-events``: the page (``/ops/crm-events/`` redirects there);
* ``GET /ops/crm-events/assets/{name}``: its script, style sheet and icon, and the JavaScript
  client it imports (``crm-events-client.js``: a committed copy of
  ``clients/js/crm-events-client.js``, written by ``python -m devtools.vendor_js write``; the
  wheel carries ``edge/static/`` only, so the page cannot import the client from its home).

The page carries the name of the edge's auth cookie (``CRM_EVENTS_AUTH_COOKIE``) in a
``<meta name="crm-events-auth-cookie">`` tag, filled in here: its sign-in link (``#token=``)
stores the token under the name this edge reads, whatever it is configured to.

Files are read when first asked for and again when they change on disk (a developer edits
and reloads), answered with an ``ETag`` and ``Cache-Control: no-cache`` so browsers
revalidate cheaply. A missing file is a JSON 404 like every other error; the edge itself
does not depend on the page being installed.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from shared.httpkit import ApiError
from shared.security_settings import DEFAULT_AUTH_COOKIE

__all__ = ["ASSETS", "PAGE_PATH", "STATIC_DIR", "add_ops_page_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/ops/crm-events"
PAGE_FILE = "crm-events.html"
#: The page's assets: file name -> content type. Nothing else under static/ is served.
ASSETS = {
    "crm-events.js": "text/javascript; charset=utf-8",
    "crm-events-client.js": "text/javascript; charset=utf-8",
    "crm-events.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# The page runs only its own script and style sheet and talks only to this origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
_COMMON_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
#: The tag of the page that names the auth cookie; its content is this edge's setting.
_COOKIE_META = re.compile(rb'<meta name="crm-events-auth-cookie" content="[^"]*">')


@dataclass(frozen=True, slots=True)
class _File:
    stamp: tuple[int, int]
    body: bytes
    etag: str


class _Files:
    """Reads files from one directory, cached until their mtime or size changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, _File] = {}

    def get(self, name: str) -> _File:
        path = self.root / name
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(name)
            if cached is not None and cached.stamp == stamp:
                return cached
            body = path.read_bytes()
        except OSError:
            raise ApiError(
                404, "not_found", f"{name} is not installed on this edge (edge/static/)"
            ) from None
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        entry = _File(stamp, body, etag)
        self._cache[name] = entry
        return entry


def _render_page(file: _File, auth_cookie: str) -> _File:
    meta = f'<meta name="crm-events-auth-cookie" content="{html.escape(auth_cookie)}">'
    body, found = _COOKIE_META.subn(meta.encode(), file.body, count=1)
    if not found:
        # Without the tag the page would sign in under a name this edge may not read.
        raise ApiError(500, "internal", f"{PAGE_FILE} lacks its crm-events-auth-cookie tag")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _File(file.stamp, body, etag)


def _respond(
    request: web.Request, file: _File, content_type: str, extra: dict[str, str] | None = None
) -> web.Response:
    headers = {**_COMMON_HEADERS, **(extra or {}), "ETag": file.etag}
    if file.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = content_type
    return web.Response(body=file.body, headers=headers)


def add_ops_page_routes(
    app: web.Application,
    static_dir: Path | None = None,
    *,
    auth_cookie: str = DEFAULT_AUTH_COOKIE,
) -> None:
    """Register the page and its assets on ``app`` (``static_dir`` for tests);
    ``auth_cookie`` is the cookie the edge reads its token from."""
    files = _Files(static_dir if static_dir is not None else STATIC_DIR)
    rendered: dict[str, _File] = {}  # etag of the file on disk -> the page as served

    async def page(request: web.Request) -> web.Response:
        source = files.get(PAGE_FILE)
        out = rendered.get(source.etag)
        if out is None:
            out = _render_page(source, auth_cookie)
            rendered.clear()
            rendered[source.etag] = out
        return _respond(request, out, "text/html; charset=utf-8", _PAGE_HEADERS)

    async def page_slash(request: web.Request) -> web.Response:
        location = PAGE_PATH + (f"?{request.query_string}" if request.query_string else "")
        raise web.HTTPPermanentRedirect(location)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        content_type = ASSETS.get(name)
        if content_type is None:
            raise ApiError(404, "not_found", "no such asset")
        return _respond(request, files.get(name), content_type)

    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(PAGE_PATH + "/", page_slash)
    app.router.add_get(PAGE_PATH + "/assets/{name}", asset)
