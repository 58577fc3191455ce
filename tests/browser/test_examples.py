"""examples/js works as documented: the browser example (served by serve.mjs next to the
API) and the Node tail, against a deployment with authentication on, as `make up` runs it:
both take the token from CRM_EVENTS_TOKEN (or --token), as examples/js/README.md says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from edge.auth import issue_token
from shared.cursor import decode_cursor
from tests.browser.conftest import ROOT, KafkaFeed, TlsCluster
from tests.harness.backends import Backends
from tests.harness.cluster import crm_event, free_port
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EXAMPLES = ROOT / "examples" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
SECRET = "examples-test-secret-" + "x" * 32


@pytest.fixture(scope="module")
def auth_cluster(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsCluster]:
    """Authentication on, with an HS256 secret from a file, as the local stack's edges."""
    run_dir = Path(tmp_path_factory.mktemp("examples-auth"))
    secret = run_dir / "jwt-secret"
    secret.write_text(SECRET + "\n")
    c = TlsCluster(
        run_dir,
        backends,
        env={"CRM_EVENTS_AUTH_MODE": "jwt", "CRM_EVENTS_JWT_SECRET_FILE": str(secret)},
    )
    with c.running():
        yield c


@pytest.fixture(scope="module")
def feed(auth_cluster: TlsCluster) -> Iterator[KafkaFeed]:
    f = KafkaFeed(auth_cluster.backends.kafka_bootstrap, auth_cluster.topic)
    yield f
    f.close()


@pytest.fixture(scope="module")
def token() -> str:
    """What `make token` prints: every type, signed with the deployment's secret."""
    return issue_token(SECRET, types=["*"], ttl_s=3600, subject="local-developer")


def node_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRM_EVENTS_TOKEN"}
    if token is not None:
        env["CRM_EVENTS_TOKEN"] = token
    return env


def _records(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}{i}".encode(), crm_event(i, "DealWon", key=f"{prefix}{i}")) for i in range(n)
    ]


@pytest.fixture
def example_server(auth_cluster: TlsCluster, token: str) -> Iterator[str]:
    assert NODE is not None
    port = free_port()
    upstream = auth_cluster.lb_url("")
    proc = subprocess.Popen(
        [NODE, str(EXAMPLES / "serve.mjs"), "--port", str(port), "--upstream", upstream],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=node_env(token),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert "crm-events example on" in line, line
        assert "with a token" in line, line
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


@needs_node
def test_browser_example_streams_resumes_and_reports_reset(
    chromium_page: Page, example_server: str, feed: KafkaFeed
) -> None:
    page = chromium_page
    prefix = f"ex-{uuid.uuid4().hex[:8]}-"
    page.goto(example_server)
    expect(page.locator("#state")).to_have_attribute("data-state", "live", timeout=10_000)
    feed.send(_records(prefix, 3))
    page.wait_for_function(
        "(p) => [...document.querySelectorAll('#events li')]"
        ".filter((li) => li.textContent.includes(p)).length === 3",
        arg=prefix,
        timeout=5000,
    )
    # The cursor shown is the one kept for a reload: opaque to the page, decodable here.
    cursor = page.locator("#cursor").inner_text()
    assert page.evaluate("() => sessionStorage.getItem('crm-events:cursor')") == cursor
    decode_cursor(cursor)

    # A reload resumes after the stored id: the events produced meanwhile arrive, once.
    page.evaluate("() => window.crmEventsClient.close()")
    feed.send(_records(prefix + "r", 2))
    page.reload()
    page.wait_for_function(
        "(p) => [...document.querySelectorAll('#events li')]"
        ".filter((li) => li.textContent.includes(p)).length === 2",
        arg=prefix + "r",
        timeout=5000,
    )

    # An id of the old single-stream format: the stream starts with a reset, shown.
    page.goto(example_server + "?last_event_id=99999999999999-0")
    expect(page.locator("#reset")).to_be_visible(timeout=10_000)
    expect(page.locator("#reset")).to_have_attribute("data-reason", "old_format")


@needs_node
def test_node_tail_resumes_from_a_state_file_and_reports_reset(
    auth_cluster: TlsCluster, feed: KafkaFeed, token: str, tmp_path: Path
) -> None:
    assert NODE is not None
    prefix = f"tail-{uuid.uuid4().hex[:8]}-"
    state = tmp_path / "tail.state"
    # One key: one partition, so the four come in this order on any edge.
    key = f"{prefix}k".encode()
    feed.send([(key, crm_event(i, "DealWon", key=f"{prefix}{i}")) for i in range(4)])

    def stored() -> list[dict[str, Any]]:
        found = _history(auth_cluster, token, prefix)
        return found if len(found) == 4 else []

    items = eventually_sync(stored, 5, "the four events stored")
    where = [f"{item['partition']}:{item['offset']}" for item in items]

    tail = [NODE, str(EXAMPLES / "tail.mjs"), "--url", auth_cluster.lb_url("/crm-events")]
    # Without a token the edge refuses, and tail says how to get one instead of retrying.
    refused = subprocess.run(
        [*tail, "--count", "1"], capture_output=True, text=True, timeout=20, env=node_env(None)
    )
    assert refused.returncode == 1, refused.stderr
    assert "HTTP 401" in refused.stderr and "CRM_EVENTS_TOKEN" in refused.stderr, refused.stderr

    # Start after the first event (its history cursor); stop after two: the state file
    # holds the cursor after the third.
    first = subprocess.run(
        [*tail, "--last-event-id", items[0]["cursor"], "--state-file", str(state), "--count", "2"],
        capture_output=True,
        text=True,
        timeout=20,
        env=node_env(token),
    )
    assert first.returncode == 0, first.stderr
    assert [line.split()[0] for line in first.stdout.splitlines()] == where[1:3]
    saved = decode_cursor(state.read_text().strip())
    assert saved.position(items[2]["partition"]) == items[2]["offset"] + 1
    # A restart continues from the state file (the token given as --token this time).
    second = subprocess.run(
        [*tail, "--token", token, "--state-file", str(state), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=20,
        env=node_env(None),
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[0] == where[3]

    # A cursor the edge cannot read: a 400, which retrying would not mend.
    bad = subprocess.run(
        [*tail, "--last-event-id", "2.AAAAAQMCAwA", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=20,
        env=node_env(token),
    )
    assert bad.returncode == 1 and "HTTP 400 invalid_cursor" in bad.stderr, bad.stderr

    # An id of the old format: the reset is reported, then events follow, from the oldest
    # retained one of a partition.
    proc = subprocess.Popen(
        [*tail, "--last-event-id", "99999999999999-0", "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=node_env(token),
    )
    try:
        assert proc.stderr is not None
        notes: list[str] = []
        while not any("RESET" in n for n in notes):
            line = proc.stderr.readline()  # bounded by the test's timeout
            assert line, f"tail exited early: {notes}"
            notes.append(line)
        assert "RESET (old_format)" in notes[-1], notes
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        partition, offset = (int(v) for v in out.split()[0].split(":"))
        assert offset == min(
            item["offset"]
            for item in _history(auth_cluster, token, "")
            if item["partition"] == partition
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _history(cluster: TlsCluster, token: str, prefix: str) -> list[dict[str, Any]]:
    """Stored items (oldest first) whose key starts with ``prefix``."""
    request = urllib.request.Request(
        cluster.lb_url("/crm-events/history?n=1000"),
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        items: list[dict[str, Any]] = json.load(resp)["items"]
    return [item for item in items if str(item.get("key", "")).startswith(prefix)]
