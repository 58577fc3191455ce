"""The atomic Redis step of one batch (adapter over redis-py): one ``apply_partition.lua``
call per partition, all of a batch's calls in one pipeline round trip, and, when replicas
must acknowledge, ``WAIT`` at the end of the same pipeline (``WAIT`` counts the writes of
its own connection, so it has to travel with the scripts)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Final, Literal

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from shared.contract import (
    DEAD_FIELDS,
    EVENT_FIELDS,
    META_EPOCH,
    META_PARTITIONS,
    META_TOPIC,
    STATE_APPLIED,
    STATE_FIELDS,
    ContractError,
    PartitionState,
    RedisKeys,
    format_epoch,
    parse_epoch,
    parse_state,
)
from shared.errors import RedisUnavailable

from .records import Prepared, group, pack

SCRIPT_NAME: Final = "apply_partition.lua"
_SCRIPT = files("shared").joinpath(SCRIPT_NAME).read_text(encoding="utf-8")
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
_FIELD_NAMES: Final = (*EVENT_FIELDS, *DEAD_FIELDS, *STATE_FIELDS)
"""ARGV[9..22]: the script takes its field names from the contract."""

_SWAP_EPOCH: Final = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if (held or '') == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  held = ARGV[3]
end
return {held, redis.call('HGET', KEYS[1], ARGV[4]) or ''}
"""
"""Compare-and-set of the meta hash's epoch; answers the epoch held after it and the
partition count the meta hash records."""

Status = Literal["ok", "lost", "rolled_back"]
STATUSES: Final[tuple[Status, ...]] = ("ok", "lost", "rolled_back")


@dataclass(frozen=True, slots=True)
class PartitionBatch:
    """One partition's records of a batch, packed, with what ingest believes Redis holds."""

    partition: int
    blob: bytes
    count: int
    expect: int
    """The applied offset ingest believes this Redis has; -1 for a fresh fill."""
    base: int = 0
    """The fill's start position (recorded when the script creates the state)."""


