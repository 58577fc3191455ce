"""ingest.worker.committed_epoch: the epoch a wiped Redis gets back from the group's commit
metadata. A failed lookup must never read as "no epoch" (that would start a new topic
incarnation and reset every client)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CoordinatorLoadInProgressError
from aiokafka.structs import OffsetAndMetadata

from ingest.worker import committed_epoch
from shared.contract import format_commit_metadata

TOPIC = "crm.events"


class Lookup:
    """Answers like list_consumer_group_offsets after ``failures`` failed calls."""

    def __init__(self, failures: int, answer: Mapping[TopicPartition, Any]) -> None:
        self.failures = failures
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> Mapping[TopicPartition, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise CoordinatorLoadInProgressError()
        return self.answer


def commits(epoch: int | None) -> dict[TopicPartition, Any]:
    meta = "" if epoch is None else format_commit_metadata(epoch)
    return {
        TopicPartition("other.topic", 0): OffsetAndMetadata(5, format_commit_metadata(7)),
        TopicPartition(TOPIC, 0): OffsetAndMetadata(10, meta),
    }


async def test_a_failing_lookup_is_retried_with_backoff_until_it_answers() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    lookup = Lookup(3, commits(0xDEADBEEF))
    epoch = await committed_epoch(lookup, TOPIC, attempts=5, backoff_s=0.2, sleep=sleep)
    assert epoch == 0xDEADBEEF
    assert lookup.calls == 4
    assert slept == [0.2, 0.4, 0.8]


async def test_a_lookup_that_keeps_failing_raises_instead_of_answering_none() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    lookup = Lookup(100, commits(0xDEADBEEF))
    with pytest.raises(CoordinatorLoadInProgressError):
        await committed_epoch(lookup, TOPIC, attempts=4, backoff_s=0.5, sleep=sleep)
    assert lookup.calls == 4
    assert slept == [0.5, 1.0, 2.0]


async def test_none_only_when_the_lookup_answered_without_an_epoch() -> None:
    assert await committed_epoch(Lookup(0, commits(None)), TOPIC) is None
    assert await committed_epoch(Lookup(0, {}), TOPIC) is None, "no commits yet"
    assert await committed_epoch(Lookup(0, commits(0)), TOPIC) == 0, "epoch 0 is an epoch"
