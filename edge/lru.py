"""A least-recently-used map for bytes built once and served many times, bounded by bytes.

Clients choose the keys of the edge's caches (``n``, ``after``, ``types``, a token's match
claim, a Last-Event-ID) and the size of the values (``n`` times the event size), so a bound
on the number of entries bounds nothing: the cache counts what it holds instead.

What an entry costs is approximated as ``approx_bytes(key) + approx_bytes(value) +
ENTRY_OVERHEAD_BYTES``. ``approx_bytes`` is ``sys.getsizeof`` summed through tuples,
lists and (frozen) sets, which is what CPython allocates for the bytes, strings, ints and
containers these keys and values are made of. Objects shared with something else (an
entry's frame that the replay ring also holds, a cached small int) are counted again, so
the figure errs high, never low.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

DOORKEEPER_ENTRY_BYTES = 200
"""One remembered key hash: the ordered dict's slot and node, the int, and the dummy slots
its deletions leave (~180 bytes measured; rounded up, so the figure errs high)."""
DOORKEEPER_SHARE = 64
"""The doorkeeper remembers at most ``budget_bytes // DOORKEEPER_SHARE`` bytes of hashes;
that share is reserved out of the budget, so entries and hashes together never pass it. A
budget too small for one hash (under 12,800 bytes) gets no doorkeeper."""

ENTRY_OVERHEAD_BYTES = 200
"""The ordered dict's slot and link for one entry (~100 bytes measured with tracemalloc)
plus the ``(value, size)`` pair and its size int that this map keeps per entry."""

_CONTAINERS = (tuple, list, frozenset, set)


def approx_bytes(obj: object) -> int:
    """Bytes CPython allocates for ``obj`` and, through containers, everything in it."""
    size = sys.getsizeof(obj)
    if isinstance(obj, _CONTAINERS):
        # Keys and values are shallow (a few levels of tuples and frozensets), so the
        # recursion depth is bounded by their shape, not by anything a client sends.
        size += sum(approx_bytes(item) for item in obj)
    return size


class ByteLru(Generic[K, V]):
    """``get``/``put`` like a dict, holding at most ``budget_bytes`` (as approximated
    above). An entry larger than ``max_item_bytes`` is not cached, so one request can
    never evict more than that share of what others use. A budget of 0 caches nothing.

    With ``admit_second=True`` a key is held only when it is put a second time (a
    "doorkeeper": the first put only remembers the key's hash, in a bounded FIFO). A value
    asked for once is never worth its bytes, and under reconnect churn most are: every
    client resumes from its own position, so without the doorkeeper the cache fills with
    pages nobody reads again, evicts the ones a reconnect storm shares, and churns the
    allocator with large short-lived objects. A storm still hits from its third client on
    (per key: a replay page's key includes the ring's head, so under live traffic the
    clients of a storm share a key while no new event arrives between their resumes)."""

    __slots__ = (
        "_doorkeeper",
        "_doorkeeper_max",
        "_entries_budget",
        "_held",
        "_items",
        "_sizer",
        "budget_bytes",
        "max_item_bytes",
    )

    def __init__(
        self,
        budget_bytes: int,
        max_item_bytes: int | None = None,
        sizer: Callable[[object], int] = approx_bytes,
        *,
        admit_second: bool = False,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        max_item = budget_bytes if max_item_bytes is None else max_item_bytes
        if not 0 <= max_item <= budget_bytes:
            raise ValueError(f"max_item_bytes must be in 0..{budget_bytes}, got {max_item}")
        self.budget_bytes = budget_bytes
        self.max_item_bytes = max_item
        self._sizer = sizer
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._held = 0
        # Hashes only: a remembered key holds none of the client's bytes. A collision admits
        # a value one put early, which costs nothing but that value's place.
        self._doorkeeper_max = budget_bytes // DOORKEEPER_SHARE // DOORKEEPER_ENTRY_BYTES
        self._doorkeeper: OrderedDict[int, None] | None = (
            OrderedDict() if admit_second and self._doorkeeper_max > 0 else None
        )
        if self._doorkeeper is None:
            self._doorkeeper_max = 0
        self._entries_budget = budget_bytes - self._doorkeeper_max * DOORKEEPER_ENTRY_BYTES

    def __len__(self) -> int:
        return len(self._items)

    @property
    def remembered(self) -> int:
        """Key hashes the doorkeeper remembers (0 without one)."""
        return len(self._doorkeeper) if self._doorkeeper is not None else 0

    @property
    def held_bytes(self) -> int:
        """The approximate bytes of every entry held (keys, values and overhead) and of the
        doorkeeper's hashes."""
        return self._held + self.remembered * DOORKEEPER_ENTRY_BYTES

    def entry_bytes(self, key: K, value: V) -> int:
        return self._sizer(key) + self._sizer(value) + ENTRY_OVERHEAD_BYTES

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def _admit(self, key: K) -> bool:
        """With a doorkeeper: whether ``key`` was put before (and is now forgotten by it)."""
        door = self._doorkeeper
        if door is None:
            return True
        digest = hash(key)
        if digest in door:
            del door[digest]
            return True
        door[digest] = None
        if len(door) > self._doorkeeper_max:
            door.popitem(last=False)
        return False

    def put(self, key: K, value: V) -> bool:
        """Hold ``value`` under ``key``, evicting the least recently used entries to stay
        within the budget. Returns whether it is held (False: larger than the item cap, or
        the doorkeeper's first sighting of the key)."""
        old = self._items.pop(key, None)
        if old is not None:
            self._held -= old[1]
        size = self.entry_bytes(key, value)
        # Beside the doorkeeper's reserved share, an entry over the rest would evict
        # everything and still not fit.
        if size > self.max_item_bytes or size > self._entries_budget:
            return False
        if old is None and not self._admit(key):
            return False
        self._items[key] = (value, size)
        self._held += size
        # The doorkeeper's share is reserved: entries get the rest of the budget.
        while self._held > self._entries_budget and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self._held -= evicted
        # False when even an empty cache cannot hold it beside the doorkeeper's share.
        return key in self._items

    def items(self) -> Iterator[tuple[K, V]]:
        """Entries from least to most recently used (for tests and inspection)."""
        for key, (value, _) in self._items.items():
            yield key, value

    def clear(self) -> None:
        self._items.clear()
        self._held = 0
        if self._doorkeeper is not None:
            self._doorkeeper.clear()
