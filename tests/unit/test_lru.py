"""edge.lru.ByteLru: a least-recently-used map bounded by the bytes of its keys and values."""

from __future__ import annotations

import random
import sys

import pytest

from edge.lru import (
    DOORKEEPER_ENTRY_BYTES,
    DOORKEEPER_SHARE,
    ENTRY_OVERHEAD_BYTES,
    ByteLru,
    approx_bytes,
)
from shared.ids import StreamId


def length(obj: object) -> int:
    """A sizer whose figures the tests can compute by hand."""
    assert isinstance(obj, (str, bytes))
    return len(obj)


def cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


def test_an_entry_costs_its_key_its_value_and_the_overhead() -> None:
    cache: ByteLru[str, bytes] = ByteLru(10_000, sizer=length)

    assert cache.put("k" * 10, b"v" * 100)

    assert cache.held_bytes == 10 + 100 + ENTRY_OVERHEAD_BYTES
    assert cache.get("k" * 10) == b"v" * 100
    assert len(cache) == 1


def test_the_budget_holds_and_the_least_recently_used_go_first() -> None:
    entry = cost("k0", b"x" * 100)
    cache: ByteLru[str, bytes] = ByteLru(3 * entry, sizer=length)
    for i in range(3):
        cache.put(f"k{i}", b"x" * 100)
    assert cache.held_bytes == 3 * entry

    assert cache.get("k0") is not None  # now the most recently used
    cache.put("k3", b"x" * 100)

    assert [k for k, _ in cache.items()] == ["k2", "k0", "k3"]
    assert cache.get("k1") is None
    assert cache.held_bytes == 3 * entry


def test_one_large_entry_evicts_as_many_small_ones_as_it_needs() -> None:
    small = cost("s0", b"x" * 10)
    cache: ByteLru[str, bytes] = ByteLru(10 * small, sizer=length)
    for i in range(10):
        cache.put(f"s{i}", b"x" * 10)

    cache.put("big", b"y" * (4 * small))

    assert cache.held_bytes <= 10 * small
    assert cache.get("big") is not None
    assert [k for k, _ in cache.items()][:-1] == [f"s{i}" for i in range(5, 10)]


def test_an_entry_over_the_item_cap_is_not_cached_and_evicts_nothing() -> None:
    cache: ByteLru[str, bytes] = ByteLru(1000, max_item_bytes=400, sizer=length)
    cache.put("a", b"x" * 100)

    assert not cache.put("b", b"x" * (400 - ENTRY_OVERHEAD_BYTES))  # 401 bytes with its key

    assert cache.get("b") is None
    assert [k for k, _ in cache.items()] == ["a"]
    assert cache.held_bytes == cost("a", b"x" * 100)
    assert cache.put("b", b"x" * (399 - ENTRY_OVERHEAD_BYTES))  # exactly at the cap


def test_a_large_key_counts_like_a_large_value() -> None:
    """Clients choose keys (a long ``types=`` list, a match claim): a tiny value under a
    huge key is refused by the same cap, and counts against the same budget."""
    cache: ByteLru[str, bytes] = ByteLru(10_000, max_item_bytes=1_000, sizer=length)

    assert not cache.put("t" * 2_000, b"{}")
    assert cache.put("t" * 700, b"{}")
    assert cache.held_bytes == 700 + 2 + ENTRY_OVERHEAD_BYTES


def test_the_default_sizer_counts_key_bytes() -> None:
    cache: ByteLru[tuple[object, ...], bytes] = ByteLru(1 << 20)
    types = frozenset(b"T%0120d" % i for i in range(60))
    small: tuple[object, ...] = (1, StreamId(5, 0), 100, None, None, frozenset())
    large: tuple[object, ...] = (1, StreamId(5, 0), 100, None, types, frozenset())

    assert cache.entry_bytes(large, b"{}") - cache.entry_bytes(small, b"{}") >= 60 * 121


