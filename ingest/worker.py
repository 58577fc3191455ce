"""The Kafka side of ingest: consume in batches, apply each batch to Redis in one round trip
(one atomic script call per partition), and only then commit the Kafka offsets
(at-least-once from Kafka, exactly-once into Redis: entry ids come from offsets, and each
partition's applied offset is checked inside the script).

The three steps overlap without reordering anything that matters:

* while batch N's scripts run in Redis, batch N+1 is fetched and prepared (CPU here);
  batch N+1 is only sent once N is applied: one batch in flight at a time, so a failed
  batch can never be overtaken by a later one;
* once N is applied (and, with ``CRM_EVENTS_REDIS_WAIT_REPLICAS``, acknowledged by the
  replicas) its offsets are handed to the committer, which commits in the background (one
  commit in flight, at most ten a second, the newest applied offsets per partition, never an
  offset whose batch has not been applied; each commit carries the epoch in its metadata);
* memory stays bounded: at most the batch being applied plus one prepared batch (and
  aiokafka's own fetch buffer). A batch held while Redis is down blocks the next one.

Redis is a cache of Kafka's tail that may lose writes (wipe, restart without persistence,
failover to a lagging replica). Ingest tracks per partition the applied offset it believes
Redis has (``expect``); the script answers ``lost``/``rolled_back`` when Redis holds less,
and the partition is then re-read from Kafka (a *refill*) with the very same entry ids. The
same check runs on assignment, after a Redis error, and when the periodic sampler sees a
partition's state go missing or backwards (so idle partitions are refilled too).

Assignment logic, per partition: state missing -> seek to ``max(log start, committed -
stream maxlen)`` and fill from there (``expect`` -1, ``base`` that position); state present
-> seek to ``min(committed, applied + 1)``, ``expect`` = applied. A partition whose Redis
``applied`` is at or past Kafka's end offset belongs to an older incarnation of the topic
(recreated under the same name): the epoch is swapped for a new one (compare-and-set, so
workers detecting it at once agree on one), every partition's keys are dropped, and every
assigned partition is refilled; a worker that sees the epoch change under it re-syncs its
partitions. Residual: a topic recreated while ingest was down and already grown
past the old offsets is not detected (its offsets look like a continuation)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)

from shared.breaker import CircuitBreaker
from shared.contract import format_commit_metadata, format_epoch, new_epoch, parse_commit_metadata
from shared.errors import RedisUnavailable
from shared.settings import IngestSettings

from .kafka_config import client_options
from .metrics import IngestMetrics
from .records import Packed, Prepared, dead_reason, pack, prepare
from .writer import BatchResult, BatchWriter, PartitionBatch, PartitionResult

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL_S = 2.0
"""Kafka end-offsets probe, stream lengths and the Redis state check, every so often."""
CLOSED_RETRY_S = 0.2
"""Pause between retries while the circuit is still closed (below its failure threshold)."""
PROBE_TIMEOUT_S = 5.0
EPOCH_LOOKUP_ATTEMPTS = 5
EPOCH_LOOKUP_BACKOFF_S = 0.2
EPOCH_LOOKUP_BACKOFF_MAX_S = 2.0
"""The group's commits are read for the epoch up to this often before the worker gives up
this round (and starts over, not ready, through the Kafka circuit breaker)."""
PREPARE_SLICE = 100
"""Records prepared between two yields to the event loop (under a millisecond of CPU): the
batch in flight is written to Redis meanwhile, and health checks and metrics are answered
even during a batch of ``CRM_EVENTS_INGEST_BATCH_MAX_RECORDS`` = 100,000."""
COMMIT_INTERVAL_S = 0.1
"""The shortest time between two offset commits. Each commit is a write to Kafka's offsets
topic: one after every batch cost the broker about 2 µs of CPU per event under a backlog
(bench D), for nothing: after a crash, at most this much more is re-read, and the script
skips it."""
CLOSE_COMMIT_TIMEOUT_S = 2.0
"""Longest wait for the last commit when partitions are revoked or the consumer stops."""


@dataclass(slots=True)
class _Partition:
    """What ingest believes about one assigned partition's copy in Redis."""

    expect: int = -1
    """Applied offset Redis should hold; -1 = none yet (a fresh fill)."""
    base: int = 0
    """Start position of a fresh fill (sent while ``expect`` is -1)."""
    generation: int = 0
    """Changes at every seek: records prepared under another generation are dropped."""
    decided: bool = False
    """Where to read it from was decided (``_sync`` sought it). Records fetched before that
    come from wherever the consumer started (the committed offset), which is not what
    ``expect``/``base`` describe: they are never applied."""
    refill_until: int = -1
    """Records below this offset applied now are re-applied ones (a refill is running)."""
    prev: int = -1
    """The pv the next prepared event gets: where Redis's chain of events will stand once
    the batches prepared so far are applied (-1: not known). Only a guess that saves the
    script work (see ``pack``): it corrects itself at the next batch with an event."""


