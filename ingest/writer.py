"""The atomic Redis step of one batch (adapter over redis-py): one ``apply_partition.lua``
call per partition, all of a batch's calls to one server in one pipeline round trip, and,
when replicas must acknowledge, ``WAIT`` at the end of the same pipeline (``WAIT`` counts the
writes of its own connection, so it has to travel with the scripts). On a Redis Cluster, one
such pipeline per master that owns partitions of the batch, all at once: partitions on
different masters are applied concurrently, each partition by one call at a time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Final, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.crc import key_slot
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
    partition_slot,
)
from shared.errors import RedisUnavailable
from shared.redis_nodes import (
    CALL_ATTEMPTS,
    REDIRECTS,
    RETRY_PAUSE_S,
    RETRYABLE,
    Nodes,
    SingleNode,
    raise_redirects,
)

from .records import Packed, Prepared, group, pack

SCRIPT_NAME: Final = "apply_partition.lua"
_SCRIPT = files("shared").joinpath(SCRIPT_NAME).read_text(encoding="utf-8")
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
_FIELD_NAMES: Final = (*EVENT_FIELDS, *DEAD_FIELDS, *STATE_FIELDS)
"""ARGV[10..23]: the script takes its field names from the contract."""

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

T = TypeVar("T")

Status = Literal["ok", "lost", "rolled_back"]
STATUSES: Final[tuple[Status, ...]] = ("ok", "lost", "rolled_back")


@dataclass(frozen=True, slots=True)
class PartitionBatch:
    """One partition's records of a batch, packed, with what ingest believes Redis holds."""

    partition: int
    packed: Packed
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
    last: int = -1
    """For ``ok``: the position after the partition's last event (the next event's pv)."""


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
        nodes: Nodes | Redis,
        keys: RedisKeys,
        topic: str,
        stream_maxlen: int,
        dead_maxlen: int,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
    ) -> None:
        # A bare client (tests, tools) is one server holding every slot.
        self._nodes: Nodes = SingleNode(nodes) if isinstance(nodes, Redis) else nodes
        self.keys = keys
        self.topic = topic
        self.stream_maxlen = stream_maxlen
        self.wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._head: tuple[int | str, ...] = (stream_maxlen, dead_maxlen, topic)
        self._publish = "SPUBLISH" if self._nodes.cluster else "PUBLISH"

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
            batch.packed.blob,
            batch.packed.lines,
            *_FIELD_NAMES,
            self._publish,
        ]

    async def apply(self, batches: Sequence[PartitionBatch]) -> BatchResult:
        """Apply every partition's records: one pipeline round trip per Redis server (plus
        ``WAIT`` when asked), the servers of a Cluster concurrently. A partition whose slot
        turned out to be elsewhere is sent again where the fresh slot map says; its script
        call is idempotent (ids come from offsets), so a call that did run is not repeated
        in effect."""
        if not batches:
            return BatchResult({}, True, None)
        try:
            return await self._apply(batches)
        except RedisUnavailable:
            # Ingest holds the batch and tries again: not on a stale slot map (a master that
            # became a replica refuses WAIT, a dead one does not answer at all).
            if self._nodes.cluster:
                await self._refresh()
            raise

    async def _apply(self, batches: Sequence[PartitionBatch]) -> BatchResult:
        results: dict[int, PartitionResult] = {}
        replicas: list[int] = []
        pending = list(batches)
        for attempt in range(CALL_ATTEMPTS):
            groups: dict[int, tuple[Redis, list[PartitionBatch]]] = {}
            for batch in pending:
                client = self._nodes.client_for(partition_slot(batch.partition))
                groups.setdefault(id(client), (client, []))[1].append(batch)
            if len(groups) == 1:
                # Awaited in place rather than through gather, whose task would only start
                # at the event loop's next turn: the scripts leave at once.
                ((client, group),) = groups.values()
                outcomes: list[Any] = [await _settled(self._apply_on(client, group))]
            else:
                outcomes = await asyncio.gather(
                    *(self._apply_on(client, group) for client, group in groups.values()),
                    return_exceptions=True,
                )
            pending = []
            failure: BaseException | None = None
            for (_, members), outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, RETRYABLE):
                        raise _unavailable_or_bug("applying a batch failed", outcome)
                    failure = outcome
                    pending += members
                    continue
                raw, waited = outcome
                for batch, value in zip(members, raw, strict=False):
                    if isinstance(value, REDIRECTS):
                        failure = value
                        pending.append(batch)
                    elif isinstance(value, Exception):
                        raise RedisUnavailable(
                            f"applying partition {batch.partition} failed: {value}"
                        ) from value
                    else:
                        results[batch.partition] = _result(value)
                if waited is not None:
                    replicas.append(waited)
            if not pending:
                break
            if not self._nodes.cluster or attempt == CALL_ATTEMPTS - 1:
                raise _unavailable("applying a batch failed", failure)
            await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))
            await self._refresh()
        if not self.wait_replicas:
            return BatchResult(results, True, None)
        # Each server's WAIT counts that server's replicas: the batch is as safe as its
        # least-replicated part.
        least = min(replicas) if replicas else 0
        return BatchResult(results, least >= self.wait_replicas, least)

    async def _apply_on(
        self, redis: Redis, batches: Sequence[PartitionBatch]
    ) -> tuple[list[Any], int | None]:
        """One server's script calls in one pipeline, its ``WAIT`` last; answers the calls'
        results (errors in place) and what ``WAIT`` answered."""
        raw = await self._run(redis, batches)
        missing = [i for i, r in enumerate(raw[: len(batches)]) if _no_script(r)]
        if missing:
            # First call on this server (restart, failover, SCRIPT FLUSH): load it and
            # send again the calls that did not run; the others are not repeated.
            await redis.script_load(_SCRIPT)
            again = await self._run(redis, [batches[i] for i in missing])
            for i, value in zip(missing, again, strict=False):
                raw[i] = value
            if self.wait_replicas:
                raw[-1] = again[-1]
        if not self.wait_replicas:
            return raw, None
        calls = raw[: len(batches)]
        if any(isinstance(v, REDIRECTS) for v in calls):
            # This node no longer serves (some of) these slots, e.g. it is a replica now and
            # refuses WAIT. The redirected calls go again where the fresh slot map says; the
            # calls that did run here count as unreplicated (0), never as acknowledged.
            waited = raw[-1]
            return calls, waited if isinstance(waited, int) else 0
        return calls, _replicas(raw[-1])

    async def _refresh(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._nodes.refresh()

    async def _run(self, redis: Redis, batches: Sequence[PartitionBatch]) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for batch in batches:
            pipe.execute_command("EVALSHA", *self._call_args(batch))
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self._wait_timeout_ms)
        return list(await pipe.execute(raise_on_error=False))

    async def apply_records(
        self,
        partition: int,
        records: Iterable[Prepared],
        *,
        expect: int = -1,
        base: int = 0,
        prev: int = -1,
    ) -> PartitionResult:
        """One partition's records in one call (tests, tools); ``prev`` as ``pack`` takes it."""
        listed = list(records)
        if any(p[0] != partition for p in listed):
            raise ValueError("every record must be of the given partition")
        batch = PartitionBatch(partition, pack(listed, prev), len(listed), expect, base)
        result = await self.apply([batch])
        return result.partitions[partition]

    async def apply_grouped(
        self,
        records: Iterable[Prepared],
        expect: dict[int, int] | None = None,
        prev: dict[int, int] | None = None,
    ) -> dict[int, PartitionResult]:
        """Records of any partitions, grouped (tests, tools); ``expect`` per partition,
        -1 (fresh fill from position 0) when not given; ``prev`` as ``pack`` takes it."""
        expect = expect or {}
        prev = prev or {}
        batches = [
            PartitionBatch(p, pack(rs, prev.get(p, -1)), len(rs), expect.get(p, -1), 0)
            for p, rs in group(records).items()
        ]
        return (await self.apply(batches)).partitions

    async def wait_acked(self, partitions: Sequence[int] = ()) -> bool:
        """A harmless write and ``WAIT`` on one connection per server: True when the
        replicas hold everything written before it (replication is in order, so this covers
        earlier batches whose own ``WAIT`` timed out). On a Cluster, every master that owns
        one of ``partitions``."""
        if not self.wait_replicas:
            return True
        if not self._nodes.cluster:
            # HSET always propagates, even with the same value: it moves this connection's
            # replication offset past every earlier write, which is what WAIT waits for.
            replies = await self._on_slot(
                key_slot(self.keys.meta.encode()),
                lambda pipe: (
                    pipe.hset(self.keys.meta, META_TOPIC, self.topic),
                    pipe.execute_command("WAIT", self.wait_replicas, self._wait_timeout_ms),
                ),
                "waiting for replicas",
            )
            return _replicas(replies[-1]) >= self.wait_replicas
        # Each master that owns one of the partitions gets a write of its own (the partition's
        # wait key, in its slot) followed by WAIT on the same connection. Without partitions
        # there is nothing held to release.
        if not partitions:
            return False
        one_each: dict[int, int] = {}
        for p in partitions:
            one_each.setdefault(id(self._nodes.client_for(partition_slot(p))), p)
        replies_by = await self._grouped(
            list(one_each.values()),
            lambda pipe, p: (
                pipe.set(self.keys.wait(p), self.topic),
                pipe.execute_command("WAIT", self.wait_replicas, self._wait_timeout_ms),
            ),
            "waiting for replicas",
        )
        return all(_replicas(r[-1]) >= self.wait_replicas for r in replies_by.values())

    async def read_states(self, partitions: Sequence[int]) -> dict[int, PartitionState | None]:
        """Each partition's state hash, None where there is none."""
        replies = await self._grouped(
            partitions, lambda pipe, p: pipe.hgetall(self.keys.state(p)), "reading partition states"
        )
        out: dict[int, PartitionState | None] = {}
        for p in partitions:
            try:
                out[p] = parse_state(_ok(replies[p][0]))
            except ContractError:
                # Not ours (or half-written by hand): treat the partition as lost, so it
                # is rebuilt from Kafka rather than trusted.
                out[p] = None
        return out

    async def delete_partitions(self, partitions: Iterable[int]) -> None:
        """Drop the partitions' streams, states and dead letters, one ``DEL`` per partition
        (each partition's keys share one Cluster slot; different partitions do not)."""
        replies = await self._grouped(
            list(partitions),
            lambda pipe, p: pipe.delete(*self.keys.partition_keys(p)),
            "deleting partitions",
        )
        for values in replies.values():
            _ok(values[0])

    async def new_incarnation(self, old: int | None, new: int) -> tuple[int, int]:
        """The topic was recreated: set the epoch to ``new`` only where it still is ``old``
        (several workers that detect it at once agree on whoever swapped first), then drop
        every partition's keys the meta hash knows of. Returns (the epoch Redis holds now,
        the partition count whose keys were dropped)."""
        meta = self.keys.meta
        old_text = "" if old is None else format_epoch(old)
        replies = await self._on_slot(
            key_slot(meta.encode()),
            lambda pipe: pipe.eval(
                _SWAP_EPOCH, 1, meta, META_EPOCH, old_text, format_epoch(new), META_PARTITIONS
            ),
            "swapping the epoch",
        )
        held_raw, count_raw = _ok(replies[0])
        held = _epoch_or_none(held_raw)
        try:
            count = int(count_raw) if count_raw else 0
        except ValueError:
            count = 0
        return (new if held is None else held), count

    async def read_epoch(self) -> int | None:
        replies = await self._on_slot(
            key_slot(self.keys.meta.encode()),
            lambda pipe: pipe.hget(self.keys.meta, META_EPOCH),
            "reading the epoch",
        )
        return _epoch_or_none(_ok(replies[0]))

    async def write_meta(self, partitions: int, epoch: int, *, replace: bool = False) -> int:
        """Write ``<prefix>:meta``; the epoch only where there is none unless ``replace``
        (several workers then agree on whoever wrote first). Returns the epoch Redis holds."""
        meta = self.keys.meta

        def queue(pipe: Pipeline) -> None:
            pipe.hset(meta, mapping={META_TOPIC: self.topic, META_PARTITIONS: partitions})
            if replace:
                pipe.hset(meta, META_EPOCH, format_epoch(epoch))
            else:
                pipe.hsetnx(meta, META_EPOCH, format_epoch(epoch))
            pipe.hget(meta, META_EPOCH)

        replies = await self._on_slot(key_slot(meta.encode()), queue, "writing the meta hash")
        held = _epoch_or_none(_ok(replies[-1]))
        return epoch if held is None else held

    async def sample(self, partitions: Sequence[int]) -> dict[int, tuple[int, int | None]]:
        """Per partition: stream length and applied offset (None: no state)."""
        replies = await self._grouped(
            partitions,
            lambda pipe, p: (
                pipe.xlen(self.keys.stream(p)),
                pipe.hget(self.keys.state(p), STATE_APPLIED),
            ),
            "sampling the streams",
        )
        out: dict[int, tuple[int, int | None]] = {}
        for p in partitions:
            length, applied = (_ok(v) for v in replies[p])
            try:
                out[p] = (int(length), None if applied is None else int(applied))
            except ValueError:
                out[p] = (int(length), None)
        return out

    async def _on_slot(
        self, slot: int, queue: Callable[[Pipeline], object], what: str
    ) -> list[Any]:
        """The replies of the commands ``queue`` adds, in one pipeline to ``slot``'s server."""

        async def run(redis: Redis) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            queue(pipe)
            replies = list(await pipe.execute(raise_on_error=False))
            raise_redirects(replies)
            return [_ok(v) for v in replies]

        try:
            return await self._nodes.call(slot, run)
        except RedisError as exc:
            raise RedisUnavailable(f"{what} failed: {exc}") from exc

    async def _grouped(
        self,
        partitions: Sequence[int],
        queue: Callable[[Pipeline, int], object],
        what: str,
    ) -> dict[int, list[Any]]:
        """Per partition, the replies of the commands ``queue`` adds for it: one pipeline per
        server, the servers concurrently; partitions whose slot moved are asked again."""
        out: dict[int, list[Any]] = {}
        pending = list(dict.fromkeys(partitions))
        failure: BaseException | None = None
        for attempt in range(CALL_ATTEMPTS):
            groups: dict[int, tuple[Redis, list[int]]] = {}
            for p in pending:
                client = self._nodes.client_for(partition_slot(p))
                groups.setdefault(id(client), (client, []))[1].append(p)

            async def run(redis: Redis, group: list[int]) -> list[list[Any]]:
                pipe = redis.pipeline(transaction=False)
                sizes = []
                for p in group:
                    before = len(pipe)
                    queue(pipe, p)
                    sizes.append(len(pipe) - before)
                flat = list(await pipe.execute(raise_on_error=False))
                split, i = [], 0
                for size in sizes:
                    split.append(flat[i : i + size])
                    i += size
                return split

            outcomes = await asyncio.gather(
                *(run(client, group) for client, group in groups.values()),
                return_exceptions=True,
            )
            pending = []
            for (_, members), outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, RETRYABLE):
                        raise _unavailable_or_bug(f"{what} failed", outcome)
                    failure = outcome
                    pending += members
                    continue
                for p, values in zip(members, outcome, strict=True):
                    redirect = next((v for v in values if isinstance(v, REDIRECTS)), None)
                    if redirect is not None:
                        failure = redirect
                        pending.append(p)
                    else:
                        out[p] = [_ok(v) for v in values]
            if not pending:
                return out
            if not self._nodes.cluster or attempt == CALL_ATTEMPTS - 1:
                break
            await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))
            await self._refresh()
        raise _unavailable(f"{what} failed", failure)


