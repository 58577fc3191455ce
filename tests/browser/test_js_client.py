"""The JavaScript client (clients/js) against a deployment with authentication on, as `make up`
runs it: the module in Chromium and in Firefox (stream, resume across a reload exactly once,
a reset backfilled from history then streamed, a 401 and an expired token renewed through
getToken), in Node with the `eventsource` package (the token in a header), its TypeScript
declarations with tsc, and the examples (the page behind serve.mjs, and tail.mjs, the module
with the `eventsource` package on the command line) as clients/js/README.md runs them.

The browsers import the module the way the Command Center does, from the edge
(``/ops/crm-events/assets/crm-events-client.js``, a copy that tests/unit/test_ops_page.py
keeps equal to clients/js/crm-events-client.js), into a page of the deployment's origin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from edge.auth import issue_token
from shared.cursor import decode_cursor
from tests.browser.conftest import ROOT, KafkaFeed, TlsCluster, eventsource_urls
from tests.harness.backends import Backends
from tests.harness.cluster import crm_event, free_port
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLIENT_DIR = ROOT / "clients" / "js"
EXAMPLES = CLIENT_DIR / "examples"
NODE = shutil.which("node")
TSC = CLIENT_DIR / "node_modules" / ".bin" / "tsc"
SECRET = "js-client-test-secret-" + "x" * 32
MODULE_URL = "/ops/crm-events/assets/crm-events-client.js"
OLD_FORMAT_ID = "99999999999999-0"


def _node() -> str:
    # scripts/install.sh installs Node and the client's npm dependencies: a missing one is a
    # broken installation, not a reason to skip.
    if NODE is None:
        pytest.fail("node is not installed: run scripts/install.sh (make install)")
    if not (CLIENT_DIR / "node_modules" / "eventsource").is_dir():
        pytest.fail("clients/js/node_modules is missing: run scripts/install.sh (npm ci)")
    return NODE


@pytest.fixture(scope="module")
def auth_cluster(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsCluster]:
    """Authentication on, with an HS256 secret from a file, as the local stack's edges; no
    leeway past a token's exp (a stream lives until exp plus the leeway), so that the tests'
    3-second tokens expire in 3 seconds."""
    run_dir = Path(tmp_path_factory.mktemp("js-client-auth"))
    secret = run_dir / "jwt-secret"
    secret.write_text(SECRET + "\n")
    c = TlsCluster(
        run_dir,
        backends,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(secret),
            "CRM_EVENTS_JWT_LEEWAY_S": "0",
        },
    )
    with c.running():
        yield c


@pytest.fixture(scope="module")
def feed(auth_cluster: TlsCluster) -> Iterator[KafkaFeed]:
    f = KafkaFeed(auth_cluster.backends.kafka_bootstrap, auth_cluster.topic)
    yield f
    f.close()


def token(ttl_s: float = 3600) -> str:
    """What `make token` prints (every type), signed with the deployment's secret."""
    return issue_token(SECRET, types=["*"], ttl_s=ttl_s, subject="local-developer")


def records(prefix: str, n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}{i}".encode(), crm_event(i, "DealWon", key=f"{prefix}{i}"))
        for i in range(start, start + n)
    ]


