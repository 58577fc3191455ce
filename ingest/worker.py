"""The Kafka side of ingest: consume in batches, apply each batch to Redis in one atomic
step, and only then commit the Kafka offsets (at-least-once from Kafka, exactly-once into
Redis thanks to the offset check inside the step)."""

from __future__ import annotations

import asyncio
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
from .records import Prepared, RawRecord, prepare
from .writer import ApplyResult, BatchWriter

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
CLOSED_RETRY_S = 0.2
"""Pause between retries while the circuit is still closed (below its failure threshold)."""
PROBE_TIMEOUT_S = 5.0


class _Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: IngestWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._worker.joined = False
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

    def forget_partition(self, tp: TopicPartition) -> None:
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
        next_probe = 0.0
        try:
            while True:
                batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                    timeout_ms=self._s.poll_timeout_ms, max_records=self._s.batch_max_records
                )
                if batches:
                    await self._handle(consumer, batches)
                now = time.monotonic()
                # While the circuit is open the probe waits for its half-open turn.
                if now >= next_probe and self.kafka.wait_s() == 0:
                    next_probe = now + PROBE_INTERVAL_S
                    await self._probe(consumer)
        finally:
            self.joined = False
            await consumer.stop()

    async def _handle(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]
    ) -> None:
        prepared: list[Prepared] = []
        for records in batches.values():
            for r in records:
                prepared.append(
                    prepare(
                        RawRecord(r.partition, r.offset, r.timestamp, r.key, r.value),
                        max_bytes=self._s.event_max_bytes,
                        type_fields=self._s.type_fields,
                        match_fields=self._s.match_fields,
                    )
                )
        result = await self._apply_until_done(prepared)
        self._account(prepared, result)
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # The batch is in Redis; after a rebalance the new owner re-reads it and the
            # offset check skips every record, so a failed commit only costs a re-read.
            self._metrics.backend_errors.labels(backend="kafka").inc()
            log.warning(
                "offset commit failed; records will be re-read and skipped",
                extra={"error": repr(exc)},
            )

    async def _apply_until_done(self, prepared: list[Prepared]) -> ApplyResult:
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
                result = await self._writer.apply(prepared)
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
            dead = [p for p in prepared if p.dead_reason is not None]
            counted = dead[-result.dead :]
            for p in counted:
                assert p.dead_reason is not None
                m.dead_letters.labels(reason=p.dead_reason.value).inc()
                log.warning(
                    "dead letter",
                    extra={
                        "reason": p.dead_reason.value,
                        "partition": p.partition,
                        "offset": p.offset,
                        "detail": p.f2.decode("utf-8", "replace"),
                    },
                )

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