def test_replacing_a_key_recounts_and_an_oversize_replacement_drops_the_old_value() -> None:
    cache: ByteLru[str, bytes] = ByteLru(1000, max_item_bytes=500, sizer=length)
    cache.put("a", b"x" * 10)
    cache.put("a", b"x" * 50)
    assert cache.held_bytes == cost("a", b"x" * 50)
    assert len(cache) == 1

    # The old value must not be served for a key whose newest value was not cached.
    assert not cache.put("a", b"x" * 600)
    assert cache.get("a") is None
    assert cache.held_bytes == 0


def test_a_zero_budget_caches_nothing() -> None:
    cache: ByteLru[str, bytes] = ByteLru(0)

    assert not cache.put("a", b"")
    assert cache.get("a") is None
    assert cache.held_bytes == 0


def test_clear_forgets_everything() -> None:
    cache: ByteLru[str, bytes] = ByteLru(10_000, sizer=length)
    cache.put("a", b"x")
    cache.clear()
    assert (len(cache), cache.held_bytes, cache.get("a")) == (0, 0, None)


@pytest.mark.parametrize(("budget", "item"), [(-1, None), (100, 101), (100, -1)])
def test_an_impossible_bound_is_refused(budget: int, item: int | None) -> None:
    with pytest.raises(ValueError):
        ByteLru(budget, item)


def test_approx_bytes_walks_tuples_and_frozensets() -> None:
    body = b"x" * 1000
    pair = (body, frozenset({b"ab", b"cd"}))

    assert approx_bytes(body) == sys.getsizeof(body) >= 1000
    assert approx_bytes(pair) == (
        sys.getsizeof(pair)
        + sys.getsizeof(body)
        + sys.getsizeof(pair[1])
        + 2 * sys.getsizeof(b"ab")
    )


class Model:
    """The obvious, slow LRU: a list from least to most recently used."""

    def __init__(self, budget: int, max_item: int) -> None:
        self.budget = budget
        self.max_item = max_item
        self.entries: list[tuple[str, bytes]] = []

    def held(self) -> int:
        return sum(cost(k, v) for k, v in self.entries)

    def get(self, key: str) -> bytes | None:
        for i, (k, v) in enumerate(self.entries):
            if k == key:
                self.entries.append(self.entries.pop(i))
                return v
        return None

    def put(self, key: str, value: bytes) -> bool:
        self.entries = [(k, v) for k, v in self.entries if k != key]
        if cost(key, value) > self.max_item:
            return False
        self.entries.append((key, value))
        while self.held() > self.budget:
            self.entries.pop(0)
        return True


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_model_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.randrange(ENTRY_OVERHEAD_BYTES, 20 * ENTRY_OVERHEAD_BYTES)
    max_item = rng.randrange(0, budget + 1)
    cache: ByteLru[str, bytes] = ByteLru(budget, max_item, sizer=length)
    model = Model(budget, max_item)
    keys = [f"k{i}" * rng.randrange(1, 40) for i in range(30)]
    for _ in range(2000):
        key = rng.choice(keys)
        if rng.random() < 0.4:
            assert cache.get(key) == model.get(key)
        else:
            value = b"v" * rng.randrange(0, 3 * ENTRY_OVERHEAD_BYTES)
            assert cache.put(key, value) == model.put(key, value)
        assert list(cache.items()) == model.entries
        assert cache.held_bytes == model.held() <= budget
        assert len(cache) == len(model.entries)


# -- the doorkeeper (admit_second): a key is held from its second put ---------------------------


def test_with_a_doorkeeper_a_key_is_held_only_from_its_second_put() -> None:
    cache: ByteLru[str, bytes] = ByteLru(64_000, sizer=length, admit_second=True)

    assert not cache.put("page", b"v" * 100)
    assert cache.get("page") is None
    assert len(cache) == 0
    assert cache.remembered == 1
    assert cache.held_bytes == DOORKEEPER_ENTRY_BYTES

    assert cache.put("page", b"v" * 100)
    assert cache.get("page") == b"v" * 100
    # Admitted: the doorkeeper forgets the key, the cache holds it.
    assert cache.remembered == 0
    assert cache.held_bytes == cost("page", b"v" * 100)
    # Replacing a held key needs no second sighting.
    assert cache.put("page", b"w" * 50)
    assert cache.get("page") == b"w" * 50


