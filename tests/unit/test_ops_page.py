"""edge/ops_page.py: the Command Center page names the auth cookie the edge reads
(CRM_EVENTS_AUTH_COOKIE), so that its sign-in link stores the token under that name; the
JavaScript client it imports is served, and is the client's own source (devtools/vendor_js.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from devtools import vendor_js
from edge.app import create_app
from edge.bus_memory import MemoryBus
from edge.ops_page import ASSETS, PAGE_FILE, STATIC_DIR, add_ops_page_routes
from shared.security_settings import DEFAULT_AUTH_COOKIE, AuthSettings
from shared.settings import EdgeSettings, RedisSettings

META = re.compile(r'<meta name="crm-events-auth-cookie" content="([^"]*)">')


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def page_of(app: web.Application, session: aiohttp.ClientSession) -> tuple[int, str]:
    server = TestServer(app)
    await server.start_server()
    try:
        async with session.get(server.make_url("/ops/crm-events")) as resp:
            return resp.status, await resp.text()
    finally:
        await server.close()


@pytest.mark.parametrize("cookie", [DEFAULT_AUTH_COOKIE, "acme.crm-token_2"])
async def test_page_names_the_configured_auth_cookie(
    cookie: str, session: aiohttp.ClientSession
) -> None:
    settings = EdgeSettings(
        redis=RedisSettings(),
        node_id="edge-page",
        auth=AuthSettings(mode="jwt", secret="s" * 40, cookie=cookie),
    )
    app = create_app(settings, registry=CollectorRegistry(), bus=MemoryBus())
    status, body = await page_of(app, session)
    assert status == 200
    assert META.findall(body) == [cookie]


async def test_a_page_without_the_tag_is_an_error_not_a_silent_default(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    source = (STATIC_DIR / PAGE_FILE).read_text()
    assert META.search(source)
    (tmp_path / PAGE_FILE).write_text(META.sub("", source))
    app = web.Application()
    add_ops_page_routes(app, tmp_path, auth_cookie="other")
    status, _ = await page_of(app, session)
    assert status == 500


# --- the JavaScript client the page imports -----------------------------------------------------


def test_the_page_imports_the_client_it_is_served() -> None:
    """The page's script is a module importing ./crm-events-client.js, which the edge serves
    (ASSETS), so the CSP's script-src 'self' covers both."""
    html = (STATIC_DIR / PAGE_FILE).read_text()
    assert '<script type="module" src="crm-events/assets/crm-events.js">' in html
    script = (STATIC_DIR / "crm-events.js").read_text()
    assert 'from "./crm-events-client.js";' in script
    assert ASSETS["crm-events-client.js"].startswith("text/javascript")


def test_the_served_client_is_the_clients_source() -> None:
    """edge/static/crm-events-client.js is a copy of clients/js/crm-events-client.js (the wheel
    carries edge/static/ only): `python -m devtools.vendor_js write` after editing the source."""
    assert vendor_js.COPY.read_bytes() == vendor_js.SOURCE.read_bytes(), (
        "edge/static/crm-events-client.js differs from clients/js/crm-events-client.js: "
        "run python -m devtools.vendor_js write"
    )
    assert vendor_js.main(["check"]) == 0


def test_vendor_js_check_fails_on_a_stale_copy_and_write_mends_it(tmp_path: Path) -> None:
    source, copy = tmp_path / "client.js", tmp_path / "static" / "client.js"
    source.write_text("export const v = 2;\n")
    assert not vendor_js.is_current(source, copy)  # missing
    assert vendor_js.write(source, copy)
    assert vendor_js.is_current(source, copy)
    assert not vendor_js.write(source, copy)  # up to date: nothing written
    copy.write_text("export const v = 1;\n")
    assert not vendor_js.is_current(source, copy)
    assert vendor_js.write(source, copy) and copy.read_text() == source.read_text()
