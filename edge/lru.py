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
    never evict more than that share of what others use. A budget of 0 caches nothing."""

    __slots__ = ("_held", "_items", "_sizer", "budget_bytes", "max_item_bytes")

    def __init__(
        self,
        budget_bytes: int,
        max_item_bytes: int | None = None,
        sizer: Callable[[object], int] = approx_bytes,
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

    def __len__(self) -> int:
        return len(self._items)

    @property
    def held_bytes(self) -> int:
        """The approximate bytes of every entry held (keys, values and overhead)."""
        return self._held

    def entry_bytes(self, key: K, value: V) -> int:
        return self._sizer(key) + self._sizer(value) + ENTRY_OVERHEAD_BYTES

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> bool:
        """Hold ``value`` under ``key``, evicting the least recently used entries to stay
        within the budget. Returns whether it is held (False: larger than the item cap)."""
        old = self._items.pop(key, None)
        if old is not None:
            self._held -= old[1]
        size = self.entry_bytes(key, value)
        if size > self.max_item_bytes:
            return False
        self._items[key] = (value, size)
        self._held += size
        while self._held > self.budget_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self._held -= evicted
        return True

    def items(self) -> Iterator[tuple[K, V]]:
        """Entries from least to most recently used (for tests and inspection)."""
        for key, (value, _) in self._items.items():
            yield key, value

    def clear(self) -> None:
        self._items.clear()
        self._held = 0