@dataclass(frozen=True, slots=True)
class PartitionResult:
    status: Status
    written: int
    duplicates: int
    dead: int
    applied: int
    """The partition's applied offset after the call (for ``rolled_back``: what Redis has;
    -1 for ``lost``)."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    partitions: dict[int, PartitionResult]
    acked: bool
    """Enough replicas acknowledged the writes (always True when no ``WAIT`` is asked)."""
    replicas: int | None
    """What ``WAIT`` answered; None when it was not asked."""


class BatchWriter:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        topic: str,
        stream_maxlen: int,
        dead_maxlen: int,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
    ) -> None:
        self._redis = redis
        self.keys = keys
        self.topic = topic
        self.stream_maxlen = stream_maxlen
        self.wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._head: tuple[int | str, ...] = (stream_maxlen, dead_maxlen, topic)

    def _call_args(self, batch: PartitionBatch) -> list[Any]:
        p = batch.partition
        k = self.keys
        return [
            _SHA,
            4,
            k.stream(p),
            k.state(p),
            k.dead(p),
            k.live(p),
            *self._head,
            p,
            batch.expect,
            batch.base,
            batch.count,
            batch.blob,
            *_FIELD_NAMES,
        ]

    async def apply(self, batches: Sequence[PartitionBatch]) -> BatchResult:
        """Apply every partition's records in one round trip (plus ``WAIT`` when asked)."""
        if not batches:
            return BatchResult({}, True, None)
        try:
            raw = await self._run(batches)
            missing = [i for i, r in enumerate(raw[: len(batches)]) if _no_script(r)]
            if missing:
                # First call on this server (restart, failover, SCRIPT FLUSH): load it and
                # send again the calls that did not run; the others are not repeated.
                await self._redis.script_load(_SCRIPT)
                again = await self._run([batches[i] for i in missing])
                for i, value in zip(missing, again, strict=False):
                    raw[i] = value
                if self.wait_replicas:
                    raw[-1] = again[-1]
        except RedisError as exc:
            raise RedisUnavailable(f"applying a batch failed: {exc}") from exc
        results: dict[int, PartitionResult] = {}
        for batch, value in zip(batches, raw, strict=False):
            if isinstance(value, Exception):
                raise RedisUnavailable(
                    f"applying partition {batch.partition} failed: {value}"
                ) from value
            results[batch.partition] = _result(value)
        if not self.wait_replicas:
            return BatchResult(results, True, None)
        replicas = _replicas(raw[-1])
        return BatchResult(results, replicas >= self.wait_replicas, replicas)

    async def _run(self, batches: Sequence[PartitionBatch]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for batch in batches:
            pipe.execute_command("EVALSHA", *self._call_args(batch))
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self._wait_timeout_ms)
        return list(await pipe.execute(raise_on_error=False))

    async def apply_records(
        self, partition: int, records: Iterable[Prepared], *, expect: int = -1, base: int = 0
    ) -> PartitionResult:
        """One partition's records in one call (tests, tools)."""
        listed = list(records)
        if any(p[0] != partition for p in listed):
            raise ValueError("every record must be of the given partition")
        batch = PartitionBatch(partition, pack(listed), len(listed), expect, base)
        result = await self.apply([batch])
        return result.partitions[partition]

    async def apply_grouped(
        self, records: Iterable[Prepared], expect: dict[int, int] | None = None
    ) -> dict[int, PartitionResult]:
        """Records of any partitions, grouped (tests, tools); ``expect`` per partition,
        -1 (fresh fill from position 0) when not given."""
        expect = expect or {}
        batches = [
            PartitionBatch(p, pack(rs), len(rs), expect.get(p, -1), 0)
            for p, rs in group(records).items()
        ]
        return (await self.apply(batches)).partitions

    async def wait_acked(self) -> bool:
        """A harmless write and ``WAIT`` on one connection: True when the replicas hold
        everything written before it (replication is in order, so this covers earlier
        batches whose own ``WAIT`` timed out)."""
        if not self.wait_replicas:
            return True
        try:
            pipe = self._redis.pipeline(transaction=False)
            # HSET always propagates, even with the same value: it moves this connection's
            # replication offset past every earlier write, which is what WAIT waits for.
            pipe.hset(self.keys.meta, META_TOPIC, self.topic)
            pipe.execute_command("WAIT", self.wait_replicas, self._wait_timeout_ms)
            _, replicas = await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(f"waiting for replicas failed: {exc}") from exc
        return _replicas(replicas) >= self.wait_replicas

    async def read_states(self, partitions: Sequence[int]) -> dict[int, PartitionState | None]:
        """Each partition's state hash, None where there is none."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for p in partitions:
                pipe.hgetall(self.keys.state(p))
            raw = await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(f"reading partition states failed: {exc}") from exc
        out: dict[int, PartitionState | None] = {}
        for p, fields in zip(partitions, raw, strict=True):
            try:
                out[p] = parse_state(fields)
            except ContractError:
                # Not ours (or half-written by hand): treat the partition as lost, so it
                # is rebuilt from Kafka rather than trusted.
                out[p] = None
        return out

    async def delete_partitions(self, partitions: Iterable[int]) -> None:
        """Drop the partitions' streams, states and dead letters, one ``DEL`` per partition
        (each partition's keys share one Cluster slot; different partitions do not)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for p in partitions:
                pipe.delete(*self.keys.partition_keys(p))
            await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(f"deleting partitions failed: {exc}") from exc

    async def new_incarnation(self, old: int | None, new: int) -> tuple[int, int]:
        """The topic was recreated: set the epoch to ``new`` only where it still is ``old``
        (several workers that detect it at once agree on whoever swapped first), then drop
        every partition's keys the meta hash knows of. Returns (the epoch Redis holds now,
        the partition count whose keys were dropped)."""
        meta = self.keys.meta
        old_text = "" if old is None else format_epoch(old)
        try:
            held_raw, count_raw = await self._redis.eval(
                _SWAP_EPOCH, 1, meta, META_EPOCH, old_text, format_epoch(new), META_PARTITIONS
            )
        except RedisError as exc:
            raise RedisUnavailable(f"swapping the epoch failed: {exc}") from exc
        held = _epoch_or_none(held_raw)
        try:
            count = int(count_raw) if count_raw else 0
        except ValueError:
            count = 0
        return (new if held is None else held), count

    async def read_epoch(self) -> int | None:
        try:
            raw = await self._redis.hget(self.keys.meta, META_EPOCH)
        except RedisError as exc:
            raise RedisUnavailable(f"reading the epoch failed: {exc}") from exc
        return _epoch_or_none(raw)

    async def write_meta(self, partitions: int, epoch: int, *, replace: bool = False) -> int:
        """Write ``<prefix>:meta``; the epoch only where there is none unless ``replace``
        (several workers then agree on whoever wrote first). Returns the epoch Redis holds."""
        meta = self.keys.meta
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(meta, mapping={META_TOPIC: self.topic, META_PARTITIONS: partitions})
            if replace:
                pipe.hset(meta, META_EPOCH, format_epoch(epoch))
            else:
                pipe.hsetnx(meta, META_EPOCH, format_epoch(epoch))
            pipe.hget(meta, META_EPOCH)
            raw = (await pipe.execute())[-1]
        except RedisError as exc:
            raise RedisUnavailable(f"writing the meta hash failed: {exc}") from exc
        held = _epoch_or_none(raw)
        return epoch if held is None else held

    async def sample(self, partitions: Sequence[int]) -> dict[int, tuple[int, int | None]]:
        """Per partition: stream length and applied offset (None: no state)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for p in partitions:
                pipe.xlen(self.keys.stream(p))
                pipe.hget(self.keys.state(p), STATE_APPLIED)
            raw = await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(f"sampling the streams failed: {exc}") from exc
        out: dict[int, tuple[int, int | None]] = {}
        for i, p in enumerate(partitions):
            length, applied = raw[2 * i], raw[2 * i + 1]
            try:
                out[p] = (int(length), None if applied is None else int(applied))
            except ValueError:
                out[p] = (int(length), None)
        return out


def _no_script(value: Any) -> bool:
    return isinstance(value, NoScriptError) or (
        isinstance(value, ResponseError) and str(value).startswith("NOSCRIPT")
    )


def _result(raw: Any) -> PartitionResult:
    status_raw, written, duplicates, dead, applied = raw
    status = status_raw.decode() if isinstance(status_raw, bytes) else str(status_raw)
    if status not in STATUSES:
        raise RedisUnavailable(f"the script answered an unknown status {status!r}")
    return PartitionResult(status, int(written), int(duplicates), int(dead), int(applied))


def _replicas(raw: Any) -> int:
    if isinstance(raw, Exception):
        raise RedisUnavailable(f"WAIT failed: {raw}") from raw
    return int(raw)


def _epoch_or_none(raw: bytes | str | None) -> int | None:
    if raw is None:
        return None
    try:
        return parse_epoch(raw)
    except ContractError:
        return None
