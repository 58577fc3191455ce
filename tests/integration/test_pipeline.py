"""Kafka -> ingest -> Redis -> edges -> load balancer, end to end on the real services.

Every test here runs four times: behind nginx and behind HAProxy on one Redis, behind HAProxy
on a Redis seen through Sentinels and behind nginx on a Redis Cluster (the module's deployment
is parametrised), so delivery, resume, history and errors are checked through each load
balancer and in each Redis mode.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.cursor import Cursor, decode_cursor
from tests.harness.backends import Backends
from tests.harness.cluster import LOAD_BALANCERS, Cluster, LoadBalancer, crm_event
from tests.integration.checks import assert_exactly_once_in_order
from tests.integration.conftest import backends_in_mode
from tests.sse_client import (
    Collector,
    assert_cursors_never_go_back,
    assert_per_partition_exactly_once,
    assert_positions_never_go_back,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)


SETUPS = [
    *((lb, "single") for lb in LOAD_BALANCERS),
    # The other Redis modes behind one load balancer each (which one is not the Redis mode's
    # concern): the Sentinels' primary, and the Redis Cluster's sharded pub/sub and routing.
    ("haproxy", "sentinel"),
    ("nginx", "cluster"),
]


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{lb}-{mode}" for lb, mode in SETUPS])
def cluster(
    request: pytest.FixtureRequest,
    backends: Backends,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Ingest, two edges and one load balancer on one Redis mode; one setup at a time
    (pytest groups the tests by parameter of a module-scoped fixture)."""
    lb: LoadBalancer
    lb, mode = request.param
    run_dir = Path(tmp_path_factory.mktemp(f"pipeline-{lb}-{mode}"))
    with Cluster(run_dir, backends_in_mode(request, backends, mode), lb=lb).running() as c:
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def stream_count(cluster: Cluster, session: aiohttp.ClientSession) -> float:
    total = 0.0
    for i in range(1, cluster.edges + 1):
        async with session.get(cluster.edge_url(i, "/readyz")) as resp:
            total += (await resp.json())["clients"]
    return total


async def test_ingest_created_the_topic_with_three_partitions(cluster: Cluster) -> None:
    assert await cluster.partitions() == 3