@dataclass(slots=True)
class _Group:
    """One partition's records of a fetched batch, prepared and packed."""

    tp: TopicPartition
    generation: int
    records: list[Prepared]
    packed: Packed
    next_offset: int


class _Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: IngestWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._worker.joined = False
        await self._worker.flush_commits()
        for tp in revoked:
            self._worker.forget_partition(tp)
        if revoked:
            log.info(
                "partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)}
            )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)}
        )
        # Before the first fetch of these partitions: where to read from depends on what
        # Redis holds.
        await self._worker.on_assigned(assigned)
        self._worker.joined = True


class IngestWorker:
    def __init__(
        self,
        settings: IngestSettings,
        writer: BatchWriter,
        metrics: IngestMetrics,
        kafka_breaker: CircuitBreaker,
        redis_breaker: CircuitBreaker,
        consumer_factory: Callable[[], AIOKafkaConsumer] | None = None,
    ) -> None:
        self._s = settings
        self._writer = writer
        self._metrics = metrics
        self._consumer_factory = consumer_factory or self._default_consumer
        self.kafka = kafka_breaker
        self.redis = redis_breaker
        self.joined = False
        self.kafka_answered = False
        self.epoch: int | None = None
        """The topic incarnation's epoch (``<prefix>:meta`` and every commit's metadata)."""
        self._partition_count = settings.kafka_partitions
        self._lag_partitions: set[int] = set()
        self._length_partitions: set[int] = set()
        self._committer: _Committer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[int, _Partition] = {}
        self._unsynced: set[TopicPartition] = set()
        """Assigned partitions paused until their Redis state could be read."""
        self._suspects: set[TopicPartition] = set()
        """Partitions whose Redis state the sampler saw missing or behind (checked again
        between batches)."""
        self._generations = itertools.count(1)

    @property
    def ready(self) -> bool:
        return self.joined and self.kafka_answered and self.kafka.closed and self.redis.closed

    def _default_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self._s.kafka_bootstrap,
            group_id=self._s.kafka_group,
            client_id=self._s.node_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._s.batch_max_records,
            **client_options(self._s.kafka_security),
        )

    async def flush_commits(self) -> None:
        """Commit what was applied before partitions are taken away (best effort: a failed
        commit only costs a re-read that the script skips)."""
        if self._committer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committer.flush(), CLOSE_COMMIT_TIMEOUT_S)

    def forget_partition(self, tp: TopicPartition) -> None:
        if self._committer is not None:
            self._committer.forget(tp)
        self._parts.pop(tp.partition, None)
        self._unsynced.discard(tp)
        self._suspects.discard(tp)
        if tp.partition in self._lag_partitions:
            self._metrics.lag.remove(tp.topic, str(tp.partition))
            self._lag_partitions.discard(tp.partition)
        if tp.partition in self._length_partitions:
            self._metrics.stream_length.remove(str(tp.partition))
            self._length_partitions.discard(tp.partition)

    async def ensure_topic(self) -> tuple[int, int | None]:
        """Create the topic if needed; returns its partition count and the epoch found in
        the group's committed offsets' metadata (None when the lookup answered and no
        commit carries one). Raises KafkaError when the lookup keeps failing."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._s.kafka_bootstrap,
            client_id=self._s.node_id,
            **client_options(self._s.kafka_security),
        )
        await admin.start()
        try:
            topic = self._s.kafka_topic
            topics = await admin.list_topics()
            if topic not in topics:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(
                                topic,
                                num_partitions=self._s.kafka_partitions,
                                replication_factor=self._s.kafka_replication_factor,
                            )
                        ]
                    )
                    log.info(
                        "created topic",
                        extra={"topic": topic, "partitions": self._s.kafka_partitions},
                    )
                except TopicAlreadyExistsError:
                    pass
            count = self._s.kafka_partitions
            with contextlib.suppress(KafkaError, KeyError, IndexError, TypeError):
                described = await admin.describe_topics([topic])
                count = len(described[0]["partitions"]) or count
            epoch = await committed_epoch(
                functools.partial(admin.list_consumer_group_offsets, self._s.kafka_group), topic
            )
            return count, epoch
        finally:
            await admin.close()

    async def run(self) -> None:
        """Consume until cancelled, riding out Kafka outages through the circuit breaker."""
        while True:
            delay = self.kafka.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                count, kafka_epoch = await self.ensure_topic()
                self._partition_count = count
                await self._until_redis(functools.partial(self._resolve_epoch, kafka_epoch))
                await self._consume()
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:
                self.joined = False
                self.kafka.failure()
                self._metrics.backend_errors.labels(backend="kafka").inc()
                log.warning("kafka unavailable, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(max(self.kafka.wait_s(), CLOSED_RETRY_S))

    async def _redis_down(self, exc: RedisUnavailable, message: str, *, logged: bool) -> None:
        """One failed Redis step: logged once per outage, counted, then the breaker's wait."""
        if not logged:
            log.warning(message, extra={"error": str(exc)})
        self.redis.failure()
        self._metrics.backend_errors.labels(backend="redis").inc()
        await asyncio.sleep(max(self.redis.wait_s(), CLOSED_RETRY_S))

    async def _until_redis(self, step: Callable[[], Awaitable[T]]) -> T:
        held = False
        while True:
            delay = self.redis.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                result = await step()
            except RedisUnavailable as exc:
                await self._redis_down(exc, "redis unavailable; waiting", logged=held)
                held = True
                continue
            self.redis.success()
            return result

    async def _resolve_epoch(self, kafka_epoch: int | None) -> None:
        """Redis's epoch, else the one in the group's commit metadata (a wiped Redis gets
        the same epoch back), else a new one; written where there is none, read back so
        that several fresh workers agree."""
        held = await self._writer.read_epoch()
        if held is not None:
            epoch = held
        elif self.epoch is not None:
            epoch = self.epoch
        elif kafka_epoch is not None:
            epoch = kafka_epoch
        else:
            epoch = new_epoch()
        self.epoch = await self._writer.write_meta(self._partition_count, epoch)
        log.info("epoch", extra={"epoch": format_epoch(self.epoch)})

    async def _consume(self) -> None:
        consumer = self._consumer = self._consumer_factory()
        self._parts.clear()
        self._unsynced.clear()
        self._suspects.clear()
        consumer.subscribe([self._s.kafka_topic], listener=_Assignment(self))
        await consumer.start()
        log.info(
            "consumer started", extra={"topic": self._s.kafka_topic, "group": self._s.kafka_group}
        )
        committer = self._committer = _Committer(consumer, self._metrics, self._commit_metadata)
        inflight: asyncio.Task[None] | None = None
        # Beside the loop, not in it: an end-offsets round trip inline would hold back
        # every record that arrives meanwhile (it showed as the p99 of Kafka -> Redis).
        prober = asyncio.create_task(self._probe_loop(consumer), name="ingest-kafka-probe")
        try:
            while True:
                if self._unsynced or self._suspects:
                    if inflight is not None:
                        await inflight
                        inflight = None
                    await self._settle()
                batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                    timeout_ms=self._s.poll_timeout_ms, max_records=self._s.batch_max_records
                )
                if batches:
                    # Stamped with the partitions' generations at once (no await since the
                    # fetch): a seek after this point makes these records stale.
                    stamped = self._stamp(batches)
                    # Prepared while the previous batch's scripts run in Redis: the
                    # preparation yields between slices, so the task applying that batch
                    # gets its pipelines written out instead of waiting for the whole
                    # preparation (that made the two steps take turns: bench D).
                    prepared = await self._prepare(stamped)
                    if inflight is not None:
                        await inflight  # applied (retried until Redis took it) and accounted
                    inflight = asyncio.create_task(self._apply(prepared, committer))
                    # Let it send its scripts now, before this loop takes the next records
                    # out of aiokafka's buffer (CPU, without a yield).
                    await asyncio.sleep(0)
                elif inflight is not None and inflight.done():
                    await inflight  # surfaces an unexpected error
                    inflight = None
                elif inflight is None and committer.holding:
                    # Idle with commits held for replicas: ask again without a new batch.
                    inflight = asyncio.create_task(self._release_held(committer))
                # The session's helpers never end on their own; if one does, end the session
                # with its error: the supervisor (shared/tasks.py) reports and restarts it.
                if prober.done():
                    await prober
                    raise RuntimeError("the Kafka probe stopped")
                committer.check()
        finally:
            self.joined = False
            prober.cancel()
            await asyncio.wait([prober])
            if inflight is not None:
                # Not committed: a batch cut short is re-read and the script skips what it
                # had applied.
                inflight.cancel()
                await asyncio.wait([inflight])
            await committer.close()
            self._committer = None
            self._consumer = None
            await consumer.stop()

    def _commit_metadata(self) -> str | None:
        return None if self.epoch is None else format_commit_metadata(self.epoch)

    # -- preparing and applying ---------------------------------------------------------------

    def _stamp(
        self, batches: dict[TopicPartition, list[Any]]
    ) -> list[tuple[TopicPartition, int, list[Any]]]:
        """Each assigned partition's records with the partition's generation now."""
        parts = self._parts
        stamped = []
        for tp, records in batches.items():
            part = parts.get(tp.partition)
            if part is not None and part.decided and records:
                stamped.append((tp, part.generation, records))
        return stamped

    async def _prepare(self, stamped: list[tuple[TopicPartition, int, list[Any]]]) -> list[_Group]:
        s = self._s
        max_bytes, type_fields, match_fields = s.event_max_bytes, s.type_fields, s.match_fields
        groups = []
        for tp, generation, records in stamped:
            prepared: list[Prepared] = []
            for start in range(0, len(records), PREPARE_SLICE):
                if start:
                    await asyncio.sleep(0)
                prepared.extend(
                    prepare(
                        r, max_bytes=max_bytes, type_fields=type_fields, match_fields=match_fields
                    )
                    for r in records[start : start + PREPARE_SLICE]
                )
            # The pv chain goes on from the partition's guess only if no seek came between.
            part = self._parts.get(tp.partition)
            if part is not None and part.generation != generation:
                part = None
            packed = pack(prepared, -1 if part is None else part.prev)
            if part is not None:
                part.prev = packed.prev
            groups.append(_Group(tp, generation, prepared, packed, records[-1].offset + 1))
            await asyncio.sleep(0)
        return groups

    def _current(self, group: _Group) -> bool:
        """The group was read from the partition's current position (no seek since)."""
        part = self._parts.get(group.tp.partition)
        return part is not None and part.decided and part.generation == group.generation

    async def _apply(self, groups: list[_Group], committer: _Committer) -> None:
        sent, expects, result = await self._apply_until_done(groups)
        if not result.acked:
            self._metrics.wait_timeouts.inc()
        commits: dict[TopicPartition, int] = {}
        refill: list[tuple[TopicPartition, str]] = []
        for group in sent:
            r = result.partitions.get(group.tp.partition)
            if r is None:
                continue
            if r.status != "ok":
                refill.append((group.tp, r.status))
                continue
            part = self._parts.get(group.tp.partition)
            current = part is not None and part.generation == group.generation
            self._account(group, r, part.refill_until if part is not None and current else -1)
            if part is not None and current:
                self._note_applied(part, group, expects[group.tp.partition], r)
            commits[group.tp] = group.next_offset
        committer.add(commits, acked=result.acked)
        for tp, status in refill:
            await self._refill([tp], status)

    async def _apply_until_done(
        self, groups: list[_Group]
    ) -> tuple[list[_Group], dict[int, int], BatchResult]:
        """Retry the same batch until Redis takes it: nothing is committed to Kafka before.
        Memory stays bounded: no new batch is fetched while this one is held. After a
        Redis error the partitions are checked again (the Redis that answers now may hold
        less than the one that failed) before the batch is sent again."""
        held = False
        while True:
            delay = self.redis.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            started = time.perf_counter()
            try:
                if held:
                    await self._after_reconnect()
                groups = [g for g in groups if self._current(g)]
                expects = {}
                batches = []
                for g in groups:
                    part = self._parts[g.tp.partition]
                    expects[g.tp.partition] = part.expect
                    batches.append(
                        PartitionBatch(
                            g.tp.partition, g.packed, len(g.records), part.expect, part.base
                        )
                    )
                result = await self._writer.apply(batches)
            except RedisUnavailable as exc:
                await self._redis_down(exc, "redis unavailable; holding the batch", logged=held)
                held = True
                continue
            if held:
                log.info("redis is back; batch applied")
            self.redis.success()
            if batches:
                self._metrics.batch_seconds.observe(time.perf_counter() - started)
            return groups, expects, result

    def _account(self, group: _Group, result: PartitionResult, refill_until: int) -> None:
        """``refill_until``: records below it are re-applied by a refill (-1: none)."""
        m = self._metrics
        m.records.labels(outcome="written").inc(result.written)
        m.records.labels(outcome="duplicate").inc(result.duplicates)
        m.records.labels(outcome="dead").inc(result.dead)
        m.messages.inc(result.written)
        m.last_applied.set(time.time())
        if result.dead:
            # Only records that were not duplicates reached the dead stream; count those.
            dead = [(p, reason) for p in group.records if (reason := dead_reason(p)) is not None]
            for p, reason in dead[-result.dead :]:
                if p[1] < refill_until:
                    # Written again because Redis lost it, but counted and logged when it
                    # was first applied: one dead letter, one count.
                    continue
                m.dead_letters.labels(reason=reason.value).inc()
                log.warning(
                    "dead letter",
                    extra={
                        "reason": reason.value,
                        "partition": p[0],
                        "offset": p[1],
                        "detail": p[4].decode("utf-8", "replace"),
                    },
                )

    def _note_applied(
        self, part: _Partition, group: _Group, expected: int, result: PartitionResult
    ) -> None:
        until = part.refill_until
        if until > expected + 1:
            refilled = sum(1 for p in group.records if expected < p[1] < until)
            if refilled:
                self._metrics.refilled_records.labels(str(group.tp.partition)).inc(refilled)
            if result.applied + 1 >= until:
                part.refill_until = -1
                log.info("refill done", extra={"partition": group.tp.partition})
        part.expect = max(part.expect, result.applied)

    async def _release_held(self, committer: _Committer) -> None:
        try:
            acked = await self._writer.wait_acked(sorted(self._parts))
        except RedisUnavailable as exc:
            log.debug("waiting for replicas failed", extra={"error": str(exc)})
            return
        if acked:
            committer.add({}, acked=True)
        else:
            self._metrics.wait_timeouts.inc()

    # -- where to read from: assignment, refills, checks ------------------------------------

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        tps = sorted(assigned)
        for tp in tps:
            self._parts.setdefault(tp.partition, _Partition())
            self._metrics.export_partition(tp.partition)
        # Paused (and undecided) before the first await: aiokafka may already hand out
        # records fetched from the committed offset while the listener runs, and applied
        # as a fresh fill from 0 they would make the stream look complete with a hole in it.
        self._hold(tps)
        try:
            await self._sync(tps, None)
        except (RedisUnavailable, KafkaError, IllegalStateError, TimeoutError) as exc:
            # Raised from the listener it would only be logged by aiokafka.
            log.warning(
                "could not read the partitions' state; they wait",
                extra={"error": repr(exc), "partitions": [tp.partition for tp in tps]},
            )
            self._defer(tps)

    def _defer(self, tps: Iterable[TopicPartition]) -> None:
        """Pause partitions whose position could not be decided: nothing is fetched for
        them until ``_settle`` decides it."""
        listed = list(tps)
        self._hold(listed)
        self._unsynced.update(listed)

    def _hold(self, tps: Iterable[TopicPartition]) -> None:
        """Undecided and paused: nothing of these partitions is fetched or applied until
        ``_sync`` seeks them."""
        consumer = self._consumer
        held = []
        for tp in tps:
            part = self._parts.setdefault(tp.partition, _Partition())
            part.generation = next(self._generations)
            part.prev = -1
            part.decided = False
            held.append(tp)
        if consumer is not None and held:
            with contextlib.suppress(IllegalStateError):
                consumer.pause(*[tp for tp in held if tp in consumer.assignment()])

    async def _settle(self) -> None:
        """Between batches: decide paused partitions' positions, and check suspects."""
        if self.redis.wait_s() > 0:
            return
        consumer = self._consumer
        assigned = consumer.assignment() if consumer is not None else set()
        try:
            unsynced = sorted(tp for tp in self._unsynced if tp in assigned)
            self._unsynced.difference_update(set(self._unsynced) - set(unsynced))
            if unsynced:
                await self._sync(unsynced, None)
            suspects = sorted(tp for tp in self._suspects if tp in assigned)
            self._suspects.clear()
            if suspects:
                await self._verify(suspects)
        except (RedisUnavailable, KafkaError, TimeoutError) as exc:
            self.redis.failure()
            log.warning("could not check partitions in Redis", extra={"error": repr(exc)})
            return
        self.redis.success()

    def _resync_others(self, but: Iterable[TopicPartition]) -> None:
        """Decide again where every other assigned partition is read from (the topic's
        keys were dropped or its epoch changed under them)."""
        consumer = self._consumer
        if consumer is None:
            return
        skip = set(but)
        others = [tp for tp in consumer.assignment() if tp not in skip]
        if others:
            self._defer(others)

    async def _after_reconnect(self) -> None:
        """Redis answered again after an error: it may be another server (failover) or an
        empty one (restart): write the meta hash again and check every partition."""
        self.epoch = await self._writer.write_meta(
            self._partition_count, self.epoch if self.epoch is not None else new_epoch()
        )
        consumer = self._consumer
        if consumer is None:
            return
        tps = sorted(tp for tp in consumer.assignment() if tp not in self._unsynced)
        if tps:
            await self._verify(tps)

    async def _verify(self, tps: list[TopicPartition]) -> None:
        """Refill the partitions whose state Redis lost or rolled back."""
        states = await self._writer.read_states([tp.partition for tp in tps])
        lost: list[TopicPartition] = []
        rolled: list[TopicPartition] = []
        for tp in tps:
            part = self._parts.get(tp.partition)
            if part is None:
                continue
            state = states.get(tp.partition)
            if state is None:
                if part.expect != -1:
                    lost.append(tp)
            elif state.applied < part.expect:
                rolled.append(tp)
        if lost:
            await self._refill(lost, "lost")
        if rolled:
            await self._refill(rolled, "rolled_back")

    async def _refill(self, tps: list[TopicPartition], reason: str) -> None:
        try:
            await self._sync(tps, reason)
        except (RedisUnavailable, KafkaError, TimeoutError) as exc:
            log.warning(
                "could not decide where to refill from; the partitions wait",
                extra={"error": repr(exc), "partitions": [tp.partition for tp in tps]},
            )
            self._defer(tps)

    async def _sync(self, tps: list[TopicPartition], cause: str | None) -> None:
        """The assignment logic: seek each partition to where Redis needs it read from."""
        consumer = self._consumer
        if consumer is None or not tps:
            return
        writer = self._writer
        # The order matters while another member still applies (a rebalance): commits
        # follow applies and Kafka's end offsets only grow, so reading the commits, then
        # Redis, then the end offsets gives committed <= applied + 1 <= end unless Redis
        # really lost writes (or the topic is another one). Any other order can see a batch
        # that lands in between as a rollback, or even as a recreated topic.
        committed: dict[TopicPartition, int | None] = {}
        for tp in tps:
            committed[tp] = await asyncio.wait_for(consumer.committed(tp), PROBE_TIMEOUT_S)
        starts: dict[TopicPartition, int] = await asyncio.wait_for(
            consumer.beginning_offsets(tps), PROBE_TIMEOUT_S
        )
        states = await writer.read_states([tp.partition for tp in tps])
        ends: dict[TopicPartition, int] = await asyncio.wait_for(
            consumer.end_offsets(tps), PROBE_TIMEOUT_S
        )
        recreated = [
            tp
            for tp in tps
            if (state := states.get(tp.partition)) is not None and state.applied >= ends[tp]
        ]
        if recreated:
            # Redis holds offsets Kafka never reached: the topic was deleted and created
            # again under the same name. A new epoch makes every edge reset its clients;
            # compare-and-set against the epoch this worker knew, so that several workers
            # detecting it at once agree on one new epoch (one reset, not one per worker).
            # Every partition of the old incarnation goes, not only the ones seen here: the
            # others hold old offsets too (their owners notice the new epoch and re-sync).
            old = self.epoch
            self.epoch, known = await writer.new_incarnation(old, new_epoch())
            count = max(self._partition_count, known, *(tp.partition + 1 for tp in tps))
            await writer.delete_partitions(range(count))
            for tp in tps:
                states[tp.partition] = None
            self._resync_others(tps)
            log.warning(
                "topic recreated: new epoch, every partition rebuilt",
                extra={
                    "epoch": format_epoch(self.epoch),
                    "previous": None if old is None else format_epoch(old),
                    "detected_in": [tp.partition for tp in recreated],
                    "partitions": count,
                },
            )
        maxlen = writer.stream_maxlen
        assignment = consumer.assignment()
        for tp in tps:
            if tp not in assignment:
                continue  # revoked meanwhile
            part = self._parts.setdefault(tp.partition, _Partition())
            start, end = starts[tp], ends[tp]
            c = committed[tp]
            # No commit yet: the start, as auto_offset_reset=earliest would.
            c = start if c is None else min(max(c, start), end)
            reached = max(part.expect + 1, c)
            state = states.get(tp.partition)
            reason: str | None
            if state is None:
                position = max(start, c - maxlen)
                part.expect, part.base, part.prev = -1, position, position
                reason = cause or "assigned"
                counted = cause is not None or position < reached
            else:
                position = min(c, state.applied + 1)
                part.expect, part.base, part.prev = state.applied, state.base, state.last
                reason = cause or ("rolled_back" if state.applied + 1 < c else None)
                counted = reason is not None
            consumer.seek(tp, position)
            part.generation = next(self._generations)
            part.decided = True
            self._suspects.discard(tp)
            self._unsynced.discard(tp)
            # Paused by ``_hold`` while undecided (resuming a partition that is not paused
            # changes nothing).
            consumer.resume(tp)
            if self._committer is not None:
                self._committer.drop_held(tp)
            if counted and reason is not None:
                part.refill_until = reached
                self._metrics.refills.labels(str(tp.partition), reason).inc()
                log.warning(
                    "refilling a partition from Kafka",
                    extra={
                        "partition": tp.partition,
                        "reason": reason,
                        "from": position,
                        "until": reached,
                    },
                )
            else:
                part.refill_until = -1

    # -- the probe ------------------------------------------------------------------------------

    async def _probe_loop(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            # While the circuit is open the Kafka probe waits for its half-open turn.
            wait = self.kafka.wait_s()
            if wait <= 0:
                await self._probe(consumer)
            await self._sample(consumer)
            await asyncio.sleep(PROBE_INTERVAL_S if wait <= 0 else min(wait, PROBE_INTERVAL_S))

    async def _sample(self, consumer: AIOKafkaConsumer) -> None:
        """Stream lengths per partition, the meta hash again (a wiped Redis gets it back
        within seconds), and the check that Redis still holds what ingest believes: a
        partition that gets no records would otherwise not notice a loss."""
        assigned = {tp.partition: tp for tp in consumer.assignment()}
        known = consumer.partitions_for_topic(self._s.kafka_topic)
        if known:
            self._partition_count = max(self._partition_count, len(known))
        try:
            if self.epoch is not None:
                held = await self._writer.write_meta(self._partition_count, self.epoch)
                if held != self.epoch:
                    # Another worker saw the topic recreated and dropped its keys: what
                    # this worker believes about its partitions is of the old incarnation.
                    log.warning(
                        "another worker changed the epoch; following it, partitions re-synced",
                        extra={"epoch": format_epoch(held)},
                    )
                    self.epoch = held
                    self._resync_others(())
            samples = await self._writer.sample(sorted(assigned))
        except RedisUnavailable:
            return
        for p, (length, applied) in samples.items():
            self._metrics.stream_length.labels(str(p)).set(length)
            self._length_partitions.add(p)
            part = self._parts.get(p)
            tp = assigned[p]
            if part is None or tp in self._unsynced:
                continue
            if (applied is None and part.expect != -1) or (
                applied is not None and applied < part.expect
            ):
                self._suspects.add(tp)

    async def _probe(self, consumer: AIOKafkaConsumer) -> None:
        """Ask the brokers for the end offsets of our partitions: proves Kafka answers (the
        consumer itself retries silently while a broker is down, returning empty batches)
        and gives the consumer lag per partition."""
        assigned = list(consumer.assignment())
        try:
            if assigned:
                ends: dict[TopicPartition, int] = await asyncio.wait_for(
                    consumer.end_offsets(assigned), PROBE_TIMEOUT_S
                )
            else:
                await asyncio.wait_for(consumer.topics(), PROBE_TIMEOUT_S)
                ends = {}
        except (KafkaError, TimeoutError) as exc:
            if self.kafka.closed:
                log.warning("kafka does not answer", extra={"error": repr(exc)})
            self.kafka.failure()
            self._metrics.backend_errors.labels(backend="kafka").inc()
            return
        self.kafka_answered = True
        self.kafka.success()
        for tp, end in ends.items():
            try:
                position = await asyncio.wait_for(consumer.position(tp), PROBE_TIMEOUT_S)
            except (IllegalStateError, TimeoutError, KafkaError):
                continue  # revoked by a rebalance, or no position yet
            self._metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - position))
            self._lag_partitions.add(tp.partition)


