"""The atomic Redis step of one batch (adapter over redis-py)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.contract import DEAD_FIELDS, EVENT_FIELDS, RedisKeys
from shared.errors import RedisUnavailable

from .records import Prepared, pack

_SCRIPT = files("shared").joinpath("apply_batch.lua").read_text(encoding="utf-8")
_FIELD_NAMES = (*EVENT_FIELDS, *DEAD_FIELDS)
"""ARGV[7..16]: the script takes its field names from the contract."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    written: int
    duplicates: int
    dead: int
    last_id: str


class BatchWriter:
    def __init__(
        self, redis: Redis, keys: RedisKeys, topic: str, stream_maxlen: int, dead_maxlen: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._topic = topic
        self._script = redis.register_script(_SCRIPT)
        self._head: list[bytes | int | str] = [stream_maxlen, dead_maxlen, topic, keys.live]
        self._key_list = [keys.stream, keys.dead, keys.offsets, keys.genesis]

    async def apply(self, records: list[Prepared]) -> ApplyResult:
        return await self.apply_packed(pack(records), len(records))

    async def apply_packed(self, blob: bytes, count: int) -> ApplyResult:
        """Apply ``count`` records packed by ``records.pack`` in one script call."""
        if not count:
            return ApplyResult(0, 0, 0, "")
        keys = self._key_list
        args = [*self._head, count, blob, *_FIELD_NAMES]
        try:
            raw = await self._script(keys=keys, args=args)
        except RedisError as exc:
            raise RedisUnavailable(f"applying a batch failed: {exc}") from exc
        written, duplicates, dead, last_id = raw
        return ApplyResult(
            int(written),
            int(duplicates),
            int(dead),
            last_id.decode() if isinstance(last_id, bytes) else str(last_id),
        )

    async def applied_offset(self, partition: int) -> int:
        """Last applied offset of a partition, -1 when none (for tests and diagnostics)."""
        value = await self._redis.hget(self._keys.offsets, f"{self._topic}:{partition}")
        return -1 if value is None else int(value)
