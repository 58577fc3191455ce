"""The Python client library against a real authenticated deployment (Kafka, Redis, ingest,
two edges behind nginx): exactly once across edge restarts, token renewal at expiry, resets
(yielded, and back-filled from history), history paging, and the errors it raises."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crm_events_client import (
    CrmEventsClient,
    Event,
    EventStream,
    Forbidden,
    MemoryCursorStore,
    OnReset,
    Reset,
    Token,
    Unauthorized,
)

from edge.auth import issue_token
from shared.cursor import decode_cursor
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event
from tests.sse_client import assert_per_partition_exactly_once, cursor_text
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)
SECRET = "client-python-secret-" + "x" * 32


@pytest.fixture(scope="module")
def deployment(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run = Path(tmp_path_factory.mktemp("client-python"))
    (run / "jwt-secret").write_text(SECRET)
    c = Cluster(
        run,
        backends,
        edges=2,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(run / "jwt-secret"),
            "CRM_EVENTS_JWT_LEEWAY_S": "0",
            # A short replay stream, and less of it in the edges' memory, so that an old
            # cursor takes the Redis path and is reset.
            "CRM_EVENTS_STREAM_MAXLEN": "100",
            "CRM_EVENTS_REPLAY_RING_BYTES": "20000",
            "CRM_EVENTS_HISTORY_RATE_PER_S": "1000",
            "CRM_EVENTS_HISTORY_BURST": "1000",
            # Reconnects within a fraction of a second (the client's backoff starts there).
            "CRM_EVENTS_SSE_RETRY_MS": "300",
        },
    )
    with c.running():
        yield c


def provider(types: list[str], ttl_s: float = 600) -> Any:
    calls: list[float] = []

    def give() -> str:
        calls.append(1)
        return issue_token(SECRET, types=types, ttl_s=ttl_s)

    give.calls = calls  # type: ignore[attr-defined]
    return give


async def tops(c: Cluster) -> str:
    """The cursor after everything stored now (streams from it see only what comes next)."""
    async with CrmEventsClient(c.lb_url("/crm-events"), token=provider(["*"])) as client:
        page = await client.history_page(n=1)
    assert page.next_after is not None
    return page.next_after


class Reader:
    """Consumes a stream in the background, keeping every item."""

    def __init__(self, events: EventStream) -> None:
        self.events = events
        self.items: list[Event | Reset] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for item in self.events:
            self.items.append(item)

    @property
    def received(self) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event)]

    def seqs(self) -> set[int]:
        return {e.event["Seq"] for e in self.received}

    async def until(self, seqs: set[int], timeout: float, what: str) -> None:
        def done() -> bool:
            if self.task.done():
                self.task.result()  # raises what ended the stream
            return seqs <= self.seqs()

        await eventually(done, timeout, what)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.events.aclose()


def expected(metadata: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for m in metadata:
        out[m.partition].append(m.offset)
    return out


async def produce(c: Cluster, type_: str, seqs: range, key: str | None = None) -> list[Any]:
    return await c.produce(
        ((key or f"k{s % 9}").encode(), crm_event(s, type_, key=key)) for s in seqs
    )


async def test_exactly_once_across_sigterm_and_kill9_of_the_serving_edge(
    deployment: Cluster,
) -> None:
    c = deployment
    start = await tops(c)
    client = CrmEventsClient(c.lb_url("/crm-events"), token=provider(["*"]))
    reader = Reader(client.stream(types="RunA", cursor=start))
    meta: list[Any] = []
    try:
        meta += await produce(c, "RunA", range(0, 40))
        await reader.until(set(range(40)), 20, "the first batch")
        for fault in ("sigterm", "kill9"):
            node = reader.events.node
            assert node is not None
            name = node.replace("-", "")  # edge-1 is the process edge1
            base = len(meta)
            sending = asyncio.create_task(produce(c, "RunA", range(base, base + 40)))
            if fault == "sigterm":
                await asyncio.to_thread(c.stop, name)
            else:
                c.kill9(name)
            meta += await sending
            meta += await produce(c, "RunA", range(base + 40, base + 60))
            await reader.until(set(range(base + 60)), 20, f"the events after {fault}")
            assert reader.events.node != node, f"still served by {node} after {fault}"
            await asyncio.to_thread(c.start, name)
    finally:
        await reader.stop()
        await client.close()
    assert_per_partition_exactly_once(
        [(e.partition, e.offset) for e in reader.received], expected(meta), "python client"
    )
    assert reader.events.guard.dropped == 0  # the server never sent one twice
    assert not [i for i in reader.items if isinstance(i, Reset)]


async def test_tokens_are_renewed_before_expiry_and_on_auth_expired(
    deployment: Cluster,
) -> None:
    c = deployment
    start = await tops(c)
    early = provider(["RunB"], ttl_s=3)
    late = provider(["RunB"], ttl_s=2)
    url = c.lb_url("/crm-events")
    proactive = CrmEventsClient(url, token=early)
    on_expiry = CrmEventsClient(url, token=late, proactive_refresh=False)
    readers = [
        Reader(proactive.stream(types="RunB", cursor=start)),
        Reader(on_expiry.stream(types="RunB", cursor=start)),
    ]
    meta: list[Any] = []
    try:
        # Events keep coming across several expiries of both clients' tokens.
        for batch in range(8):
            meta += await produce(c, "RunB", range(batch * 10, batch * 10 + 10))
            await asyncio.sleep(0.9)
        for reader in readers:
            await reader.until(set(range(80)), 15, "every event")
    finally:
        for reader in readers:
            await reader.stop()
        await proactive.close()
        await on_expiry.close()
    for reader in readers:
        assert_per_partition_exactly_once(
            [(e.partition, e.offset) for e in reader.received], expected(meta)
        )
    first, second = (r.events.reconnects for r in readers)
    assert len(early.calls) >= 3 and first["the token is about to expire"] >= 2
    assert first["the token expired"] == 0, first  # renewed before the server ended it
    assert len(late.calls) >= 3 and second["the token expired"] >= 2, second


async def test_an_old_cursor_is_reset_and_refetch_backfills_from_history(
    deployment: Cluster,
) -> None:
    c = deployment
    url = c.lb_url("/crm-events")
    start = await tops(c)
    meta = await produce(c, "RunC", range(5), key="trim")
    (p,) = {m.partition for m in meta}
    store = MemoryCursorStore()
    async with CrmEventsClient(url, token=provider(["*"])) as client:
        events = client.stream(types="RunC", cursor=start, store=store)
        async with asyncio.timeout(20):
            async for item in events:
                if isinstance(item, Event) and item.event["Seq"] == 1:
                    break  # the consumer handled Seq 0 and 1... then dies before the commit
        await events.aclose()
    stale = store.cursor  # Seq 0's cursor: Seq 1 was not acknowledged
    assert stale is not None
    meta += await produce(c, "RunC", range(5, 400), key="trim")
    redis = c.redis()
    try:

        async def all_in() -> bool:
            last = await redis.xrevrange(c.keys.stream(p), count=1)
            return bool(last) and json.loads(last[0][1][b"d"])["event"]["Seq"] == 399

        await eventually(all_in, 30, "the 400 events in the partition's stream")
        oldest = await redis.xrange(c.keys.stream(p), count=1)
    finally:
        await redis.aclose()
    first_offset = json.loads(oldest[0][1][b"d"])["offset"]

    results: dict[str, list[Event | Reset]] = {}
    modes: tuple[OnReset, ...] = ("yield", "refetch")
    for mode in modes:
        async with CrmEventsClient(url, token=provider(["*"])) as client:
            items: list[Event | Reset] = []
            async with (
                asyncio.timeout(20),
                client.stream(types="RunC", cursor=stale, on_reset=mode) as events,
            ):
                async for item in events:
                    items.append(item)
                    if isinstance(item, Event) and item.event["Seq"] == 399:
                        break
        results[mode] = items
    for name, items in results.items():
        reset = items[0]
        assert isinstance(reset, Reset), f"{name}: the first item is not a reset"
        assert reset.reason == "trimmed" and [r.partition for r in reset.partitions] == [p]
        (part,) = reset.partitions
        assert part.oldest_available is not None and part.oldest_available <= first_offset
        got = [i for i in items[1:] if isinstance(i, Event)]
        assert [e.offset for e in got] == [m.offset for m in meta if m.offset >= first_offset]
    assert {e.source for e in results["yield"] if isinstance(e, Event)} == {"stream"}
    backfilled = [e for e in results["refetch"] if isinstance(e, Event)]
    assert {e.source for e in backfilled} == {"history"}  # all of it was already stored
    assert [e.cursor for e in backfilled] != []


async def test_history_pages_every_stored_event_in_order(deployment: Cluster) -> None:
    c = deployment
    meta = await produce(c, "RunD", range(60))
    url = c.lb_url("/crm-events")
    async with CrmEventsClient(url, token=provider(["*"])) as client:
        await eventually(lambda: _has_all(client, meta), 20, "the 60 events in history")
        epoch = decode_cursor(await tops(c)).epoch
        everything = [i async for i in client.history(after=cursor_text(epoch), page=7)]
        stored = await c.stored_events()
        assert not [i for i in everything if isinstance(i, Reset)]
        items = [i for i in everything if isinstance(i, Event)]
        by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for e in items:
            by_partition[e.partition].append(
                {k: v for k, v in e.envelope().items() if k != "cursor"}
            )
        want: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for envelope in stored:
            want[envelope["partition"]].append(envelope)
        assert dict(by_partition) == dict(want)
        assert len(items) == len(stored) > 60
        # From the middle: exactly the items after the one whose cursor is given (per
        # partition: pages merge partitions by timestamp, so page bounds move that order).
        middle = len(items) // 2
        rest = [i async for i in client.history(after=items[middle].cursor, page=7)]
        assert per_partition(rest) == per_partition(items[middle + 1 :])
        # And filtered by type, to the end.
        only = [i async for i in client.history(after=cursor_text(epoch), types="RunD", page=7)]
        assert per_partition(only) == per_partition([e for e in items if e.type == "RunD"])
        assert len(per_partition(only)) > 1


def per_partition(items: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for e in items:
        if isinstance(e, Event):
            out[e.partition].append(e.offset)
    return dict(out)


async def _has_all(client: CrmEventsClient, meta: list[Any]) -> bool:
    page = await client.history_page(n=1000, types="RunD")
    return page.count == len(meta)


async def test_forbidden_and_unauthorized_are_raised_not_retried(deployment: Cluster) -> None:
    c = deployment
    url = c.lb_url("/crm-events")
    limited = provider(["RunA"])
    async with CrmEventsClient(url, token=limited) as client, asyncio.timeout(5):
        with pytest.raises(Forbidden) as caught:
            await anext(aiter(client.stream(types="RunB")))
    assert caught.value.error == "forbidden" and "RunB" in caught.value.message
    assert len(limited.calls) == 1  # a 403 does not ask for another token either
    async with CrmEventsClient(url) as anonymous, asyncio.timeout(5):
        with pytest.raises(Unauthorized) as no_token:
            await anext(aiter(anonymous.stream()))
    assert no_token.value.status == 401 and no_token.value.error == "unauthorized"
    # A provider that keeps returning an expired token: one fresh try, then Unauthorized.
    expired = issue_token(SECRET, types=["*"], ttl_s=-10)
    async with CrmEventsClient(url, token=lambda: Token(expired)) as client, asyncio.timeout(5):
        with pytest.raises(Unauthorized):
            await anext(aiter(client.stream()))
        assert client.tokens.calls == 2


async def test_the_cli_prints_events_and_keeps_its_cursor(
    deployment: Cluster, tmp_path: Path
) -> None:
    c = deployment
    start = await tops(c)
    meta = await produce(c, "RunE", range(6), key="cli")  # one partition: one order
    state = tmp_path / "cursor"
    env = {**os.environ, "CRM_EVENTS_TOKEN": issue_token(SECRET, types=["*"], ttl_s=60)}
    argv = [sys.executable, "-m", "crm_events_client", "--url", c.lb_url("/crm-events")]
    argv += ["--types", "RunE", "--state-file", str(state), "--limit", "4"]

    async def run(*extra: str) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            *argv, *extra, env=env, stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        return [json.loads(line) for line in out.decode().splitlines()]

    first = await run("--last-event-id", start)
    assert [e["event"]["Seq"] for e in first] == [0, 1, 2, 3]
    assert state.read_text().strip() == first[-1]["cursor"]
    # A second run continues after the fourth from the state file (limit 2 of the 2 left).
    second = await run("--limit", "2")
    assert [e["event"]["Seq"] for e in second] == [4, 5]
    assert {(e["partition"], e["offset"]) for e in first + second} == {
        (m.partition, m.offset) for m in meta
    }
