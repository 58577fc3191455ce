"""The capped stream with in-band reset, and slow-client disconnects, on a deployment with
small limits (dead letters: test_dead_letters.py)."""

from __future__ import annotations

import json
import socket

import aiohttp
import pytest

from shared.contract import FIELD_PREV, position_of
from shared.cursor import Cursor, decode_cursor
from tests.harness.cluster import Cluster, crm_event
from tests.integration.checks import assert_exactly_once_in_order, metric
from tests.sse_client import Collector, assert_cursors_never_go_back
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)


async def test_trimmed_position_gets_reset_then_the_retained_events(
    small_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    c = small_cluster
    base = 50_000
    # One key, one partition: the last entry of its stream is then the last event produced.
    metadata = await c.produce((b"trim", crm_event(base + i, key="trim")) for i in range(600))
    (p,) = {m.partition for m in metadata}
    stream = c.keys.stream(p)
    redis = c.redis()
    try:

        async def all_in() -> bool:
            last = await redis.xrevrange(stream, count=1)
            return bool(last) and json.loads(last[0][1][b"d"])["event"]["Seq"] == base + 599

        await eventually(all_in, 30, "the 600 events in the partition's stream")
        length = await redis.xlen(stream)
        ((first_id, first_fields),) = await redis.xrange(stream, count=1)
    finally:
        await redis.aclose()
    # MAXLEN ~ 100 trims whole radix-tree nodes, so the stream stays near, not at, 100.
    assert 100 <= length < 300, f"stream not capped: {length} entries"
    first_position = position_of(first_id)
    # The oldest retained entry names the position right after the event before it (pv):
    # everything from there up to it was trimmed, nothing after.
    oldest_available = int(first_fields[FIELD_PREV.encode()])
    assert oldest_available < first_position

    # History past the cap is refused; at the cap it returns what the streams retain.
    async with session.get(c.lb_url("/crm-events/history?n=1001")) as resp:
        assert resp.status == 400
    async with session.get(c.lb_url("/crm-events/history?n=1000")) as resp:
        latest = await resp.json()
    assert latest["count"] == await c.stream_length()
    # The cursor after the newest event: every partition at its top.
    tops = decode_cursor(latest["next_after"])

    # A position in our partition well before the retained window (right after its first
    # record), every other partition at its top: only our partition is reset.
    stale = Cursor(tops.epoch, tuple(1 if q == p else x for q, x in enumerate(tops.positions)))
    client = Collector(
        c.lb_url("/crm-events"), headers={"Last-Event-ID": stale.encode().decode()}
    ).start(session)
    await client.wait_for(lambda col: len(col.data_frames) >= length, 30, "the retained events")
    assert client.received[0].event == "reset"
    reset = client.received[0].json()
    assert reset["reason"] == "trimmed"
    assert reset["partitions"] == [
        {
            "partition": p,
            "requested": 1,
            "oldest_available": oldest_available,
            "reason": "trimmed",
        }
    ]
    # The reset's id is the cursor delivery continues from: ours at the oldest available,
    # the others where they were.
    assert client.received[0].cursor == stale.advanced(p, oldest_available)
    retained = client.data_frames[:length]
    assert retained[0].json()["partition"] == p
    assert retained[0].json()["offset"] + 1 == first_position
    assert_exactly_once_in_order(retained, {f.json()["event"]["Seq"] for f in retained})
    assert {f.json()["partition"] for f in retained} == {p}
    assert retained[-1].json()["event"]["Seq"] == base + 599
    assert_cursors_never_go_back(client.received)
    await client.stop()

    # Resuming from the reset's cursor is exact: no second reset, the same events.
    again = Collector(
        c.lb_url("/crm-events"), headers={"Last-Event-ID": client.received[0].id or ""}
    ).start(session)
    await again.wait_for(lambda col: len(col.data_frames) >= length, 30, "the retained events")
    assert not again.resets
    assert [f.data for f in again.data_frames[:length]] == [f.data for f in retained]
    await again.stop()

    # History answers a trimmed `after` the same way, in its body.
    url = f"/crm-events/history?n=1000&after={stale.encode().decode()}"
    async with session.get(c.lb_url(url)) as resp:
        assert resp.status == 200
        paged = await resp.json()
    assert paged["reset"]["partitions"] == reset["partitions"]
    assert [i["event"]["Seq"] for i in paged["items"]] == [
        f.json()["event"]["Seq"] for f in retained
    ]


async def test_a_client_that_stops_reading_is_disconnected_as_slow(
    small_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    c = small_cluster
    edge_metrics = c.edge_url(1, "/metrics")
    slow_before = await metric(
        session, edge_metrics, "crm_events_sse_disconnects_total", reason="slow"
    )
    # A raw socket with a tiny receive window that never reads after the request.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", c.edge_ports[0]))
    sock.sendall(b"GET /crm-events HTTP/1.1\r\nHost: x\r\n\r\n")
    healthy = Collector(c.edge_url(1, "/crm-events")).start(session)
    await healthy.wait_for(lambda col: col.node is not None, 10, "the healthy stream")
    base = 60_000
    filler = "y" * 3000
    try:
        for chunk in range(30):
            await c.produce(
                (
                    None,
                    json.dumps(
                        {"Type": "Bulk", "Seq": base + chunk * 200 + i, "F": filler}
                    ).encode(),
                )
                for i in range(200)
            )
            if (
                await metric(
                    session, edge_metrics, "crm_events_sse_disconnects_total", reason="slow"
                )
                > slow_before
            ):
                break

        async def slow_counted() -> bool:
            value = await metric(
                session, edge_metrics, "crm_events_sse_disconnects_total", reason="slow"
            )
            return value > slow_before

        await eventually(slow_counted, 30, "a slow-client disconnect")
    finally:
        sock.close()
    produced = chunk * 200 + 200
    await healthy.wait_for(
        lambda col: (
            len([f for f in col.data_frames if f.json()["event"]["Seq"] >= base]) >= produced
        ),
        60,
        "every event on the healthy client",
    )
    mine = [f for f in healthy.data_frames if f.json()["event"]["Seq"] >= base]
    assert_exactly_once_in_order(mine, set(range(base, base + produced)))
    await healthy.stop()
