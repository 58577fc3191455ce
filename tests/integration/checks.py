"""Assertions shared by the integration tests: exactly-once, order, cursor monotonicity."""

from __future__ import annotations

from collections import defaultdict

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.sse_client import Frame, assert_cursors_never_go_back


def assert_exactly_once_in_order(frames: list[Frame], expected_seqs: set[int]) -> None:
    """Every expected event once; per-partition offsets and per-key sequence numbers
    increasing; each id a cursor that never goes back in any partition and stands right
    after its own event in that event's partition."""
    envelopes = [f.json() for f in frames]
    seqs = [e["event"]["Seq"] for e in envelopes]
    dupes = len(seqs) - len(set(seqs))
    missing = expected_seqs - set(seqs)
    extra = set(seqs) - expected_seqs
    assert not dupes, f"{dupes} events arrived twice"
    assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"unexpected events {sorted(extra)[:5]}"
    assert_cursors_never_go_back(frames)
    by_partition: dict[int, list[int]] = defaultdict(list)
    by_key: dict[str, list[int]] = defaultdict(list)
    for frame, e in zip(frames, envelopes, strict=True):
        partition, offset = e["partition"], e["offset"]
        assert frame.cursor.position(partition) == offset + 1, (
            f"the id of partition {partition} offset {offset} is not the position after it"
        )
        by_partition[partition].append(offset)
        if e.get("key") is not None:  # unkeyed records have no per-key order to keep
            by_key[e["key"]].append(e["event"]["Seq"])
    for partition, offsets in by_partition.items():
        assert offsets == sorted(offsets), f"partition {partition} out of order"
    for key, key_seqs in by_key.items():
        assert key_seqs == sorted(key_seqs), f"key {key} out of order"


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus page at ``url`` (0 when it is absent)."""
    async with session.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
