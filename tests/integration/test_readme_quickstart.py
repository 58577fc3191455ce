"""The README's quick start works when pasted: the commands of its "Then try" block, run as
written by bash, against a deployment with authentication on as `make up` runs it.

What differs from a pasted run, and why:

* the deployment is this module's private one (ingest, two edges, nginx, the sample producer
  on a unique topic), so the block's `127.0.0.1:9010` (the local stack's load balancer) is
  replaced by this deployment's address;
* `make token` runs for real, with CRM_EVENTS_RUN_DIR pointing at a private run directory
  whose JWT secret (made as `make up` makes it) the edges verify with; the environment has no
  MAKELEVEL/MAKEFLAGS, as in a user's shell;
* the placeholders `<an id you saw>` and `<id>` become an id the live stream printed;
* streams (`curl -N`) are stopped once they printed what is checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.stack import (
    DEFAULT_LB_PORT,
    StackSettings,
    _python_entry,
    ensure_jwt_secret,
    jwt_secret_file,
)
from shared.cursor import Cursor, decode_cursor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster
from tests.sse_client import assert_positions_never_go_back
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTED_LB = f"http://127.0.0.1:{DEFAULT_LB_PORT}"
JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
PRODUCER_RATE = "25"  # events per second: the rarer types (DealLost) show up within seconds


def then_try_block() -> list[str]:
    """The lines of the first ```sh block after "Then try" in the README."""
    text = README.read_text()
    start = text.index("Then try")
    fence = text.index("```sh\n", start) + len("```sh\n")
    block = text[fence : text.index("```", fence)]
    return [line for line in block.splitlines() if line.strip()]


def key_of(envelope: dict[str, Any]) -> tuple[int, int]:
    return envelope["partition"], envelope["offset"]


def after_cursor(cursor: Cursor, envelope: dict[str, Any]) -> bool:
    """Whether the event comes after ``cursor`` (past its position in the event's
    partition; a partition without a position is read from its oldest event)."""
    seen = cursor.position(envelope["partition"])
    return seen is None or envelope["offset"] >= seen


def check_cursors(pairs: list[tuple[str, dict[str, Any]]], filtered: bool = False) -> None:
    """Each (cursor, envelope): the cursor stands right after its event in the event's
    partition, and no partition's position goes back from one to the next. ``filtered``:
    a history page of some types, whose cursors also step over the events of that partition
    the filter left out before its next item (never past that item)."""
    cursors = [decode_cursor(c) for c, _ in pairs]
    for n, (cursor, (_, envelope)) in enumerate(zip(cursors, pairs, strict=True)):
        partition, position = envelope["partition"], cursor.position(envelope["partition"])
        if not filtered:
            assert position == envelope["offset"] + 1, envelope
            continue
        following = [e["offset"] for _, e in pairs[n + 1 :] if e["partition"] == partition]
        assert position is not None and position >= envelope["offset"] + 1, envelope
        assert not following or position <= following[0], (envelope, following[0])
    assert_positions_never_go_back(cursors)