async def committed_epoch(
    lookup: Callable[[], Awaitable[Mapping[TopicPartition, Any]]],
    topic: str,
    *,
    attempts: int = EPOCH_LOOKUP_ATTEMPTS,
    backoff_s: float = EPOCH_LOOKUP_BACKOFF_S,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int | None:
    """The epoch in the metadata of the group's commits on ``topic``; None only when the
    lookup answered and no commit carries one.

    A failed lookup is not "no epoch": after a broker restart the group coordinator answers
    COORDINATOR_LOAD_IN_PROGRESS for a while, and taking a new epoch then (with Redis empty)
    would reset every client for nothing. So the lookup is retried with backoff, and when
    it still fails the error goes up: the worker stays not ready and starts over."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            committed = await asyncio.wait_for(lookup(), PROBE_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            if attempt == attempts:
                if isinstance(exc, KafkaError):
                    raise
                raise KafkaTimeoutError("looking up the committed epoch timed out") from exc
            log.warning(
                "could not read the group's commits; retrying",
                extra={"error": repr(exc), "attempt": attempt},
            )
            await sleep(delay)
            delay = min(delay * 2, EPOCH_LOOKUP_BACKOFF_MAX_S)
            continue
        for tp, meta in committed.items():
            if tp.topic == topic and (found := parse_commit_metadata(meta.metadata)) is not None:
                return found
        return None
    raise AssertionError("unreachable")


class _Committer:
    """Commits applied offsets in the background: one commit in flight, always the newest
    applied offset per partition. Only offsets of applied batches are ever handed in.

    With ``WAIT``, a batch that fewer replicas acknowledged is *held*: its offsets are
    committed once a later ``WAIT`` succeeds (replication is in order, so that later
    acknowledgement covers the earlier writes), or dropped when its partition is refilled
    (Redis lost those writes; the refill re-applies them)."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        metrics: IngestMetrics,
        metadata: Callable[[], str | None],
    ) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._metadata = metadata
        self._pending: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="ingest-committer")

    @staticmethod
    def _merge(into: dict[TopicPartition, int], offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if offset > into.get(tp, -1):
                into[tp] = offset

    def add(self, offsets: dict[TopicPartition, int], *, acked: bool = True) -> None:
        if not acked:
            self._merge(self._held, offsets)
            return
        if self._held:
            self._merge(self._pending, self._held)
            self._held = {}
        self._merge(self._pending, offsets)
        if self._pending:
            self._wake.set()

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def drop_held(self, tp: TopicPartition) -> None:
        self._held.pop(tp, None)

    def forget(self, tp: TopicPartition) -> None:
        self._pending.pop(tp, None)
        self._held.pop(tp, None)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            offsets, self._pending = self._pending, {}
            assigned = self._consumer.assignment()
            metadata = self._metadata() or ""
            to_commit = {tp: (o, metadata) for tp, o in offsets.items() if tp in assigned}
            if not to_commit:
                return
            try:
                await self._consumer.commit(to_commit)
            except KafkaError as exc:
                # The batches are in Redis; after a rebalance the new owner re-reads them
                # and the offset check skips every record, so a failed commit only costs a
                # re-read.
                self._metrics.backend_errors.labels(backend="kafka").inc()
                log.warning(
                    "offset commit failed; records will be re-read and skipped",
                    extra={"error": repr(exc)},
                )

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # One odd failure must not stop every later commit; later commits carry
                # newer offsets, and a lost one only costs a re-read the script skips.
                log.exception("offset commit failed unexpectedly")
            await asyncio.sleep(COMMIT_INTERVAL_S)

    def check(self) -> None:
        """Raise what ended the background task, if it ended (it never should)."""
        if self._task.done():
            self._task.result()
            raise RuntimeError("the offset committer stopped")

    async def close(self) -> None:
        """Stop the background task, then commit what is still pending (bounded wait)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_COMMIT_TIMEOUT_S)