def test_keys_asked_once_fill_nothing_but_the_bounded_doorkeeper() -> None:
    """Reconnect churn: every client resumes from its own position, each key is asked once."""
    budget = 1_280_000
    cache: ByteLru[str, bytes] = ByteLru(budget, sizer=length, admit_second=True)
    most = budget // DOORKEEPER_SHARE // DOORKEEPER_ENTRY_BYTES
    assert most == 100

    for i in range(10_000):
        assert not cache.put(f"position-{i}", b"v" * 1000)

    assert len(cache) == 0
    assert cache.remembered == most
    assert cache.held_bytes == most * DOORKEEPER_ENTRY_BYTES == budget // DOORKEEPER_SHARE
    # The doorkeeper is a FIFO window: the newest keys are admitted on their second put,
    # the oldest were forgotten and start over.
    assert cache.put("position-9999", b"v" * 1000)
    assert not cache.put("position-0", b"v" * 1000)


def test_a_storm_on_one_key_is_served_from_the_second_request_on() -> None:
    cache: ByteLru[str, bytes] = ByteLru(64_000, sizer=length, admit_second=True)
    built = 0
    for _ in range(1000):
        if cache.get("same place") is None:
            built += 1
            cache.put("same place", b"page")
    assert built == 2


def test_a_full_cache_stays_within_its_budget_while_new_keys_arrive() -> None:
    """The doorkeeper's share is reserved: first sightings never push a full cache over."""
    budget = 128_000  # 10 hashes of 200 bytes reserved
    cache: ByteLru[str, bytes] = ByteLru(budget, sizer=length, admit_second=True)
    for i in range(200):
        cache.put(f"k{i}", b"v" * 500)
        cache.put(f"k{i}", b"v" * 500)
        assert cache.held_bytes <= budget
    full = len(cache)
    assert full > 150
    for i in range(1000):
        assert not cache.put(f"new{i}", b"v" * 500)
        assert cache.held_bytes <= budget
    assert len(cache) == full  # first sightings evict nothing
    # An entry that fits the budget but not beside the reserved share is not held.
    big = b"v" * (budget - ENTRY_OVERHEAD_BYTES - 3)
    cache.put("big", big)
    assert not cache.put("big", big)
    assert cache.get("big") is None and cache.held_bytes <= budget
    assert len(cache) == full  # refused without evicting anyone
    fits = b"v" * (budget - ENTRY_OVERHEAD_BYTES - 10 * DOORKEEPER_ENTRY_BYTES - 4)
    cache.put("fits", fits)
    assert cache.put("fits", fits)
    assert cache.get("fits") == fits and cache.held_bytes <= budget
    cache.clear()
    assert cache.remembered == 0 and cache.held_bytes == 0 and len(cache) == 0
    assert not cache.put("fits", fits)  # forgotten: a first sighting again


def test_a_budget_too_small_for_a_doorkeeper_caches_on_the_first_put() -> None:
    cache: ByteLru[str, bytes] = ByteLru(5_000, sizer=length, admit_second=True)
    assert cache.put("k", b"v")
    assert cache.get("k") == b"v" and cache.remembered == 0
    assert not ByteLru(0, admit_second=True).put("k", b"v")


@pytest.mark.parametrize("seed", range(5))
def test_with_a_doorkeeper_the_budget_holds_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    budget = 1_280_000  # 100 remembered hashes, 1,260,000 bytes for entries
    cache: ByteLru[str, bytes] = ByteLru(budget, 40_000, sizer=length, admit_second=True)
    seen: set[str] = set()
    peak = 0
    for _ in range(5000):
        key = f"k{rng.randrange(150)}"
        if rng.random() < 0.3:
            value = cache.get(key)
            assert value is None or value == key.encode() * (len(value) // len(key))
        else:
            value = key.encode() * rng.randrange(100, 8000)
            held = cache.put(key, value)
            assert not held or key in seen  # never on a key's first sighting
            assert held == any(k == key for k, _ in cache.items())
            seen.add(key)
        peak = max(peak, cache.held_bytes)
        assert cache.held_bytes <= budget
        assert cache.remembered <= budget // DOORKEEPER_SHARE // DOORKEEPER_ENTRY_BYTES
    assert peak > 0.8 * budget  # the budget, not a lack of traffic, bounded it
