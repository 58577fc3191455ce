"""``GET /openapi.yaml``: the edge's HTTP API as an OpenAPI 3.1 document.

The document is ``edge/openapi.yaml``, shipped as package data and read once when the route
is added. It is served as it is (no YAML library at run time), with a strong ``ETag`` so a
client revalidates cheaply. ``tests/unit/test_openapi.py`` keeps it honest: valid OpenAPI,
every route of the app documented, every error code the code can emit listed; and
``tests/fuzz/`` runs schemathesis against a real edge with it.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["CONTENT_TYPE", "OPENAPI_FILE", "OPENAPI_PATH", "add_openapi_route", "load_document"]

OPENAPI_PATH = "/openapi.yaml"
OPENAPI_FILE = "openapi.yaml"
#: RFC 9512 registers ``application/yaml``.
CONTENT_TYPE = "application/yaml; charset=utf-8"


def load_document() -> bytes:
    """The document's bytes, from the installed ``edge`` package."""
    return resources.files(__package__ or "edge").joinpath(OPENAPI_FILE).read_bytes()


def add_openapi_route(app: web.Application) -> None:
    """Serve the document at ``GET /openapi.yaml`` (read now, once)."""
    body = load_document()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    async def openapi(request: web.Request) -> web.Response:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": CONTENT_TYPE})

    app.router.add_get(OPENAPI_PATH, openapi)
