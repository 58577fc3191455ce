"""The Kafka side of ingest: consume in batches, apply each batch to Redis in one atomic
step, and only then commit the Kafka offsets (at-least-once from Kafka, exactly-once into
Redis thanks to the offset check inside the step).

The three steps overlap without reordering anything that matters:

* while batch N's script runs in Redis, batch N+1 is fetched and prepared (CPU here);
  batch N+1 is only sent once N is applied: one script in flight at a time, so a failed
  batch can never be overtaken by a later one (whose higher offsets would make the script
  skip it);
* once N is applied its offsets are handed to the committer, which commits in the
  background (one commit in flight, the newest applied offsets per partition, never an
  offset whose batch has not been applied);
* memory stays bounded: at most the batch being applied plus one prepared batch (and
  aiokafka's own fetch buffer). A batch held while Redis is down blocks the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IllegalStateError, KafkaError, TopicAlreadyExistsError

from shared.breaker import CircuitBreaker
from shared.errors import RedisUnavailable
from shared.settings import IngestSettings

from .kafka_config import client_options
from .metrics import IngestMetrics
from .records import Prepared, dead_reason, pack, prepare
from .writer import ApplyResult, BatchWriter

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
CLOSED_RETRY_S = 0.2
"""Pause between retries while the circuit is still closed (below its failure threshold)."""
PROBE_TIMEOUT_S = 5.0
CLOSE_COMMIT_TIMEOUT_S = 2.0
"""Longest wait for the last commit when partitions are revoked or the consumer stops."""


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
        self._worker.joined = True
        log.info(
            "partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)}
        )


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
        self._lag_partitions: set[int] = set()
        self._committer: _Committer | None = None

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
        if tp.partition in self._lag_partitions:
            self._metrics.lag.remove(tp.topic, str(tp.partition))
            self._lag_partitions.discard(tp.partition)

    async def ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._s.kafka_bootstrap,
            client_id=self._s.node_id,
            **client_options(self._s.kafka_security),
        )
        await admin.start()
        try:
            topics = await admin.list_topics()
            if self._s.kafka_topic in topics:
                return
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            self._s.kafka_topic,
                            num_partitions=self._s.kafka_partitions,
                            replication_factor=self._s.kafka_replication_factor,
                        )
                    ]
                )
                log.info(
                    "created topic",
                    extra={"topic": self._s.kafka_topic, "partitions": self._s.kafka_partitions},
                )
            except TopicAlreadyExistsError:
                pass
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
                await self.ensure_topic()
                await self._consume()
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:
                self.joined = False
                self.kafka.failure()
                self._metrics.backend_errors.labels(backend="kafka").inc()
                log.warning("kafka unavailable, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(max(self.kafka.wait_s(), CLOSED_RETRY_S))

    async def _consume(self) -> None:
        consumer = self._consumer_factory()
        consumer.subscribe([self._s.kafka_topic], listener=_Assignment(self))
        await consumer.start()
        log.info(
            "consumer started", extra={"topic": self._s.kafka_topic, "group": self._s.kafka_group}
        )
        committer = self._committer = _Committer(consumer, self._metrics)
        inflight: asyncio.Task[None] | None = None
        # Beside the loop, not in it: an end-offsets round trip inline would hold back
        # every record that arrives meanwhile (it showed as the p99 of Kafka -> Redis).
        prober = asyncio.create_task(self._probe_loop(consumer), name="ingest-kafka-probe")
        try:
            while True:
                batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                    timeout_ms=self._s.poll_timeout_ms, max_records=self._s.batch_max_records
                )
                if batches:
                    # Prepared while the previous batch's script runs in Redis.
                    prepared = self._prepare(batches)
                    offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
                    if inflight is not None:
                        await inflight  # applied (retried until Redis took it) and accounted
                    inflight = asyncio.create_task(self._apply(prepared, offsets, committer))
                    # Let it send its script before this loop goes on preparing the next batch.
                    await asyncio.sleep(0)
                elif inflight is not None and inflight.done():
                    await inflight  # surfaces an unexpected error
                    inflight = None
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
            await consumer.stop()

    def _prepare(self, batches: dict[TopicPartition, list[Any]]) -> list[Prepared]:
        s = self._s
        max_bytes, type_fields, match_fields = s.event_max_bytes, s.type_fields, s.match_fields
        return [
            prepare(r, max_bytes=max_bytes, type_fields=type_fields, match_fields=match_fields)
            for records in batches.values()
            for r in records
        ]

    async def _apply(
        self, prepared: list[Prepared], offsets: dict[TopicPartition, int], committer: _Committer
    ) -> None:
        result = await self._apply_until_done(pack(prepared), len(prepared))
        self._account(prepared, result)
        committer.add(offsets)

    async def _apply_until_done(self, blob: bytes, count: int) -> ApplyResult:
        """Retry the same batch until Redis takes it: nothing is committed to Kafka before.
        Memory stays bounded: no new batch is fetched while this one is held."""
        held = False
        while True:
            delay = self.redis.wait_s()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            started = time.perf_counter()
            try:
                result = await self._writer.apply_packed(blob, count)
            except RedisUnavailable as exc:
                if not held:
                    log.warning("redis unavailable; holding the batch", extra={"error": str(exc)})
                held = True
                self.redis.failure()
                self._metrics.backend_errors.labels(backend="redis").inc()
                await asyncio.sleep(max(self.redis.wait_s(), CLOSED_RETRY_S))
                continue
            if held:
                log.info("redis is back; batch applied")
            self.redis.success()
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            return result

    def _account(self, prepared: list[Prepared], result: ApplyResult) -> None:
        m = self._metrics
        m.records.labels(outcome="written").inc(result.written)
        m.records.labels(outcome="duplicate").inc(result.duplicates)
        m.records.labels(outcome="dead").inc(result.dead)
        m.messages.inc(result.written)
        m.last_applied.set(time.time())
        if result.dead:
            # Only records that were not duplicates reached the dead stream; count those.
            dead = [(p, reason) for p in prepared if (reason := dead_reason(p)) is not None]
            for p, reason in dead[-result.dead :]:
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

    async def _probe_loop(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            # While the circuit is open the probe waits for its half-open turn.
            wait = self.kafka.wait_s()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._probe(consumer)
            await asyncio.sleep(PROBE_INTERVAL_S)

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


class _Committer:
    """Commits applied offsets in the background: one commit in flight, always the newest
    applied offset per partition. Only offsets of applied batches are ever handed in."""

    def __init__(self, consumer: AIOKafkaConsumer, metrics: IngestMetrics) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._pending: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="ingest-committer")

    def add(self, offsets: dict[TopicPartition, int]) -> None:
        pending = self._pending
        for tp, offset in offsets.items():
            if offset > pending.get(tp, -1):
                pending[tp] = offset
        self._wake.set()

    def forget(self, tp: TopicPartition) -> None:
        self._pending.pop(tp, None)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            offsets, self._pending = self._pending, {}
            assigned = self._consumer.assignment()
            offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
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
