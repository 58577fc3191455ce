"""The Command Center in real browsers, through nginx with TLS and HTTP/2.

Each test runs in Debian's Chromium and in Debian's Firefox ESR (the ``page`` and
``browser_name`` fixtures); the screenshot is Chromium's. Every wait has a deadline
(Playwright's ``expect``/``wait_for_function``, or ``eventually_sync``); nothing sleeps for a
fixed time.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
import uuid
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, expect

from devtools.producer import EventFactory, encode
from tests.browser.conftest import (
    DOCS,
    PAGE,
    KafkaFeed,
    TlsCluster,
    access_log_lines,
    eventsource_urls,
    rows,
    serving_edge,
    wait_rows,
)
from tests.harness.cluster import crm_event
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LATENCY_BUDGET_MS = 2000.0


def tag() -> str:
    return uuid.uuid4().hex[:8]


def records(prefix: str, n: int, type_: str = "ContactCreated", start: int = 0) -> list[Any]:
    return [
        (f"{prefix}{i}".encode(), crm_event(start + i, type_, key=f"{prefix}{i}"))
        for i in range(start, start + n)
    ]


def open_page(page: Page, cluster: TlsCluster, query: str = "") -> None:
    response = page.goto(cluster.https_url(PAGE + query))
    assert response is not None and response.ok, response
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)


def stream_ids(cluster: TlsCluster, prefix: str) -> list[str]:
    """Ids in the Redis stream of the events whose key starts with ``prefix``."""
    client = redis.Redis.from_url(cluster.backends.redis_url)
    try:
        out = []
        for entry_id, fields in client.xrange(cluster.stream_key):
            envelope = json.loads(fields[b"d"])
            if str(envelope.get("key", "")).startswith(prefix):
                out.append(entry_id.decode())
        return out
    finally:
        client.close()


# -- 5: the screenshot first, while the stream holds only realistic events ------------------


def test_screenshot_of_the_page_with_live_data(
    chromium_page: Page, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    """Realistic CRM traffic (the sample producer's event factory) at a varying rate; the
    page is saved to docs/command-center.png."""
    page = chromium_page
    factory = EventFactory(random.Random(20261129))
    feed.send(encode(factory()) for _ in range(60))  # what the backfill shows
    open_page(page, cluster)
    wait_rows(page, "", 60, 10, "the backfill")
    backfilled = int(page.locator("#total").inner_text().replace(",", ""))

    rates = [4, 7, 12, 9, 6, 11, 17, 12, 8, 13, 16, 10]
    for n in rates:
        second = int(time.time())
        feed.send(encode(factory()) for _ in range(n))
        # Pace by the page's clock: one burst per second, so the sparkline has a shape.
        page.wait_for_function("(s) => Date.now() / 1000 >= s + 1", arg=second, timeout=3000)
    total = backfilled + sum(rates)
    expect(page.locator("#total")).to_have_text(f"{total:,}", timeout=10_000)
    page.wait_for_function(
        "() => Number(document.getElementById('peak').textContent) >= 10", timeout=5000
    )
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(page.locator("#protocol")).to_have_text("HTTP/2 · TLS")
    # Blur anything focused and let the row highlight fade, for a calm picture.
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.wait_for_function(
        "() => document.getAnimations().every((a) => a.playState !== 'running' "
        "|| a.effect?.getTiming().iterations === Infinity)",
        timeout=5000,
    )
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "command-center.png"))
    assert (DOCS / "command-center.png").stat().st_size > 20_000


# -- 1: through the load balancer over h2, events within 2 s ---------------------------------


def test_page_loads_over_h2_backfills_and_shows_events_within_2s(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"lat-{tag()}-"
    before = feed.send(records(prefix + "h", 5))  # in the history before the page opens
    streams = eventsource_urls(page)
    open_page(page, cluster)

    protocol = page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == "h2"
    for asset in page.evaluate(
        "() => performance.getEntriesByType('resource')"
        ".filter((e) => e.name.includes('/assets/')).map((e) => e.nextHopProtocol)"
    ):
        assert asset == "h2"

    # Backfill, then the stream continues right after the newest history id.
    wait_rows(page, prefix + "h", 5, 5, "the backfilled events")
    backfilled = rows(page, prefix + "h")
    newest = max(backfilled, key=lambda r: tuple(int(p) for p in r["id"].split("-")))
    [url] = streams()
    assert f"last_event_id={newest['id']}" in url, url
    assert len(before) == 5

    latencies, kafka_to_dom = [], []
    for i in range(10):
        key = f"{prefix}{i}"
        [(metadata, acked_ms)] = feed.send([(key.encode(), crm_event(i, key=key))])
        page.wait_for_selector(
            f'#events-body tr[data-key="{key}"]', state="attached", timeout=LATENCY_BUDGET_MS
        )
        shown_ms = page.evaluate("(k) => window.__shownAt[k]", key)
        latencies.append(shown_ms - acked_ms)
        kafka_to_dom.append(shown_ms - metadata.timestamp)
    print(
        f"\n[{browser_name}] produce-ack -> DOM ms: median {statistics.median(latencies):.1f}, "
        f"max {max(latencies):.1f}; Kafka record timestamp -> DOM ms: median "
        f"{statistics.median(kafka_to_dom):.1f}, max {max(kafka_to_dom):.1f}"
    )
    assert max(latencies) < LATENCY_BUDGET_MS
    shown = rows(page, prefix)
    assert len(shown) == 15
    assert len({r["id"] for r in shown}) == 15
    expect(page.locator("#duplicates")).to_have_text("0")


# -- 2: kill -9 the edge serving the stream ----------------------------------------------------


def test_kill_serving_edge_reconnects_with_every_event_once(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"kill-{tag()}-"
    open_page(page, cluster)
    edge = serving_edge(cluster)

    feed.send(records(prefix, 20, start=0))
    wait_rows(page, prefix, 20, 5, "events before the kill")

    cluster.kill9(edge)
    try:
        feed.send(records(prefix, 20, start=20))  # while the page is reconnecting
        expect(page.locator("#status")).to_have_attribute(
            "data-state", "reconnecting", timeout=5000
        )
        expect(page.locator("#status-text")).to_have_text(
            re.compile(r"Reconnecting \(attempt \d+\)")
        )
        expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=20_000)
        feed.send(records(prefix, 20, start=40))
        wait_rows(page, prefix, 60, 10, "all 60 events")
    finally:
        cluster.start(edge)

    shown = rows(page, prefix)
    ids = [r["id"] for r in shown]
    assert len(ids) == len(set(ids)) == 60, "an event shown twice"
    assert {r["key"] for r in shown} == {f"{prefix}{i}" for i in range(60)}
    assert set(ids) == set(stream_ids(cluster, prefix)), "ids differ from those produced"
    # Newest first, in stream order.
    ordered = [tuple(int(p) for p in i.split("-")) for i in ids]
    assert ordered == sorted(ordered, reverse=True)
    expect(page.locator("#reconnects")).to_have_text("1")
    log = page.locator("#conn-log li").all_inner_texts()
    assert any("reconnecting" in entry.lower() for entry in log), log
    assert any("live again" in entry.lower() for entry in log), log


# -- 3: the type filter, server-side ------------------------------------------------------------


def test_type_filter_shows_only_that_type(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"filt-{tag()}-"
    streams = eventsource_urls(page)
    open_page(page, cluster)

    # Keyboard only: "/" focuses the filter, Enter applies it.
    page.keyboard.press("/")
    expect(page.locator("#types-input")).to_be_focused()
    page.keyboard.type("DealWon")
    page.keyboard.press("Enter")
    expect(page.locator("#filter-state")).to_have_text("Showing DealWon")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=10_000)
    assert "types=DealWon" in streams()[-1]
    assert "last_event_id=" in streams()[-1]
    assert "types=DealWon" in page.url

    mixed = []
    for i in range(12):
        type_ = ("ContactCreated", "DealWon", "TicketOpened")[i % 3]
        mixed.append((f"{prefix}{i}".encode(), crm_event(i, type_, key=f"{prefix}{i}")))
    mixed.append((f"{prefix}last".encode(), crm_event(99, "DealWon", key=f"{prefix}last")))
    feed.send(mixed)
    # The stream is ordered: once the last event is shown, every earlier one was decided.
    page.wait_for_selector(f'#events-body tr[data-key="{prefix}last"]', timeout=5000)

    shown = rows(page, prefix)
    assert sorted(r["key"] for r in shown) == sorted(
        [f"{prefix}{i}" for i in range(1, 12, 3)] + [f"{prefix}last"]
    )
    every_row = page.eval_on_selector_all(
        "#events-body tr", "(rs) => rs.map((r) => r.dataset.type)"
    )
    assert every_row and set(every_row) == {"DealWon"}
    counted = page.eval_on_selector_all(
        "#type-counts li",
        "(ls) => ls.filter((l) => l.dataset.count !== '0').map((l) => l.dataset.type)",
    )
    assert counted == ["DealWon"]

    # Back to all types with the button.
    page.get_by_role("button", name="All types").click()
    expect(page.locator("#filter-state")).to_have_text("Showing all types")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=10_000)
    wait_rows(page, prefix, 13, 5, "the unfiltered history")
    assert "types=" not in streams()[-1]


# -- 4: ten EventSource streams on one HTTP/2 connection ------------------------------------

OPEN_STREAMS_JS = """([url, n]) => {
  window.__streams = Array.from({ length: n }, () => {
    const s = { ids: [], es: new EventSource(url) };
    s.es.onmessage = (e) => s.ids.push(e.lastEventId);
    return s;
  });
}"""
STREAMS_STATE_JS = """() => window.__streams.map((s) => ({
  state: s.es.readyState, count: s.ids.length, ids: s.ids }))"""


def _open_streams(page: Page, url: str, n: int) -> None:
    page.evaluate(OPEN_STREAMS_JS, [url, n])


def _states(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate(STREAMS_STATE_JS)
    return result


def test_ten_eventsource_streams_over_http2_all_receive_events(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    probe = f"H2Probe{tag()}"
    # Chromium tells each response's protocol through CDP; for both browsers nginx's access
    # log tells it too, once a stream ends.
    protocols: list[str] = []
    if browser_name == "chromium":
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.on(
            "Network.responseReceived",
            lambda p: (
                protocols.append(p["response"].get("protocol", "?"))
                if p.get("type") == "EventSource"
                else None
            ),
        )
    page.goto(cluster.https_url("/nginx-health"))
    _open_streams(page, f"/crm-events?types={probe}", 10)
    page.wait_for_function(
        "() => window.__streams.every((s) => s.es.readyState === EventSource.OPEN)",
        timeout=10_000,
    )
    eventually_sync(lambda: sum(cluster.stream_clients().values()) >= 10, 10, "10 streams")
    feed.send(records(f"{probe}-", 5, type_=probe))
    page.wait_for_function("() => window.__streams.every((s) => s.ids.length >= 5)", timeout=5000)
    states = _states(page)
    assert len(states) == 10
    assert all(s["count"] == 5 and s["ids"] == states[0]["ids"] for s in states)
    if browser_name == "chromium":
        eventually_sync(lambda: len(protocols) >= 10, 5, "10 EventSource responses")
        assert protocols == ["h2"] * 10
    page.evaluate("() => window.__streams.forEach((s) => s.es.close())")
    # nginx logs each stream when it ends: ten HTTP/2 requests on the TLS port.
    lines = eventually_sync(
        lambda: (
            (found := access_log_lines(cluster, f"types={probe} ")) and len(found) >= 10 and found
        ),
        10,
        "the ten streams in nginx's access log",
    )
    assert all('HTTP/2.0" 200' in line for line in lines), lines

    # The same over HTTP/1.1 (the plain port): only six streams open, the rest wait for a
    # connection, so only six receive anything.
    page.goto(cluster.lb_url("/nginx-health"))
    _open_streams(page, f"/crm-events?types={probe}", 10)
    page.wait_for_function(
        "() => window.__streams.filter((s) => s.es.readyState === EventSource.OPEN).length === 6",
        timeout=10_000,
    )
    feed.send(records(f"{probe}-", 3, type_=probe, start=5))
    page.wait_for_function(
        "() => window.__streams.filter((s) => s.ids.length === 3).length === 6", timeout=5000
    )
    states = _states(page)
    assert sorted(s["count"] for s in states) == [0] * 4 + [3] * 6
    assert [s["state"] for s in states if s["count"] == 0] == [0] * 4  # still CONNECTING
    if browser_name == "chromium":
        assert protocols[10:16] == ["http/1.1"] * 6
    page.evaluate("() => window.__streams.forEach((s) => s.es.close())")


# -- beyond the five: reset notice, pause and reload -----------------------------------------


def test_reset_notice_is_shown_and_dismissed_by_keyboard(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"reset-{tag()}-"
    feed.send(records(prefix + "pre", 1))  # the stream exists, so the reason is known
    eventually_sync(lambda: stream_ids(cluster, prefix + "pre"), 5, "the first event stored")
    # A position ahead of everything in the stream: the edge answers with event: reset.
    response = page.goto(cluster.https_url(PAGE + "?last_event_id=99999999999999-0"))
    assert response is not None and response.ok
    notice = page.locator("#reset-notice")
    expect(notice).to_be_visible(timeout=10_000)
    expect(notice).to_have_attribute("data-reason", "unknown_position")
    expect(notice).to_contain_text("99999999999999-0")
    expect(page.locator("#status")).to_have_attribute("data-state", "reset")
    expect(page.locator("#status-text")).to_have_text("Reset received · live")
    assert "last_event_id" not in page.url  # used once, then sessionStorage takes over

    # The stream continues after the reset's boundary.
    feed.send(records(prefix, 2))
    wait_rows(page, prefix, 2, 5, "events after the reset")

    page.locator("#reset-dismiss").focus()
    page.keyboard.press("Enter")
    expect(notice).to_be_hidden()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")


def test_pause_then_reload_resumes_from_the_saved_id_without_gap_or_duplicate(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"reload-{tag()}-"
    streams = eventsource_urls(page)
    open_page(page, cluster)
    feed.send(records(prefix, 3))
    wait_rows(page, prefix, 3, 5, "the first events")
    last_seen = max(
        (r["id"] for r in rows(page, prefix)), key=lambda i: tuple(int(p) for p in i.split("-"))
    )
    eventually_sync(
        lambda: page.evaluate("() => sessionStorage.getItem('crm-events:last-id')") == last_seen,
        5,
        "the last id saved",
    )

    # "P" pauses: the stream is closed, so these are not delivered now ...
    page.keyboard.press("p")
    expect(page.locator("#status")).to_have_attribute("data-state", "paused")
    expect(page.locator("#pause")).to_have_attribute("aria-pressed", "true")
    feed.send(records(prefix, 150, start=3))  # more than the backfill's 100

    # ... and a reload resumes after the saved id: the stream replays all of them, once.
    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)
    assert f"last_event_id={last_seen}" in streams()[-1]
    wait_rows(page, prefix, 150, 10, "the 150 events produced while paused")
    shown = rows(page, prefix)
    assert len(shown) == 150
    assert {r["key"] for r in shown} == {f"{prefix}{i}" for i in range(3, 153)}
    assert len({r["id"] for r in shown}) == 150
