"""Dead letters: every invalid record is kept in its partition's dead-letter stream with
topic/partition/offset/reason/detail/value, counted by reason, and the pipeline goes on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from shared.contract import RedisKeys
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event
from tests.harness.ha_cluster import HACluster
from tests.integration.checks import metric
from tests.sse_client import Collector
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def small_events(
    redis_backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One edge, no load balancer, a small event size limit (in each Redis mode)."""
    c = HACluster(
        Path(tmp_path_factory.mktemp("dead")),
        redis_backends,
        edges=1,
        with_nginx=False,
        env={"CRM_EVENTS_EVENT_MAX_BYTES": "4096"},
    )
    with c.running():
        yield c


async def test_invalid_records_become_dead_letters_and_the_pipeline_goes_on(
    small_events: Cluster, session: aiohttp.ClientSession
) -> None:
    c = small_events
    keys = RedisKeys(c.prefix)
    partitions = await c.partitions()
    client = Collector(c.edge_url(1, "/crm-events")).start(session)
    await client.wait_for(lambda col: col.node is not None, 10, "the stream to open")
    bad = [
        (b"k1", b"this is not json", "not_json"),
        (b"k2", b"\xff\xfe\x00garbage", "not_utf8"),
        (b"k3", b'{"Type":"Big","Blob":"' + b"x" * 5000 + b'"}', "too_large"),
        (b"k4", b"[1,2,3]", "not_object"),
        (b"k5", b'{"NoType":true}', "missing_type"),
        (b"k6", b'{"Type":"has space"}', "bad_type"),
    ]
    metadata = await c.produce([(k, v) for k, v, _ in bad] + [(b"k", crm_event(1, "DealWon"))])
    await client.wait_for(lambda col: len(col.data_frames) >= 1, 30, "the valid event")
    assert [f.json()["event"]["Seq"] for f in client.data_frames] == [1]

    redis = c.redis()
    try:

        async def dead_letters() -> dict[int, list[dict[bytes, bytes]]] | None:
            found = {
                p: [fields for _, fields in await redis.xrange(keys.dead(p))]
                for p in range(partitions)
            }
            return found if sum(len(v) for v in found.values()) >= len(bad) else None

        by_partition = await eventually(dead_letters, 15, "dead letters")
    finally:
        await redis.aclose()
    assert sum(len(rows) for rows in by_partition.values()) == len(bad)
    for (_, value, reason), meta in zip(bad, metadata, strict=False):
        # In the dead stream of the record's own partition (same slot as its stream).
        (fields,) = [f for f in by_partition[meta.partition] if f[b"reason"] == reason.encode()]
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