def node_env(jwt: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRM_EVENTS_TOKEN"}
    if jwt is not None:
        env["CRM_EVENTS_TOKEN"] = jwt
    return {**env, **extra}


def history(cluster: TlsCluster, prefix: str) -> list[dict[str, Any]]:
    """Stored items (oldest first) whose key starts with ``prefix``."""
    request = urllib.request.Request(
        cluster.lb_url("/crm-events/history?n=1000"),
        headers={"Authorization": f"Bearer {token()}"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        items: list[dict[str, Any]] = json.load(resp)["items"]
    return [item for item in items if str(item.get("key", "")).startswith(prefix)]


def stored(cluster: TlsCluster, prefix: str, n: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]]:
        found = history(cluster, prefix)
        return found if len(found) == n else []

    found: list[dict[str, Any]] = eventually_sync(probe, 5, f"{n} events of {prefix} stored")
    return found


# -- the module in the browsers ----------------------------------------------------------------

# Imports the module from the edge and connects; everything the callbacks see is recorded.
START_JS = """async ([moduleUrl, tokens, options]) => {
  const { connectCrmEvents } = await import(moduleUrl);
  const log = (window.__crm = { events: [], states: [], resets: [], tokens: 0, duplicates: 0 });
  const queue = [...tokens];
  window.__client = connectCrmEvents({
    ...options,
    retry: { initialMs: 200, maxMs: 1000 },
    async getToken() {
      log.tokens += 1;
      return queue.shift();
    },
    onEvent(envelope, cursor, meta) {
      log.events.push({ key: envelope.key, partition: envelope.partition,
                        offset: envelope.offset, cursor, source: meta.source });
    },
    onReset(info, meta) {
      log.resets.push({ reason: info.reason, source: meta.source,
                        cursor: window.__client ? window.__client.cursor : null });
    },
    onState(state, detail) { log.states.push({ state, ...detail }); },
    onDuplicate() { log.duplicates += 1; },
  });
}"""


def start_client(
    page: Page, cluster: TlsCluster, tokens: list[str], **options: Any
) -> Callable[[], list[str]]:
    """Open a page of the deployment's origin and connect the client in it; returns the
    recorder of its stream requests."""
    streams = eventsource_urls(page)
    response = page.goto(cluster.https_url("/nginx-health"))
    assert response is not None and response.ok
    page.evaluate(START_JS, [MODULE_URL, tokens, options])
    return streams


def recorded(page: Page) -> dict[str, Any]:
    found: dict[str, Any] = page.evaluate("() => window.__crm")
    return found


def wait_keys(page: Page, prefix: str, n: int, what: str) -> list[dict[str, Any]]:
    """Until the client has handed over ``n`` events whose key starts with ``prefix``."""
    page.wait_for_function(
        "([p, n]) => window.__crm.events.filter((e) => (e.key || '').startsWith(p)).length >= n",
        arg=[prefix, n],
        timeout=10_000,
    )
    return [e for e in recorded(page)["events"] if str(e["key"]).startswith(prefix)]


def wait_live(page: Page, times: int = 1) -> None:
    page.wait_for_function(
        "(n) => window.__crm.states.filter((s) => s.state === 'live').length >= n",
        arg=times,
        timeout=15_000,
    )


def last_event_id(url: str) -> str | None:
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("last_event_id")
    return values[0] if values else None


def test_module_streams_renews_its_token_and_resumes_exactly_once(
    page: Page, browser_name: str, auth_cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"mod-{browser_name[:2]}-{uuid.uuid4().hex[:8]}-"
    short, long = token(ttl_s=3), token()
    # No cookie yet: the stream is refused, the client's probe of the history answers 401, so
    # it asks getToken() and signs in with the auth cookie.
    start_client(page, auth_cluster, [short, long])
    wait_live(page)
    log = recorded(page)
    assert log["tokens"] == 1
    assert any(s.get("status") == 401 for s in log["states"]), log["states"]

    feed.send(records(prefix, 2))
    wait_keys(page, prefix, 2, "events on the stream")
    # The short token expires: the edge says auth_expired and ends the stream; the client
    # asks for the next token and resumes from its cursor. Events meanwhile arrive once.
    page.wait_for_function("() => window.__crm.tokens === 2", timeout=10_000)
    feed.send(records(prefix, 2, start=2))
    got = wait_keys(page, prefix, 4, "events after the token was renewed")
    wait_live(page, 2)
    log = recorded(page)
    assert any(s.get("error") == "token_expired" for s in log["states"]), log["states"]
    # Each once (keys differ, so partitions too: no order across them).
    assert sorted(e["key"] for e in got) == [f"{prefix}{i}" for i in range(4)]
    assert {e["source"] for e in got} == {"stream"}
    assert log["duplicates"] == 0
    cursor = page.evaluate("() => sessionStorage.getItem('crm-events:cursor')")
    assert cursor == page.evaluate("() => window.__client.cursor") == got[-1]["cursor"]

    # Closed, two more produced, the page loaded again: the client resumes from the cursor
    # it kept in sessionStorage (its auth cookie still valid) and gets those two, once.
    page.evaluate("() => window.__client.close()")
    feed.send(records(prefix, 2, start=4))
    streams = start_client(page, auth_cluster, [])
    wait_live(page)
    resumed = wait_keys(page, prefix, 2, "the events produced while closed")
    assert sorted(e["key"] for e in resumed) == [f"{prefix}4", f"{prefix}5"]
    assert last_event_id(streams()[0]) == cursor
    page.evaluate("() => window.__client.close()")


def test_module_backfills_a_reset_from_history_then_streams(
    page: Page, browser_name: str, auth_cluster: TlsCluster, feed: KafkaFeed
) -> None:
    prefix = f"rst-{browser_name[:2]}-{uuid.uuid4().hex[:8]}-"
    feed.send(records(prefix, 2))
    stored(auth_cluster, prefix, 2)
    pages: list[str] = []
    page.on(
        "request",
        lambda r: pages.append(r.url) if "/crm-events/history" in r.url else None,
    )
    # An id of the old single-stream format: the stream starts with a reset (old_format).
    streams = start_client(
        page, auth_cluster, [], token=token(), lastEventId=OLD_FORMAT_ID, storage=None
    )
    got = wait_keys(page, prefix, 2, "the stored events, from the history")
    log = recorded(page)
    [reset] = log["resets"]
    assert reset["reason"] == "old_format" and reset["source"] == "stream"
    # The backfill paged the history after the reset's id (every partition from its oldest
    # stored event) ...
    afters = [
        urllib.parse.parse_qs(urllib.parse.urlsplit(u).query).get("after", [None])[0] for u in pages
    ]
    assert afters[0] == reset["cursor"], (afters, reset)
    decode_cursor(reset["cursor"])
    assert sorted((e["key"], e["source"]) for e in got) == [
        (f"{prefix}{i}", "history") for i in (0, 1)
    ]
    # ... then streamed from where it ended: a new event comes live, nothing twice.
    wait_live(page)
    feed.send(records(prefix, 1, start=2))
    got = wait_keys(page, prefix, 3, "a live event after the backfill")
    assert got[-1]["source"] == "stream"
    events = recorded(page)["events"]
    where = [(e["partition"], e["offset"]) for e in events]
    assert len(where) == len(set(where)), "an event handed over twice"
    urls = streams()
    assert last_event_id(urls[0]) == OLD_FORMAT_ID
    assert last_event_id(urls[-1]) not in (None, OLD_FORMAT_ID)
    page.evaluate("() => window.__client.close()")


# -- the module in Node, with the eventsource package -------------------------------------------


def _lines(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:  # bounded by the test's timeout
        yield json.loads(line)


def test_module_in_node_with_eventsource_streams_renews_and_resumes(
    auth_cluster: TlsCluster, feed: KafkaFeed
) -> None:
    node = _node()
    prefix = f"node-{uuid.uuid4().hex[:8]}-"
    driver = [
        node,
        str(CLIENT_DIR / "test" / "node-client.mjs"),
        "--url",
        auth_cluster.lb_url("/crm-events"),
        "--prefix",
        prefix,
    ]
    # A token the edge refuses (401, told by the package's error event), then one that
    # expires in a moment (auth_expired), then a lasting one: getToken() is asked twice.
    tokens = ["not-a-token", token(ttl_s=3), token()]
    proc = subprocess.Popen(
        [*driver, "--want", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(None, CRM_TEST_TOKENS=json.dumps(tokens)),
    )
    try:
        seen: list[dict[str, Any]] = []
        produced = 0
        for msg in _lines(proc):
            seen.append(msg)
            if msg.get("state") == "live" and produced == 0:
                feed.send(records(prefix, 2))
                produced = 2
            elif msg.get("getToken") == 2 and produced == 2:
                feed.send(records(prefix, 2, start=2))  # while the token is being renewed
                produced = 4
            elif msg.get("done"):
                break
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [m["event"] for m in seen if "event" in m]
    assert sorted(events) == [f"{prefix}{i}" for i in range(4)], seen
    assert [m["getToken"] for m in seen if "getToken" in m] == [1, 2], seen
    refusals = [m["detail"] for m in seen if m.get("state") == "reconnecting"]
    assert {r.get("error") for r in refusals} >= {"unauthorized", "token_expired"}, refusals
    assert not [m for m in seen if "duplicate" in m]
    [done] = [m for m in seen if m.get("done")]

    # A new process from the cursor the first one ended with: exactly what came since.
    feed.send(records(prefix, 2, start=4))
    again = subprocess.run(
        [*driver, "--want", "2", "--last-event-id", done["cursor"]],
        capture_output=True,
        text=True,
        timeout=20,
        env=node_env(None, CRM_TEST_TOKENS=json.dumps([token()])),
    )
    assert again.returncode == 0, again.stderr
    resumed = [json.loads(line) for line in again.stdout.splitlines()]
    assert sorted(m["event"] for m in resumed if "event" in m) == [f"{prefix}4", f"{prefix}5"]

    # A cursor the edge cannot read (400 invalid_cursor, found by probing the history): the
    # client drops it, says so, and goes on from now instead of retrying it forever.
    refused = subprocess.Popen(
        [*driver, "--want", "1", "--last-event-id", "2.AAAAAQMCAwA"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(None, CRM_TEST_TOKENS=json.dumps([token()])),
    )
    try:
        states = []
        for msg in _lines(refused):
            if "state" in msg:
                states.append(msg)
                if msg["state"] == "live":
                    feed.send(records(prefix, 1, start=6))
            if msg.get("done"):
                break
        assert refused.wait(10) == 0
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.wait()
    [dropped] = [s["detail"] for s in states if s["detail"].get("reason") == "cursor_refused"]
    assert dropped["error"] == "invalid_cursor", dropped


def test_module_in_node_resumes_a_filtered_view_past_the_scan_budget(
    auth_cluster: TlsCluster, feed: KafkaFeed
) -> None:
    """A filtered start with `history` (the Command Center reloading a filtered view) after a
    cursor followed by more events the filter skips than one history request looks at (n*10):
    the first catch-up page is short without being the end, so the newest page (the context,
    here events after the cursor) must not go first; it would make the events below it look
    like duplicates. Every wanted event after the cursor arrives once."""
    node = _node()
    tag = uuid.uuid4().hex[:8]
    prefix, rare = f"scan-{tag}-", f"Rare{tag}"
    key = f"{prefix}k".encode()  # one key: one partition, in this order
    request = urllib.request.Request(
        auth_cluster.lb_url("/crm-events/history?n=1"),
        headers={"Authorization": f"Bearer {token()}"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        cursor = json.load(resp)["next_after"]
    feed.send(
        [(key, crm_event(1, rare, key=f"{prefix}1"))]
        + [(key, crm_event(100 + i, "DealWon", key=f"{prefix}f")) for i in range(60)]
        + [(key, crm_event(i, rare, key=f"{prefix}{i}")) for i in (2, 3, 4)]
    )
    stored(auth_cluster, prefix, 64)
    proc = subprocess.Popen(
        [
            node,
            str(CLIENT_DIR / "test" / "node-client.mjs"),
            "--url",
            auth_cluster.lb_url("/crm-events"),
            "--prefix",
            prefix,
            "--want",
            "4",
            "--last-event-id",
            cursor,
            "--types",
            rare,
            "--history",
            "3",
            "--page-size",
            "5",  # the edge then looks at 50 entries per request
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(None, CRM_TEST_TOKENS=json.dumps([token()])),
    )
    try:
        seen = []
        for msg in _lines(proc):
            seen.append(msg)
            if msg.get("done") or "duplicate" in msg:
                break
    finally:
        proc.kill()
        proc.wait()
    assert not [m for m in seen if "duplicate" in m], seen
    events = [m for m in seen if "event" in m]
    assert [m["seq"] for m in events] == [1, 2, 3, 4], seen
    assert not any(m["context"] for m in events), seen


def test_module_with_a_simulated_edge() -> None:
    """clients/js/test/mocked-edge.test.mjs (node --test): the backfill's context only when
    the catch-up reached the end, backoff for tokens that keep expiring at once, one attempt
    counted per refusal, a non-cursor id ignored, one stored cursor per type filter."""
    node = _node()
    result = subprocess.run(
        [node, "--test", str(CLIENT_DIR / "test" / "mocked-edge.test.mjs")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=CLIENT_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_typescript_declarations_check() -> None:
    """clients/js/test/types-check.ts compiles against crm-events-client.d.ts, including
    its @ts-expect-error lines (wrong usages the declarations must refuse)."""
    _node()
    result = subprocess.run(
        [str(TSC), "--noEmit", "-p", str(CLIENT_DIR / "test")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CLIENT_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the examples -----------------------------------------------------------------------------


@pytest.fixture
def example_server(auth_cluster: TlsCluster) -> Iterator[str]:
    node = _node()
    port = free_port()
    proc = subprocess.Popen(
        [
            node,
            str(EXAMPLES / "serve.mjs"),
            "--port",
            str(port),
            "--upstream",
            auth_cluster.lb_url(""),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=node_env(token()),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert "crm-events example on" in line and "with a token" in line, line
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


def test_example_page_streams_resumes_and_reports_reset(
    chromium_page: Page, example_server: str, feed: KafkaFeed
) -> None:
    page = chromium_page
    prefix = f"ex-{uuid.uuid4().hex[:8]}-"
    li = (
        "(p) => [...document.querySelectorAll('#events li')]"
        ".filter((li) => li.textContent.includes(p)).length"
    )
    page.goto(example_server)
    expect(page.locator("#state")).to_have_attribute("data-state", "live", timeout=10_000)
    feed.send(records(prefix, 3))
    page.wait_for_function(f"(p) => ({li})(p) === 3", arg=prefix, timeout=5000)
    cursor = page.locator("#cursor").inner_text()
    assert page.evaluate("() => sessionStorage.getItem('crm-events:cursor')") == cursor
    decode_cursor(cursor)

    # A reload resumes after the stored cursor: the events produced meanwhile arrive, once.
    page.evaluate("() => window.crmEventsClient.close()")
    feed.send(records(prefix + "r", 2))
    page.reload()
    page.wait_for_function(f"(p) => ({li})(p) === 2", arg=prefix + "r", timeout=5000)

    # An id of the old format: a reset, shown, then what is still stored, from the history.
    page.goto(example_server + f"?last_event_id={OLD_FORMAT_ID}")
    expect(page.locator("#reset")).to_have_attribute("data-reason", "old_format", timeout=10_000)
    expect(page.locator('#events li[data-source="history"]').first).to_be_attached(timeout=10_000)


def test_example_tail_resumes_from_a_state_file_and_stops_at_its_limit(
    auth_cluster: TlsCluster, feed: KafkaFeed, tmp_path: Path
) -> None:
    node = _node()
    prefix = f"tail-{uuid.uuid4().hex[:8]}-"
    state = tmp_path / "tail.state"
    # One key: one partition, so the events come in this order on any edge.
    key = f"{prefix}k".encode()
    feed.send([(key, crm_event(i, "DealWon", key=f"{prefix}{i}")) for i in range(4)])
    items = stored(auth_cluster, prefix, 4)
    tail = [node, str(EXAMPLES / "tail.mjs"), "--url", auth_cluster.lb_url("/crm-events")]

    def run(*args: str, jwt: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*tail, *args], capture_output=True, text=True, timeout=20, env=node_env(jwt)
        )

    def positions(out: str) -> list[str]:
        return [line.split()[0] for line in out.splitlines()]

    # Without a token the edge refuses, and tail says how to get one instead of retrying.
    refused = run("--limit", "1")
    assert refused.returncode == 1, refused.stderr
    assert "HTTP 401" in refused.stderr and "CRM_EVENTS_TOKEN" in refused.stderr, refused.stderr

    # After the first event (its history cursor), stop after two: the state file then holds
    # the cursor after the third.
    first = run(
        "--last-event-id",
        items[0]["cursor"],
        "--state-file",
        str(state),
        "--limit",
        "2",
        jwt=token(),
    )
    assert first.returncode == 0, first.stderr
    saved = decode_cursor(state.read_text().strip())
    assert saved.position(items[2]["partition"]) == items[2]["offset"] + 1
    # Two more while tail is stopped; a restart (token as --token) continues from the state
    # file: the fourth, then those two. Together, every event after the first, each once.
    feed.send([(key, crm_event(i, "DealWon", key=f"{prefix}{i}")) for i in range(4, 6)])
    items = stored(auth_cluster, prefix, 6)
    second = run("--token", token(), "--state-file", str(state), "--limit", "3")
    assert second.returncode == 0, second.stderr
    assert positions(first.stdout) + positions(second.stdout) == [
        f"{item['partition']}:{item['offset']}" for item in items[1:]
    ], (first.stdout, second.stdout)
    assert "DUPLICATE" not in first.stderr + second.stderr

    # A cursor the edge cannot read: a 400, which retrying would not mend; tail stops before
    # the module would drop the cursor (and empty the state file) to go on from now.
    state.write_text("2.AAAAAQMCAwA\n")
    bad = run("--state-file", str(state), "--limit", "1", jwt=token())
    assert bad.returncode == 1 and "HTTP 400 invalid_cursor" in bad.stderr, bad.stderr
    assert state.read_text() == "2.AAAAAQMCAwA\n"

    # An id of the old format: the reset is reported, then the oldest stored events follow,
    # from the history; the state file holds the cursor of the event printed last.
    old = run(
        "--last-event-id",
        OLD_FORMAT_ID,
        "--state-file",
        str(state),
        "--limit",
        "1",
        "--json",
        jwt=token(),
    )
    assert old.returncode == 0 and "RESET (old_format)" in old.stderr, old.stderr
    [printed] = [json.loads(line) for line in old.stdout.splitlines()]
    assert {"partition", "offset", "type", "key", "event"} <= printed.keys()
    assert state.read_text().strip() == printed["cursor"]


def test_example_tail_says_how_to_install_its_dependency(tmp_path: Path) -> None:
    """Outside clients/js (no node_modules to resolve `eventsource` from), tail says what to run."""
    node = _node()
    (tmp_path / "examples").mkdir()
    shutil.copy(CLIENT_DIR / "crm-events-client.js", tmp_path)
    shutil.copy(EXAMPLES / "tail.mjs", tmp_path / "examples")
    result = subprocess.run(
        [node, str(tmp_path / "examples" / "tail.mjs"), "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=20,
        env=node_env(None),
    )
    assert result.returncode == 1, result.stderr
    assert "run `make install` (or `npm ci` in clients/js)" in result.stderr, result.stderr
