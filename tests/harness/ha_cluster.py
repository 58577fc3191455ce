"""What the Redis fault proofs (failover, a wiped Redis, chaos) share: a :class:`Cluster` whose
Redis may be a Sentinel group, a paced producer that remembers where Kafka put every event,
cursor-aware browser-like clients that can be made to drop and resume, and the checks that
Redis ends holding each event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from shared.contract import RedisKeys, position_of
from tests.sse_client import (
    Frame,
    assert_cursors_never_go_back,
    assert_per_partition_exactly_once,
    frames,
)

from .backends import Backends, SentinelGroup
from .cluster import Cluster, crm_event

INVALID_RECORD = b"not json at all"


def with_redis(backends: Backends, redis_url: str, origin: str) -> Backends:
    """The same Kafka, another Redis (a private server or a Sentinel group's URL)."""
    return Backends(backends.kafka_bootstrap, redis_url, origin)


class HACluster(Cluster):
    """A :class:`Cluster` whose Redis URL may be ``redis+sentinel://`` or ``redis+cluster://``:
    its own Redis client follows a failover like the services' do."""

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.prefix)

    async def ingest_metric(self, name: str, i: int = 1, **labels: str) -> float:
        """The sum of one metric's samples on ``ingest<i>``'s /metrics that carry ``labels``
        (0 when there are none)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.ingest_url(i, "/metrics")) as resp,
        ):
            text = await resp.text()
        return metric_sum(text, name, **labels)


def metric_sum(text: str, name: str, **labels: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(m.group(2))
        for m in pattern.finditer(text)
        if all(w in (m.group(1) or "") for w in wanted)
    )


# -- producing ---------------------------------------------------------------------------------


class PacedProducer:
    """Sends ``total`` sequenced events at ``rate`` per second (and an invalid record every
    ``invalid_every`` events when asked), remembering the partition and offset Kafka gave each
    event. Pausable (a broker restart)."""

    def __init__(
        self, cluster: Cluster, total: int, rate: float, invalid_every: int = 0, tick: int = 50
    ) -> None:
        self.cluster = cluster
        self.total = total
        self.rate = rate
        self.invalid_every = invalid_every
        self.tick = tick
        self.sent = 0
        self.invalid = 0
        self.expected: dict[int, list[int]] = defaultdict(list)
        """Per partition, the offsets of the valid events, in order."""
        self.seq_at: dict[tuple[int, int], int] = {}
        self.running = asyncio.Event()
        self.running.set()
        self.idle = asyncio.Event()
        self.paused_s = 0.0
        self.done = False
        self.elapsed_s = 0.0

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.cluster.backends.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        await producer.start()
        t0 = time.monotonic()
        try:
            started = time.monotonic()
            while self.sent < self.total:
                if not self.running.is_set():
                    paused_at = time.monotonic()
                    await producer.flush()
                    self.idle.set()
                    await self.running.wait()
                    self.idle.clear()
                    self.paused_s += time.monotonic() - paused_at
                    started = time.monotonic() - self.sent / self.rate
                batch = range(self.sent, min(self.sent + self.tick, self.total))
                pending: list[tuple[int, Any]] = []
                for seq in batch:
                    key = f"agg-{seq % 30}".encode()
                    pending.append(
                        (seq, await producer.send(self.cluster.topic, crm_event(seq), key=key))
                    )
                    if self.invalid_every and seq % self.invalid_every == self.invalid_every - 1:
                        await producer.send(self.cluster.topic, INVALID_RECORD, key=b"bad")
                        self.invalid += 1
                for seq, future in pending:
                    meta = await future
                    self.expected[meta.partition].append(meta.offset)
                    self.seq_at[(meta.partition, meta.offset)] = seq
                self.sent = batch.stop
                # Pace to the target rate: the schedule, not a guess about readiness.
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            self.elapsed_s = time.monotonic() - t0
            self.done = True
            self.idle.set()
            await producer.stop()
        for offsets in self.expected.values():
            offsets.sort()

    @property
    def achieved_rate(self) -> float:
        active = self.elapsed_s - self.paused_s
        return self.sent / active if active > 0 else 0.0

    async def pause(self) -> None:
        self.running.clear()
        await asyncio.wait_for(self.idle.wait(), 60)

    def resume(self) -> None:
        self.running.set()

    def end_positions(self) -> dict[int, int]:
        """Per partition, the position right after its last event."""
        return {p: offsets[-1] + 1 for p, offsets in self.expected.items() if offsets}


# -- clients -----------------------------------------------------------------------------------


@dataclass
class CursorClient:
    """A browser-like SSE client: reconnects after every error or end of stream with the last
    id it saw as ``Last-Event-ID`` (the cursor), as EventSource does. :meth:`drop` cuts its
    stream (it resumes at once); :meth:`go_away` / :meth:`come_back` keep it away for a while,
    so it resumes with an old cursor."""

    url: str
    name: str = ""
    retry_s: float = 0.25
    frames: list[Frame] = field(default_factory=list)
    """Every data frame, in arrival order."""
    deliveries: list[tuple[int, int]] = field(default_factory=list)
    """(partition, offset) of every data frame, in arrival order."""
    resets: list[dict[str, Any]] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    """Per partition, the position after the last event received."""
    connects: int = 0
    failures: int = 0
    last_id: str | None = None
    resume_times_s: list[float] = field(default_factory=list)
    """Per reconnect: from losing the stream to the new stream being open."""
    history: list[str] = field(default_factory=list)
    """What happened to the connection, for the failure message."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _away: asyncio.Event = field(default_factory=asyncio.Event)
    _resp: aiohttp.ClientResponse | None = None
    _task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> CursorClient:
        self._task = asyncio.create_task(self._run(session))
        return self

    def drop(self) -> None:
        """Cut the current stream; the client resumes after its retry delay."""
        self.history.append(f"{time.monotonic():.3f} drop at {self.positions}")
        if self._resp is not None:
            self._resp.close()

    @property
    def connected(self) -> bool:
        return self._resp is not None

    def go_away(self) -> None:
        self._away.set()
        self.drop()

    def come_back(self) -> None:
        self._away.clear()

    async def _run(self, session: aiohttp.ClientSession) -> None:
        lost_at: float | None = None
        while not self._stop.is_set():
            while self._away.is_set() and not self._stop.is_set():
                await asyncio.sleep(0.02)
                lost_at = None  # time away is not resume time
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            try:
                async with session.get(
                    self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=5)
                ) as resp:
                    self._resp = resp
                    self.history.append(
                        f"{time.monotonic():.3f} status {resp.status} at {self.positions} "
                        f"after {len(self.deliveries)} events"
                    )
                    if resp.status != 200:
                        self.failures += 1
                    else:
                        self.connects += 1
                        if lost_at is not None:
                            self.resume_times_s.append(time.monotonic() - lost_at)
                            lost_at = None
                        comments: list[str] = []
                        async for frame in frames(resp, comments):
                            if frame.id:
                                self.last_id = frame.id
                            if frame.event == "reset":
                                self.resets.append(json.loads(frame.data))
                                continue
                            envelope = frame.json()
                            partition, offset = envelope["partition"], envelope["offset"]
                            self.frames.append(frame)
                            self.deliveries.append((partition, offset))
                            self.positions[partition] = offset + 1
                        self.history.append(f"  served by {comments[:1]}")
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                self.failures += 1
                self.history.append(f"{time.monotonic():.3f} {exc!r}")
            finally:
                self._resp = None
            if lost_at is None:
                lost_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.retry_s)

    def reached(self, ends: dict[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= end for p, end in ends.items())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check_exact(self, expected: dict[int, list[int]]) -> None:
        """Every event exactly once, in per-partition order, no reset, each id a cursor that
        never goes back and stands right after its own event."""
        assert not self.resets, f"{self.name}: {len(self.resets)} reset(s): {self.resets[:2]}"
        try:
            assert_per_partition_exactly_once(self.deliveries, expected, self.name)
        except AssertionError:
            print(f"{self.name}:", *self.history, sep="\n  ")
            raise
        assert_cursors_never_go_back(self.frames)
        for frame, (partition, offset) in zip(self.frames, self.deliveries, strict=True):
            assert frame.cursor.position(partition) == offset + 1, (
                f"{self.name}: the id of partition {partition} offset {offset} is not the "
                "position after it"
            )


# -- Redis -------------------------------------------------------------------------------------


async def stream_offsets(redis: Redis, keys: RedisKeys, partitions: int) -> dict[int, list[int]]:
    """Per partition, the offsets of the stream's entries in stream order (an entry's id is
    the position after its offset)."""
    out: dict[int, list[int]] = {}
    for p in range(partitions):
        rows = await redis.xrange(keys.stream(p))
        offsets = []
        for entry_id, fields in rows:
            offset = position_of(entry_id) - 1
            envelope = json.loads(fields[b"d"])
            assert (envelope["partition"], envelope["offset"]) == (p, offset), (
                f"entry {entry_id!r} of partition {p} holds {envelope['partition']}/"
                f"{envelope['offset']}"
            )
            offsets.append(offset)
        out[p] = offsets
    return out


def assert_streams_hold_each_once(
    got: dict[int, list[int]], expected: dict[int, list[int]], from_position: dict[int, int]
) -> None:
    """Each partition's stream holds every expected event at or after ``from_position`` once
    (and nothing else)."""
    for p, want in expected.items():
        offsets = got.get(p, [])
        assert len(offsets) == len(set(offsets)), f"partition {p}: an offset twice in the stream"
        tail = [o for o in want if o >= from_position.get(p, 0)]
        assert offsets == tail, (
            f"partition {p}: the stream holds {len(offsets)} entries, expected {len(tail)}; "
            f"missing e.g. {sorted(set(tail) - set(offsets))[:5]}, "
            f"extra e.g. {sorted(set(offsets) - set(tail))[:5]}"
        )


async def replication_lag(group: SentinelGroup) -> int:
    """Bytes the primary has written that its replica has not acknowledged."""
    node = group.direct(group.primary_name)
    try:
        info = await node.info("replication")
    finally:
        await node.aclose()
    acked = [int(v["offset"]) for k, v in info.items() if k.startswith("slave") and "offset" in v]
    return int(info["master_repl_offset"]) - (min(acked) if acked else 0)
