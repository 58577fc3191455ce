"""Dead letters, the capped stream with in-band reset, and slow-client disconnects, on a
deployment with small limits."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.cluster import Cluster, crm_event
from tests.integration.checks import assert_exactly_once_in_order
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with session.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_invalid_records_become_dead_letters_and_the_pipeline_goes_on(
    small_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    c = small_cluster
    client = Collector(c.lb_url("/crm-events")).start(session)
    await client.wait_for(lambda col: col.node is not None, 10, "the stream to open")
    bad = [
        (b"k", b"this is not json", "not_json"),
        (b"k", b"\xff\xfe\x00garbage", "not_utf8"),
        (b"k", b'{"Type":"Big","Blob":"' + b"x" * 5000 + b'"}', "too_large"),
        (b"k", b"[1,2,3]", "not_object"),
        (b"k", b'{"NoType":true}', "missing_type"),
        (b"k", b'{"Type":"has space"}', "bad_type"),
    ]
    metadata = await c.produce([(k, v) for k, v, _ in bad] + [(b"k", crm_event(1, "DealWon"))])
    await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, "the valid event")
    assert [f.json()["event"]["Seq"] for f in client.data_frames] == [1]

    redis = c.redis()
    try:
        rows = await eventually(lambda: redis.xrange(c.dead_key), 15, "dead letters")
    finally:
        await redis.aclose()
    assert len(rows) == len(bad)
    by_reason = {fields[b"reason"].decode(): fields for _, fields in rows}
    assert set(by_reason) == {reason for _, _, reason in bad}
    for (_, value, reason), meta in zip(bad, metadata, strict=False):
        fields = by_reason[reason]
        assert int(fields[b"offset"]) == meta.offset
        assert int(fields[b"partition"]) == meta.partition
        assert fields[b"topic"].decode() == c.topic
        assert fields[b"detail"]
        # The raw value is kept (up to the size limit) so nothing is lost.
        assert fields[b"value"] == value[:4096]

    ingest_metrics = c.ingest_url(1, "/metrics")
    for _, _, reason in bad:
        assert (
            await metric(session, ingest_metrics, "crm_events_dead_letters_total", reason=reason)
            == 1
        )
    assert (
        await metric(session, ingest_metrics, "crm_events_ingest_records_total", outcome="dead")
        == 6
    )
    async with session.get(c.ingest_url(1, "/readyz")) as resp:
        assert resp.status == 200, "ingest keeps running after dead letters"
    await client.stop()


async def test_trimmed_position_gets_reset_then_the_retained_events(
    small_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    c = small_cluster
    base = 50_000
    # One key, one partition: the last stream entry is then the last event produced.
    await c.produce((b"trim", crm_event(base + i, key="trim")) for i in range(600))
    redis = c.redis()
    try:

        async def all_in() -> bool:
            last = await redis.xrevrange(c.stream_key, count=1)
            return bool(last) and json.loads(last[0][1][b"d"])["event"]["Seq"] == base + 599

        await eventually(all_in, 30, "the 600 events in the stream")
        length = await redis.xlen(c.stream_key)
        first_id = (await redis.xrange(c.stream_key, count=1))[0][0].decode()
    finally:
        await redis.aclose()
    # MAXLEN ~ 100 trims whole radix-tree nodes, so the stream stays near, not at, 100.
    assert 100 <= length < 300, f"stream not capped: {length} entries"

    # History past the cap is refused; at the cap it returns what the stream retains.
    async with session.get(c.lb_url("/crm-events/history?n=1001")) as resp:
        assert resp.status == 400
    async with session.get(c.lb_url("/crm-events/history?n=1000")) as resp:
        assert (await resp.json())["count"] == length

    # A position well before the retained window: trimmed.
    stale = "1-0"
    client = Collector(c.lb_url("/crm-events"), headers={"Last-Event-ID": stale}).start(session)
    await client.wait_for(lambda col: len(col.data_frames) >= length, 30, "the retained events")
    assert client.received[0].event == "reset"
    reset = client.received[0].json()
    assert reset["reason"] in ("trimmed", "stream_lost")
    assert reset["requested"] == stale
    assert reset["oldest_available"] == first_id
    assert client.received[0].id == reset["resume_from"]
    retained = client.data_frames[:length]
    assert retained[0].id == first_id
    assert_exactly_once_in_order(retained, {f.json()["event"]["Seq"] for f in retained})
    assert retained[-1].json()["event"]["Seq"] == base + 599
    await client.stop()


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