async def test_thousand_events_reach_three_clients_exactly_once(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    before = await stream_count(cluster, session)
    clients = [
        Collector(cluster.lb_url("/crm-events")).start(session),
        Collector(cluster.lb_url("/crm-events")).start(session),
        Collector(cluster.edge_url(2, "/crm-events")).start(session),
    ]
    await eventually(
        lambda: _at_least(cluster, session, before + 3), 15, "three SSE clients connected"
    )
    base = 10_000
    metadata = await cluster.produce(
        (f"agg-{i % 30}".encode(), crm_event(base + i, key=f"agg-{i % 30}")) for i in range(1000)
    )
    assert {m.partition for m in metadata} == {0, 1, 2}, "the keys must use all 3 partitions"
    for c in clients:
        await c.wait_for(
            lambda c: len([f for f in c.data_frames if f.json()["event"]["Seq"] >= base]) >= 1000,
            60,
            "1000 events",
        )
    for c in clients:
        mine = [f for f in c.data_frames if f.json()["event"]["Seq"] >= base]
        assert_exactly_once_in_order(mine, set(range(base, base + 1000)))
        assert c.status == 200
    # The event object reaches the browser unchanged.
    original = crm_event(base, key="agg-0")
    first = next(f for f in clients[0].data_frames if f.json()["event"]["Seq"] == base)
    assert first.json()["event"] == json.loads(original)
    assert first.json()["type"] == "ContactCreated"
    for c in clients:
        await c.stop()


async def _at_least(cluster: Cluster, session: aiohttp.ClientSession, n: float) -> bool:
    return await stream_count(cluster, session) >= n


async def test_resume_on_the_other_edge_after_event_k(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    base = 20_000
    first = Collector(cluster.lb_url("/crm-events")).start(session)
    await first.wait_for(lambda c: c.node is not None, 10, "the stream to open")
    await cluster.produce((None, crm_event(base + i)) for i in range(200))
    await first.wait_for(lambda c: len(c.data_frames) >= 200, 30, "200 events")
    await first.stop()
    k = 120
    kth = first.data_frames[k]
    # Records without a key spread over the partitions, so stream order is not Seq order:
    # what comes after event k is everything the client had not seen by then.
    seen_by_k = {f.json()["event"]["Seq"] for f in first.data_frames[: k + 1]}
    # More events flow while the client is away.
    await cluster.produce((None, crm_event(base + 200 + i)) for i in range(100))
    other = 2 if first.node == "edge-1" else 1
    hits = await ring_hits(session, cluster.edge_url(other, "/metrics"))
    second = Collector(
        cluster.edge_url(other, "/crm-events"), headers={"Last-Event-ID": kth.id or ""}
    ).start(session)
    await second.wait_for(lambda c: len(c.data_frames) >= 300 - k - 1, 30, "events after k")
    assert second.node == f"edge-{other}" and second.node != first.node
    assert all(f.event == "message" for f in second.received), "no reset expected"
    assert_exactly_once_in_order(second.data_frames, set(range(base, base + 300)) - seen_by_k)
    # A recent position: decided and replayed from the edge's memory, not from Redis.
    assert await ring_hits(session, cluster.edge_url(other, "/metrics")) >= hits + 1
    await second.stop()


async def ring_hits(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "crm_events_replay_ring_reads_total" and sample.labels == {
                "outcome": "hit"
            }:
                return float(sample.value)
    raise AssertionError("crm_events_replay_ring_reads_total{outcome='hit'} is not exported")


async def test_resume_through_the_load_balancer_with_query_id(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    base = 30_000
    await cluster.produce((None, crm_event(base + i)) for i in range(50))

    async def history() -> list[dict[str, object]]:
        async with session.get(cluster.lb_url("/crm-events/history?n=50")) as resp:
            items: list[dict[str, object]] = (await resp.json())["items"]
        return items

    async def all_fifty() -> list[dict[str, object]] | None:
        # The answer that had them all: another edge behind the balancer may not have
        # dispatched the newest yet, and its answer would name other cursors.
        items = await history()
        seqs = {i["event"]["Seq"] for i in items}  # type: ignore[index]
        return items if seqs == set(range(base, base + 50)) else None

    items = await eventually(all_fifty, 30, "the 50 events in history")
    assert items is not None
    after = items[9]["cursor"]
    client = Collector(cluster.lb_url(f"/crm-events?last_event_id={after}")).start(session)
    await client.wait_for(lambda c: len(c.data_frames) >= 40, 30, "40 events")
    later = {i["event"]["Seq"] for i in items[10:]}  # type: ignore[index]
    assert_exactly_once_in_order(client.data_frames, later)
    await client.stop()


async def test_history_latest_and_cursor_paging(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    base = 40_000
    types = ["DealWon", "TicketOpened"]
    # One key, so one partition: stream order is Seq order and history order is checkable.
    key = b"deal-history"
    await cluster.produce(
        (key, crm_event(base + i, types[i % 2], "deal-history")) for i in range(250)
    )

    async def tail_is_ours() -> bool:
        async with session.get(cluster.lb_url("/crm-events/history?n=1")) as resp:
            items = (await resp.json())["items"]
        return bool(items) and items[-1]["event"]["Seq"] == base + 249

    await eventually(tail_is_ours, 30, "the last produced event in history")
    async with session.get(cluster.lb_url("/crm-events/history?n=100")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert [i["event"]["Seq"] for i in body["items"]] == list(range(base + 150, base + 250))
    # Each item's cursor stands right after that item in its partition, and the cursors
    # never go back from one item to the next.
    cursors = [decode_cursor(i["cursor"]) for i in body["items"]]
    for item, cursor in zip(body["items"], cursors, strict=True):
        assert cursor.position(item["partition"]) == item["offset"] + 1
    assert_positions_never_go_back(cursors)
    assert body["next_after"] == body["items"][-1]["cursor"]
    assert body["reset"] is None

    # Default n is 100.
    async with session.get(cluster.lb_url("/crm-events/history")) as resp:
        assert (await resp.json())["count"] == 100

    # Page forward from just before our batch, with a type filter, in pages of 30.
    async with session.get(cluster.lb_url("/crm-events/history?n=250")) as resp:
        first = (await resp.json())["items"][0]
    assert first["event"]["Seq"] == base
    # `first` is our first event: its cursor with its partition one record back (at the
    # position before it) includes it; the other partitions stay where that cursor has them.
    after_first = decode_cursor(first["cursor"])
    ours = first["partition"]
    positions = list(after_first.positions)
    positions[ours] = first["offset"]
    cursor = Cursor(after_first.epoch, tuple(positions)).encode().decode()
    seen: list[int] = []
    page_cursors: list[Cursor] = []
    pages = 0
    while True:
        url = f"/crm-events/history?n=30&types=DealWon&after={cursor}"
        async with session.get(cluster.lb_url(url)) as resp:
            assert resp.status == 200
            page = await resp.json()
        pages += 1
        assert page["reset"] is None, "an exact position is not reset"
        if not page["items"]:
            assert page["next_after"] == cursor, "an empty page leaves the cursor where it was"
            break
        seen += [i["event"]["Seq"] for i in page["items"]]
        assert {i["type"] for i in page["items"]} == {"DealWon"}
        page_cursors += [decode_cursor(i["cursor"]) for i in page["items"]]
        assert page["next_after"] == page["items"][-1]["cursor"]
        cursor = page["next_after"]
        assert pages < 20
    mine = [s for s in seen if base <= s < base + 250]
    assert mine == list(range(base, base + 250, 2)), "pages overlap or skip"
    assert len(seen) == len(set(seen))
    assert_positions_never_go_back(page_cursors)


async def test_an_old_single_stream_id_gets_one_reset_then_the_retained_events(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """Upgrade: a Last-Event-ID (or history ``after``) of the old single-stream layout is not
    a 400 but one ``reset`` (``old_format``) of every partition, then the events from the
    oldest retained on; the reset's id is a cursor that resumes without a second reset."""
    base = 45_000
    await cluster.produce((f"agg-{i % 30}".encode(), crm_event(base + i)) for i in range(30))

    async def all_in() -> bool:
        async with session.get(cluster.lb_url("/crm-events/history?n=30")) as resp:
            items = (await resp.json())["items"]
        return {i["event"]["Seq"] for i in items} == set(range(base, base + 30))

    await eventually(all_in, 30, "the 30 events in history")
    partitions = await cluster.partitions()
    legacy = "1700000000000-0"
    async with session.get(cluster.lb_url(f"/crm-events/history?n=1000&after={legacy}")) as resp:
        assert resp.status == 200
        body = await resp.json()
    reset = body["reset"]
    assert reset["reason"] == "old_format"
    assert sorted(p["partition"] for p in reset["partitions"]) == list(range(partitions))
    assert {p["requested"] for p in reset["partitions"]} == {None}
    # Exactly what a cursor with no position in any partition (from the oldest) pages to.
    epoch = decode_cursor(body["next_after"]).epoch
    oldest = Cursor(epoch, (None,) * partitions).encode().decode()
    async with session.get(cluster.lb_url(f"/crm-events/history?n=1000&after={oldest}")) as resp:
        from_oldest = await resp.json()
    assert from_oldest["reset"] is None
    assert body["items"] and body["items"] == from_oldest["items"]
    for p in reset["partitions"]:
        first = next((i for i in body["items"] if i["partition"] == p["partition"]), None)
        assert first is not None and p["oldest_available"] <= first["offset"]

    client = Collector(cluster.lb_url("/crm-events"), headers={"Last-Event-ID": legacy}).start(
        session
    )
    await client.wait_for(
        lambda c: {f.json()["event"]["Seq"] for f in c.data_frames} >= set(range(base, base + 30)),
        30,
        "the retained events after the reset",
    )
    assert client.received[0].event == "reset", "the reset comes before any event"
    assert [f.event for f in client.received].count("reset") == 1
    notice = client.received[0].json()
    assert notice["reason"] == "old_format"
    assert sorted(p["partition"] for p in notice["partitions"]) == list(range(partitions))
    reset_cursor = client.received[0].cursor
    for p in notice["partitions"]:
        assert reset_cursor.position(p["partition"]) == p["oldest_available"]
    assert_cursors_never_go_back(client.received)
    await client.stop()

    # The reset's cursor is a position like any other: resuming from it is exact.
    again = Collector(
        cluster.lb_url("/crm-events"), headers={"Last-Event-ID": client.received[0].id or ""}
    ).start(session)
    await again.wait_for(
        lambda c: len(c.data_frames) >= len(client.data_frames), 30, "the same events again"
    )
    assert not again.resets
    expected: dict[int, list[int]] = defaultdict(list)
    for f in client.data_frames:
        expected[f.json()["partition"]].append(f.json()["offset"])
    assert_per_partition_exactly_once(
        [(f.json()["partition"], f.json()["offset"]) for f in again.data_frames], expected
    )
    await again.stop()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/crm-events/history?n=abc", 400, "invalid_n"),
        ("/crm-events/history?n=0", 400, "invalid_n"),
        ("/crm-events/history?n=1000000000", 400, "invalid_n"),
        ("/crm-events/history?after=yesterday", 400, "invalid_cursor"),
        ("/crm-events/history?types=Deal%20Won", 400, "invalid_types"),
        ("/crm-events?last_event_id=not-an-id", 400, "invalid_cursor"),
        # Version 2 of the cursor, and a version 1 cursor cut short after its epoch.
        ("/crm-events?last_event_id=2.AAAAAQA", 400, "invalid_cursor"),
        ("/crm-events/history?after=1.AAAAAQ", 400, "invalid_cursor"),
        ("/crm-events?types=,", 400, "invalid_types"),
        ("/crm-events/nope", 404, "not_found"),
        ("/definitely/not/here", 404, "not_found"),
    ],
)
async def test_bad_requests_get_json_errors_through_the_lb(
    cluster: Cluster, session: aiohttp.ClientSession, path: str, status: int, code: str
) -> None:
    async with session.get(cluster.lb_url(path)) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


async def test_sse_headers_through_the_lb(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    async with session.get(cluster.lb_url("/crm-events")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b"retry: ")
