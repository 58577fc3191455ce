"""The Command Center in real browsers, through nginx with TLS and HTTP/2.

Each test runs in Debian's Chromium and in Debian's Firefox ESR (the ``page`` and
``browser_name`` fixtures); the screenshot is Chromium's. Every wait has a deadline
(Playwright's ``expect``/``wait_for_function``, or ``eventually_sync``); nothing sleeps for a
fixed time.
"""

from __future__ import annotations

import random
import re
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, Route, expect

from devtools.producer import EventFactory, encode
from shared.contract import META_EPOCH, RedisKeys, parse_epoch
from shared.cursor import Cursor, decode_cursor
from tests.browser.conftest import (
    DOCS,
    PAGE,
    KafkaFeed,
    TlsCluster,
    access_log_lines,
    covers,
    eventsource_urls,
    positions,
    rows,
    serving_edge,
    stored_events,
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


def last_event_id(url: str) -> str:
    """The ``last_event_id`` a stream request carried."""
    [value] = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["last_event_id"]
    return value


def history_requests(page: Page) -> Callable[[], list[dict[str, str]]]:
    """Start recording the query of every history request the page makes."""
    queries: list[dict[str, str]] = []

    def on_request(request: Any) -> None:
        url = urllib.parse.urlsplit(request.url)
        if url.path == "/crm-events/history":
            queries.append(dict(urllib.parse.parse_qsl(url.query)))

    page.on("request", on_request)
    return lambda: list(queries)


def current_epoch(cluster: TlsCluster) -> int:
    client = redis.Redis.from_url(cluster.backends.redis_url)
    try:
        raw = client.hget(RedisKeys(cluster.prefix).meta, META_EPOCH)
        assert isinstance(raw, bytes), f"no epoch in the deployment's meta: {raw!r}"
        return parse_epoch(raw)
    finally:
        client.close()


def foreign_cursor(cluster: TlsCluster) -> str:
    """A cursor of another incarnation of the topic: the deployment's epoch plus one."""
    epoch = (current_epoch(cluster) + 1) % 2**32
    return Cursor(epoch, (1, 1, 1)).encode().decode("ascii")


def saved_cursor(page: Page) -> str | None:
    found: str | None = page.evaluate("() => sessionStorage.getItem('crm-events:cursor')")
    return found


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

    # Backfill, then the stream continues right after the backfill: from a cursor (the
    # history page's next_after) that covers every backfilled event.
    wait_rows(page, prefix + "h", 5, 5, "the backfilled events")
    backfilled = positions(rows(page, prefix + "h"))
    [url] = streams()
    assert covers(last_event_id(url), backfilled), (url, backfilled)
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
    assert len(set(positions(shown))) == 15
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
    where = positions(shown)
    assert len(where) == len(set(where)) == 60, "an event shown twice"
    assert {r["key"] for r in shown} == {f"{prefix}{i}" for i in range(60)}
    assert sorted(where) == stored_events(cluster, prefix), "not the events produced"
    # Newest first, in Kafka's order within each partition (none across partitions).
    for partition in {p for p, _ in where}:
        offsets = [o for p, o in where if p == partition]
        assert offsets == sorted(offsets, reverse=True), (partition, offsets)
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

# Each stream records where its events are (partition:offset, the same on every edge) and
# whether each came with a cursor (edges merge partitions in their own order, so two edges'
# cursors for one event may differ).
OPEN_STREAMS_JS = """([url, n]) => {
  window.__streams = Array.from({ length: n }, () => {
    const s = { ids: [], es: new EventSource(url) };
    s.es.onmessage = (e) => {
      const d = JSON.parse(e.data);
      s.ids.push(e.lastEventId ? `${d.partition}:${d.offset}` : "no cursor");
    };
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
    # The same five events on every stream; their order across partitions may differ
    # between edges (Kafka orders only within a partition), so compare them as sets.
    assert all(s["count"] == 5 and sorted(s["ids"]) == sorted(states[0]["ids"]) for s in states)
    assert len(set(states[0]["ids"])) == 5
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


# -- beyond the five: reset notices, pause and reload -----------------------------------------


def test_old_format_id_gets_a_reset_then_the_page_continues(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    """A bookmark from before the upgrade (an id of the old single-stream format): the
    history's ``after`` answers with a reset (old_format), shown, and the page goes on."""
    prefix = f"reset-{tag()}-"
    history = history_requests(page)
    response = page.goto(cluster.https_url(PAGE + "?last_event_id=99999999999999-0"))
    assert response is not None and response.ok
    notice = page.locator("#reset-notice")
    expect(notice).to_be_visible(timeout=10_000)
    expect(notice).to_have_attribute("data-reason", "old_format")
    expect(page.locator("#status")).to_have_attribute("data-state", "reset", timeout=10_000)
    expect(page.locator("#status-text")).to_have_text("Reset received · live")
    assert "last_event_id" not in page.url  # used once, then sessionStorage takes over
    assert any(q.get("after") == "99999999999999-0" for q in history()), history()

    # The stream continues after the reset (from the oldest retained events, then live).
    feed.send(records(prefix, 2))
    wait_rows(page, prefix, 2, 10, "events after the reset")

    page.locator("#reset-dismiss").focus()
    page.keyboard.press("Enter")
    expect(notice).to_be_hidden()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")


def test_reset_on_the_stream_names_its_partitions(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    """The stream's own ``event: reset``: the backfill's ``next_after`` is replaced (in the
    browser, by the test) with a cursor of another incarnation of the topic, so the edge
    resets every partition (topic_changed); the notice names them and the page continues
    from the reset's cursor (the client pages the history after it, then streams)."""
    prefix = f"sreset-{tag()}-"
    foreign = foreign_cursor(cluster)
    streams = eventsource_urls(page)
    history = history_requests(page)

    def swap_next_after(route: Route) -> None:
        if "after=" in route.request.url:
            # The backfill after the reset: the edge's own answer, as the client asked.
            route.continue_()
            return
        answer = route.fetch()
        body = answer.json()
        body["next_after"] = foreign
        route.fulfill(response=answer, json=body)

    page.route(re.compile(r"/crm-events/history\?"), swap_next_after)
    response = page.goto(cluster.https_url(PAGE))
    assert response is not None and response.ok
    notice = page.locator("#reset-notice")
    expect(notice).to_be_visible(timeout=10_000)
    assert last_event_id(streams()[0]) == foreign
    expect(notice).to_have_attribute("data-reason", "topic_changed")
    expect(notice).to_have_attribute("data-partitions", "0,1,2")
    for partition in range(3):
        expect(notice).to_contain_text(f"Partition {partition}")
    expect(page.locator("#status")).to_have_attribute("data-state", "reset", timeout=10_000)

    # The position is now the reset's cursor, of this incarnation: nothing is reset twice.
    # The client paged the history after it, then streamed from where that ended.
    after = eventually_sync(
        lambda: [q["after"] for q in history() if "after" in q], 10, "the backfill after the reset"
    )
    assert decode_cursor(after[0]).epoch == current_epoch(cluster), after
    page.unroute(re.compile(r"/crm-events/history\?"))
    feed.send(records(prefix, 2))
    wait_rows(page, prefix, 2, 10, "events after the reset")
    saved = eventually_sync(lambda: saved_cursor(page) or "", 5, "the cursor saved")
    assert decode_cursor(saved).epoch == current_epoch(cluster)
    expect(page.locator("#duplicates")).to_have_text("0")


def _pause_after(page: Page, cluster: TlsCluster, feed: KafkaFeed, prefix: str) -> str:
    """Open the page, show three events, wait until the cursor covering them is saved, pause
    (the stream closes). Returns the saved cursor."""
    open_page(page, cluster)
    feed.send(records(prefix, 3))
    wait_rows(page, prefix, 3, 5, "the first events")
    seen = positions(rows(page, prefix))

    def covering() -> str:
        cursor = saved_cursor(page)
        return cursor if cursor and covers(cursor, seen) else ""

    saved = eventually_sync(covering, 5, "a cursor covering the events shown, saved")
    # "P" pauses: the stream is closed, so what is produced now is not delivered ...
    page.keyboard.press("p")
    expect(page.locator("#status")).to_have_attribute("data-state", "paused")
    expect(page.locator("#pause")).to_have_attribute("aria-pressed", "true")
    return saved


def test_pause_then_reload_catches_up_from_the_saved_cursor_without_gap_or_duplicate(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"reload-{tag()}-"
    history = history_requests(page)
    saved = _pause_after(page, cluster, feed, prefix)
    feed.send(records(prefix, 150, start=3))  # more than one history page (100)

    # ... and a reload backfills from the saved cursor (history after=), then streams the
    # rest: all 150, once each.
    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)
    assert any(q.get("after") == saved for q in history()), history()
    wait_rows(page, prefix, 150, 10, "the 150 events produced while paused")
    shown = rows(page, prefix)
    assert len(shown) == 150
    assert {r["key"] for r in shown} == {f"{prefix}{i}" for i in range(3, 153)}
    assert len(set(positions(shown))) == 150
    expect(page.locator("#duplicates")).to_have_text("0")


def test_reload_after_a_short_pause_shows_the_newest_page_and_what_came_since(
    page: Page, browser_name: str, cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"short-{tag()}-"
    history = history_requests(page)
    streams = eventsource_urls(page)
    saved = _pause_after(page, cluster, feed, prefix)
    feed.send(records(prefix, 2, start=3))
    eventually_sync(lambda: len(stored_events(cluster, prefix)) == 5, 5, "five events stored")

    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)
    # The three from before come with the newest page, the two since with after=<saved>;
    # the page overlaps them by partition and offset, so each shows once.
    wait_rows(page, prefix, 5, 10, "the events from before and since the pause")
    shown = rows(page, prefix)
    assert sorted(positions(shown)) == stored_events(cluster, prefix)
    assert any(q.get("after") == saved for q in history()), history()
    assert covers(last_event_id(streams()[-1]), positions(shown))
    feed.send(records(prefix, 1, start=5))
    wait_rows(page, prefix, 6, 5, "a live event after the reload")
    expect(page.locator("#duplicates")).to_have_text("0")
