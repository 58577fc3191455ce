"""The page with authentication on (issue 7): refused without a token, live once the token
cookie is there, with the backfill it was refused before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PAGE, KafkaFeed, TlsCluster, wait_rows
from tests.harness.backends import Backends
from tests.harness.cluster import crm_event

auth = pytest.importorskip("edge.auth", reason="the edge has no authentication yet")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SECRET = "browser-test-secret-" + "x" * 32
COOKIE = "crm_events_token"


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
        env={"CRM_EVENTS_AUTH_MODE": "jwt", "CRM_EVENTS_JWT_SECRET_FILE": str(secret)},
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