def _ok(value: Any) -> Any:
    """A pipeline reply, or the error it holds raised as ``RedisUnavailable``."""
    if isinstance(value, Exception):
        raise RedisUnavailable(str(value)) from value
    return value


def _unavailable_or_bug(what: str, cause: BaseException) -> BaseException:
    """A Redis or network error as ``RedisUnavailable`` (ingest holds the batch and retries);
    anything else (a bug, a cancellation) as itself, so that the task fails and is named."""
    if isinstance(cause, RedisError | OSError | RedisUnavailable):
        return _unavailable(what, cause)
    return cause


def _unavailable(what: str, cause: BaseException | None) -> RedisUnavailable:
    exc = RedisUnavailable(f"{what}: {cause}")
    exc.__cause__ = cause
    return exc


def _no_script(value: Any) -> bool:
    return isinstance(value, NoScriptError) or (
        isinstance(value, ResponseError) and str(value).startswith("NOSCRIPT")
    )


async def _settled(call: Awaitable[T]) -> T | Exception:
    """What ``gather(..., return_exceptions=True)`` gives for one call."""
    try:
        return await call
    except Exception as exc:  # noqa: BLE001 - sorted by the caller, as gather's results are
        return exc


def _result(raw: Any) -> PartitionResult:
    status_raw, written, duplicates, dead, applied, last = raw
    status = status_raw.decode() if isinstance(status_raw, bytes) else str(status_raw)
    if status not in STATUSES:
        raise RedisUnavailable(f"the script answered an unknown status {status!r}")
    return PartitionResult(
        status, int(written), int(duplicates), int(dead), int(applied), int(last)
    )


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
