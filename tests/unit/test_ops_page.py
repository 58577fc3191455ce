"""edge/ops_page.py: the Command Center page names the auth cookie the edge reads
(CRM_EVENTS_AUTH_COOKIE), so that its sign-in link stores the token under that name."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.bus_memory import MemoryBus
from edge.ops_page import PAGE_FILE, STATIC_DIR, add_ops_page_routes
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