class Sse:
    """The SSE frames a `curl -N` printed: (event name, id, data)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str | None, str]] = []
        self.raw: list[str] = []
        self._event = "message"
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> None:
        self.raw.append(line)
        if line == "":
            if self._data:
                self.frames.append((self._event, self._id, "\n".join(self._data)))
            self._event, self._id, self._data = "message", None, []
        elif line.startswith(":"):
            return
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._event = value
            elif field == "id":
                self._id = value
            elif field == "data":
                self._data.append(value)

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, event_id, data in self.frames:
            if name == "message":
                assert event_id is not None, data
                out.append((event_id, json.loads(data)))
        return out


@pytest.fixture(scope="module")
def quickstart(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, dict[str, str]]]:
    """The deployment, and the environment the README's commands run in."""
    base = Path(tmp_path_factory.mktemp("quickstart"))
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    env["CRM_EVENTS_RUN_DIR"] = str(base / "stack")
    env.pop("CRM_EVENTS_AUTH_MODE", None)  # `make up` leaves it at its default: jwt
    # The secret `make up` makes and `make token` signs with.
    settings = StackSettings.from_env(env)
    ensure_jwt_secret(settings)
    cluster = Cluster(
        base / "cluster",
        backends,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(jwt_secret_file(settings)),
        },
    )
    with cluster.running():
        log = (base / "producer.log").open("w")
        producer = subprocess.Popen(
            # The sample producer as `make up` starts it.
            _python_entry("crm-events-producer", "devtools.producer"),
            cwd=ROOT,
            env={
                **env,
                "CRM_EVENTS_KAFKA_BOOTSTRAP": backends.kafka_bootstrap,
                "CRM_EVENTS_KAFKA_TOPIC": cluster.topic,
                "CRM_EVENTS_PRODUCER_RATE": PRODUCER_RATE,
            },
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield cluster, env
        finally:
            producer.terminate()
            try:
                producer.wait(10)
            except subprocess.TimeoutExpired:
                producer.kill()
                producer.wait()
            log.close()


class Commands:
    """The block's commands, each run by bash after the block's other lines (TOKEN=...)."""

    def __init__(self, cluster: Cluster, env: dict[str, str]) -> None:
        assert shutil.which("curl"), "the quick start needs curl (Debian package curl)"
        lines = then_try_block()
        self.prelude = [line for line in lines if not line.startswith("curl ")]
        self.curls = [line for line in lines if line.startswith("curl ")]
        self.cluster = cluster
        self.env = env
        self.seen_id: str | None = None

    def script(self, line: str) -> str:
        assert DOCUMENTED_LB in line, line
        line = line.replace(DOCUMENTED_LB, self.cluster.lb_url(""))
        if "<" in line:
            assert self.seen_id is not None, f"no id seen yet for {line}"
            line = re.sub(r"<[^>]*id[^>]*>", self.seen_id, line)
        return "\n".join([*self.prelude, line])

    def run(self, line: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.script(line)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def stream(self, line: str, until: Callable[[Sse], bool], timeout_s: float, what: str) -> Sse:
        """Run a `curl -N` until ``until(sse)`` holds; fail at the deadline or if it ends."""
        proc = subprocess.Popen(
            ["bash", "-c", self.script(line)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # curl and its shell are stopped together
        )
        assert proc.stdout is not None
        sse = Sse()
        deadline = time.monotonic() + timeout_s
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while not until(sse):
                    left = deadline - time.monotonic()
                    assert left > 0, f"{what}: not within {timeout_s}s; it printed {sse.raw[-20:]}"
                    if not sel.select(left):
                        continue
                    out = proc.stdout.readline()
                    assert out, f"{what}: the command ended; it printed {sse.raw[-20:]}"
                    sse.feed(out.rstrip("\r\n"))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        return sse


def only(curls: list[str], wanted: Callable[[str], bool], what: str) -> str:
    found = [c for c in curls if wanted(c)]
    assert len(found) == 1, f"one command for {what} in {curls}"
    return found[0]


def test_make_token_prints_only_a_token(quickstart: tuple[Cluster, dict[str, str]]) -> None:
    cluster, env = quickstart
    commands = Commands(cluster, env)
    assert any("$(make token)" in line for line in commands.prelude), commands.prelude
    out = subprocess.run(
        ["bash", "-c", "\n".join([*commands.prelude, 'printf "%s" "$TOKEN"'])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert JWT_RE.fullmatch(out.stdout), out.stdout


def test_then_try_commands_work_as_written(quickstart: tuple[Cluster, dict[str, str]]) -> None:
    cluster, env = quickstart
    commands = Commands(cluster, env)
    curls = commands.curls
    assert len(curls) == 5, curls
    live_cmd = only(
        curls,
        lambda c: c.startswith("curl -N") and "types=" not in c and "Last-Event-ID" not in c,
        "the live stream",
    )

    # The live stream prints events as they happen.
    live = commands.stream(live_cmd, lambda s: len(s.events) >= 3, 20, "the live stream")
    ids = [event_id for event_id, _ in live.events]
    assert all(envelope["type"] and "event" in envelope for _, envelope in live.events)
    check_cursors(live.events)
    commands.seen_id = ids[0]
    seen = decode_cursor(ids[0])

    # Filtered on the server: only the types asked for.
    filtered = commands.stream(
        only(curls, lambda c: "types=DealWon,DealLost" in c, "a filtered stream"),
        lambda s: len(s.events) >= 1,
        30,
        "the filtered stream",
    )
    assert {envelope["type"] for _, envelope in filtered.events} <= {"DealWon", "DealLost"}

    # Resumed after an id seen: the events after it, first the ones already stored (the
    # two the live stream printed next among them).
    next_two = {key_of(envelope) for _, envelope in live.events[1:3]}
    resumed = commands.stream(
        only(curls, lambda c: "Last-Event-ID" in c, "a resumed stream"),
        lambda s: next_two <= {key_of(envelope) for _, envelope in s.events},
        20,
        "the resumed stream",
    )
    assert [name for name, _, _ in resumed.frames if name != "message"] == []  # no reset
    assert all(after_cursor(seen, envelope) for _, envelope in resumed.events)
    resumed_keys = [key_of(envelope) for _, envelope in resumed.events]
    assert len(resumed_keys) == len(set(resumed_keys)), "an event twice"
    check_cursors([(seen_id, envelope) for seen_id, envelope in resumed.events])

    # History: the newest events as JSON.
    history = commands.run(only(curls, lambda c: "history?n=100" in c, "history"))
    assert history.returncode == 0, history.stderr
    body = json.loads(history.stdout)
    assert "items" in body, body
    assert body["count"] == len(body["items"]) >= 3
    check_cursors([(item["cursor"], item) for item in body["items"]])
    # The newest item is at or past the last event the live stream printed.
    newest, printed = decode_cursor(body["items"][-1]["cursor"]), decode_cursor(ids[-1])
    assert_positions_never_go_back([printed, newest])

    # History after an id, one type: TicketOpened events newer than it (the producer opens
    # tickets often; a few seconds of its output hold some).
    paged_cmd = only(curls, lambda c: "after=" in c, "history after an id")

    def ticket_page() -> dict[str, Any] | None:
        paged = commands.run(paged_cmd)
        assert paged.returncode == 0, paged.stderr
        page: dict[str, Any] = json.loads(paged.stdout)
        assert "items" in page, page  # an error body (401, 400)
        return page if page["items"] else None

    page = eventually_sync(ticket_page, 20, "a TicketOpened after the id")
    assert page is not None
    assert {item["type"] for item in page["items"]} == {"TicketOpened"}
    assert all(after_cursor(seen, item) for item in page["items"])
    check_cursors([(item["cursor"], item) for item in page["items"]], filtered=True)


def clients_blocks() -> list[str]:
    """The ```sh blocks of the README's "Clients" section."""
    text = README.read_text()
    start = text.index("\n## Clients\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_clients_blocks_stream_events_as_pasted(
    quickstart: tuple[Cluster, dict[str, str]], tmp_path: Path
) -> None:
    """Both clients as the README shows them: the two tails print five events each and exit;
    the Python example prints five, and run again continues after them (its cursor file)."""
    cluster, env = quickstart
    commands, library = clients_blocks()
    token_line = commands.splitlines()[0]
    assert token_line == "export CRM_EVENTS_TOKEN=$(make token)", token_line

    def run(block: str) -> list[str]:
        assert DOCUMENTED_LB in block, block
        # Into this deployment, and the example's cursor file into this test's directory.
        script = block.replace(DOCUMENTED_LB, cluster.lb_url("")).replace("/tmp/", f"{tmp_path}/")
        out = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == 0, f"{block}\nstdout: {out.stdout}\nstderr: {out.stderr}"
        return out.stdout.splitlines()

    python_tail, node_tail = commands.splitlines()[1:]
    # crm-events-tail prints one JSON line per event: the envelope with its cursor.
    printed = [json.loads(text) for text in run("\n".join([token_line, python_tail]))]
    assert len(printed) == 5, printed
    check_cursors([(item["cursor"], item) for item in printed])
    # tail.mjs prints "<partition>:<offset> <type> <key>" per event, per partition in order.
    lines = run("\n".join([token_line, node_tail]))
    assert len(lines) == 5, lines
    seen = [tuple(int(n) for n in text.split()[0].split(":")) for text in lines]
    assert all(len(text.split()) == 3 for text in lines), lines
    for p in {p for p, _ in seen}:
        offsets = [o for q, o in seen if q == p]
        assert offsets == sorted(set(offsets)), (p, lines)

    def example() -> list[tuple[int, int]]:
        lines = run("\n".join([token_line, library]))
        assert len(lines) == 5 and not any(text.startswith("RESET") for text in lines), lines
        return [(int(p), int(o)) for p, o, *_ in (text.split() for text in lines)]

    first, second = example(), example()
    assert not set(first) & set(second), "the second run repeated events of the first"
    # Continued right after the first run: in a partition both saw, the second starts at the
    # next offset (the sample producer writes only events, so offsets have no holes).
    for p in {p for p, _ in first} & {p for p, _ in second}:
        last = max(o for q, o in first if q == p)
        assert min(o for q, o in second if q == p) == last + 1, (p, first, second)
