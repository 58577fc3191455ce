"""The page with authentication on: refused without a token, live once the token cookie is
there, with the backfill it was refused before; signing in with a ``#token=`` link stores the
token in the cookie the edge is configured to read, for as long as the token lives.

The edges here read a non-default cookie name (``CRM_EVENTS_AUTH_COOKIE``): a page that
ignored the setting would sign in under a name the edge never reads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from playwright.sync_api import Page, expect

from edge import auth
from shared.security_settings import DEFAULT_AUTH_COOKIE
from tests.browser.conftest import PAGE, KafkaFeed, TlsCluster, wait_rows
from tests.harness.backends import Backends
from tests.harness.cluster import crm_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SECRET = "browser-test-secret-" + "x" * 32
COOKIE = "acme_crm.session-token"
assert COOKIE != DEFAULT_AUTH_COOKIE


@pytest.fixture(scope="module")
def auth_cluster(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsCluster]:
    run_dir = Path(tmp_path_factory.mktemp("browser-auth"))
    secret = run_dir / "jwt.secret"
    secret.write_text(SECRET)
    c = TlsCluster(
        run_dir,
        backends,
        edges=1,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(secret),
            "CRM_EVENTS_AUTH_COOKIE": COOKIE,
        },
    )
    with c.running():
        yield c


@pytest.fixture(scope="module")
def auth_feed(auth_cluster: TlsCluster) -> Iterator[KafkaFeed]:
    f = KafkaFeed(auth_cluster.backends.kafka_bootstrap, auth_cluster.topic)
    yield f
    f.close()


def test_page_asks_for_a_token_then_goes_live_with_the_cookie(
    chromium_page: Page, auth_cluster: TlsCluster, auth_feed: KafkaFeed
) -> None:
    page = chromium_page
    auth_feed.send([(b"auth-0", crm_event(0, "DealWon", key="auth-0"))])
    page.goto(auth_cluster.https_url(PAGE))
    notice = page.locator("#auth-notice")
    expect(notice).to_be_visible(timeout=10_000)
    expect(notice).to_contain_text("Not signed in (401)")
    expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")

    # A token for DealWon only, in the cookie the edge reads (EventSource sends cookies).
    token = auth.issue_token(SECRET, types=["DealWon"])
    page.context.add_cookies(
        [{"name": COOKIE, "value": token, "url": auth_cluster.https_url("/"), "secure": True}]
    )
    # The page retries by itself (backoff), then loads the history it was refused.
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=30_000)
    expect(notice).to_be_hidden()
    wait_rows(page, "auth-0", 1, 10, "the backfill after signing in")

    auth_feed.send(
        [
            (b"auth-1", crm_event(1, "ContactCreated", key="auth-1")),
            (b"auth-2", crm_event(2, "DealWon", key="auth-2")),
        ]
    )
    wait_rows(page, "auth-2", 1, 5, "a granted event")
    types = page.eval_on_selector_all("#events-body tr", "(rs) => rs.map((r) => r.dataset.type)")
    assert set(types) == {"DealWon"}  # the claim filters the stream; the page shows it as is


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_sign_in_link_sets_the_configured_cookie_for_the_tokens_lifetime(
    page: Page, scheme: str, auth_cluster: TlsCluster, auth_feed: KafkaFeed
) -> None:
    token = auth.issue_token(SECRET, types=["*"], ttl_s=900)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    base = auth_cluster.https_url("") if scheme == "https" else auth_cluster.lb_url("")
    page.goto(f"{base}{PAGE}#token={token}")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)
    assert "#token" not in page.url  # the token leaves the address bar
    expect(page.locator("#auth-cookie-name")).to_have_text(COOKIE)

    cookies = page.context.cookies(base + "/")
    assert [c["name"] for c in cookies] == [COOKIE], cookies  # never the default name
    [cookie] = cookies
    assert cookie["value"] == token
    assert cookie["path"] == "/"
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is (scheme == "https")
    # Max-Age up to the token's expiry: a persistent cookie that ends with the token.
    assert time.time() < cookie["expires"] <= exp + 1, (cookie["expires"], exp)
    assert cookie["expires"] >= exp - 30, (cookie["expires"], exp)

    # The stream authenticates with that cookie: a new event arrives live.
    key = f"signin-{scheme}-{uuid.uuid4().hex[:8]}"
    auth_feed.send([(key.encode(), crm_event(10, "TicketOpened", key=key))])
    wait_rows(page, key, 1, 10, "an event streamed with the cookie")
