"""Assertions shared by the integration tests: exactly-once, order, id monotonicity."""

from __future__ import annotations

import itertools
from collections import defaultdict

from shared.ids import parse_id
from tests.sse_client import Frame


def assert_exactly_once_in_order(frames: list[Frame], expected_seqs: set[int]) -> None:
    """Every expected event once; ids strictly increasing; per-partition offsets and
    per-key sequence numbers increasing."""
    envelopes = [f.json() for f in frames]
    seqs = [e["event"]["Seq"] for e in envelopes]
    dupes = len(seqs) - len(set(seqs))
    missing = expected_seqs - set(seqs)
    extra = set(seqs) - expected_seqs
    assert not dupes, f"{dupes} events arrived twice"
    assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"unexpected events {sorted(extra)[:5]}"
    ids = [parse_id(f.id or "") for f in frames]
    assert all(a < b for a, b in itertools.pairwise(ids)), "ids do not strictly increase"
    by_partition: dict[int, list[int]] = defaultdict(list)
    by_key: dict[str, list[int]] = defaultdict(list)
    for e in envelopes:
        by_partition[e["partition"]].append(e["offset"])
        if e.get("key") is not None:  # unkeyed records have no per-key order to keep
            by_key[e["key"]].append(e["event"]["Seq"])
    for partition, offsets in by_partition.items():
        assert offsets == sorted(offsets), f"partition {partition} out of order"
    for key, key_seqs in by_key.items():
        assert key_seqs == sorted(key_seqs), f"key {key} out of order"
