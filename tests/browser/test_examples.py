"""examples/js works as documented: the browser example (served by serve.mjs next to the
API) and the Node tail, against the same deployment as the page tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import ROOT, KafkaFeed, TlsCluster
from tests.harness.cluster import crm_event, free_port
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EXAMPLES = ROOT / "examples" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def _records(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}{i}".encode(), crm_event(i, "DealWon", key=f"{prefix}{i}")) for i in range(n)
    ]


@pytest.fixture
def example_server(cluster: TlsCluster) -> Iterator[str]:
    assert NODE is not None
    port = free_port()
    proc = subprocess.Popen(
        [NODE, str(EXAMPLES / "serve.mjs"), "--port", str(port), "--upstream", cluster.lb_url("")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert "crm-events example on" in line, line
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
    last = page.locator("#last-id").inner_text()
    assert page.evaluate("() => sessionStorage.getItem('crm-events:last-id')") == last

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

    # A position the stream cannot continue from: the example shows the reset.
    page.goto(example_server + "?last_event_id=99999999999999-0")
    expect(page.locator("#reset")).to_be_visible(timeout=10_000)
    expect(page.locator("#reset")).to_have_attribute("data-reason", "unknown_position")


@needs_node
def test_node_tail_resumes_from_a_state_file_and_reports_reset(
    cluster: TlsCluster, feed: KafkaFeed, tmp_path: Path
) -> None:
    assert NODE is not None
    prefix = f"tail-{uuid.uuid4().hex[:8]}-"
    state = tmp_path / "tail.state"
    feed.send(_records(prefix, 4))
    ids = eventually_sync(
        lambda: (found := _history_ids(cluster, prefix)) and len(found) == 4 and found,
        5,
        "the four events stored",
    )

    tail = [NODE, str(EXAMPLES / "tail.mjs"), "--url", cluster.lb_url("/crm-events")]
    # Start after the first event; stop after two: the state file holds the third's id.
    first = subprocess.run(
        [*tail, "--last-event-id", ids[0], "--state-file", str(state), "--count", "2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert first.returncode == 0, first.stderr
    assert [line.split()[0] for line in first.stdout.splitlines()] == ids[1:3]
    assert state.read_text().strip() == ids[2]
    # A restart continues from the state file.
    second = subprocess.run(
        [*tail, "--state-file", str(state), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[0] == ids[3]

    # An id the stream cannot continue from: the reset is reported, then events follow.
    proc = subprocess.Popen(
        [*tail, "--last-event-id", "99999999999999-0", "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        notes = []
        while not any("RESET" in n for n in notes):
            line = proc.stderr.readline()  # bounded by the test's timeout
            assert line, f"tail exited early: {notes}"
            notes.append(line)
        assert "RESET (unknown_position)" in notes[-1], notes
        feed.send(_records(prefix + "after", 1))
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert out.split()[2] == f"{prefix}after0"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _history_ids(cluster: TlsCluster, prefix: str) -> list[str]:
    with urllib.request.urlopen(cluster.lb_url("/crm-events/history?n=1000"), timeout=5) as resp:
        items = json.load(resp)["items"]
    return [item["id"] for item in items if str(item.get("key", "")).startswith(prefix)]
