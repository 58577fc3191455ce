"""The edge's opt-in memory diagnostics (edge/memory.py, CRM_EVENTS_MEMORY_DIAGNOSTICS) and
the live client objects gauge: what a soak reads to tell a leak from fragmentation."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge import memory as memory_module
from edge.app import create_app
from edge.bus_memory import MemoryBus
from edge.hub import live_client_objects
from edge.memory import MemoryDiagnostics, gc_counts, obmalloc_figures
from shared.errors import SettingsError
from shared.settings import EdgeSettings
from tests.unit.test_edge_app import EPOCH
from tests.waiting import eventually

BASE_ENV = {"CRM_EVENTS_AUTH_MODE": "off", "CRM_EVENTS_NODE_ID": "edge-memory"}


@asynccontextmanager
async def edge(mode: str | None, **settings: str) -> AsyncIterator[tuple[str, CollectorRegistry]]:
    """An in-process edge with ``CRM_EVENTS_MEMORY_DIAGNOSTICS=mode`` (None: unset) and
    other settings by their names without the prefix."""
    env = {**BASE_ENV, **{f"CRM_EVENTS_{name}": value for name, value in settings.items()}}
    if mode is not None:
        env["CRM_EVENTS_MEMORY_DIAGNOSTICS"] = mode
    registry = CollectorRegistry()
    app = create_app(
        EdgeSettings.from_env(env),
        registry=registry,
        bus=MemoryBus(maxlen=100, partitions=1, epoch=EPOCH),
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")), registry
    finally:
        await server.close()


async def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_off_by_default_there_is_no_route_and_no_tracing() -> None:
    assert EdgeSettings.from_env(BASE_ENV).memory_diagnostics == "off"
    async with edge(None) as (base, _):
        status, body = await get(base, "/debug/memory")
        assert status == 404
        assert body["error"] == "not_found"
        assert not tracemalloc.is_tracing()


async def test_gc_mode_reports_the_heap_and_both_allocators_without_tracing() -> None:
    async with edge("gc") as (base, _):
        status, body = await get(base, "/debug/memory")
        # Only a direct request from this host: one a proxy relayed is an unknown route.
        for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
            relayed, refused = await get(base, "/debug/memory", {header: "203.0.113.9"})
            assert relayed == 404 and refused["error"] == "not_found", header
        # Other methods: the same 404, not a 405 that would name the route's methods.
        async with aiohttp.ClientSession() as session, session.post(base + "/debug/memory") as resp:
            assert resp.status == 404 and "Allow" not in resp.headers
    assert status == 200
    assert body["mode"] == "gc"
    assert body["rss_bytes"] > 10 << 20
    python = body["python"]
    assert python["allocated_blocks"] > 10_000
    assert python["gc_objects"] >= sum(python["gc_counts_by_type"].values()) > 1000
    assert "dict" in python["gc_counts_by_type"]
    # Types are named with their module (two classes of one name stay apart).
    counts = gc_counts([{}, {}, web.Request.__new__(web.Request), Cyclic.__new__(Cyclic)])
    assert counts == {"dict": 2, "aiohttp.web_request.Request": 1, f"{__name__}.Cyclic": 1}
    ob = python["obmalloc"]
    assert ob["arena_bytes"] >= ob["allocated_bytes"] > 1 << 20
    assert ob["arenas"] >= 1 and ob["arenas_highwater"] >= ob["arenas"]
    assert ob["available_bytes"] >= 0 and ob["unused_pool_bytes"] >= 0
    malloc = body["malloc"]
    if memory_module._mallinfo2 is None:  # not glibc 2.33+: no figures, said as null
        assert malloc is None
    else:
        assert malloc["heap_bytes"] >= malloc["in_use_bytes"] > 0
        assert malloc["free_bytes"] >= 0
    assert "tracemalloc" not in body
    assert not tracemalloc.is_tracing()


KEPT: list[bytes] = []


async def test_tracemalloc_mode_names_the_line_that_grew_and_stops_tracing_after() -> None:
    assert not tracemalloc.is_tracing()
    async with edge("tracemalloc") as (base, _):
        assert tracemalloc.is_tracing()
        status, first = await get(base, "/debug/memory")
        assert status == 200
        assert first["tracemalloc"]["growth_since_first"] == []  # the baseline
        KEPT.extend(bytes([i % 251]) * 10_000 for i in range(400))  # ~4 MB from this line
        try:
            status, second = await get(base, "/debug/memory")
        finally:
            KEPT.clear()
    assert not tracemalloc.is_tracing()
    traced = second["tracemalloc"]
    assert traced["traced_bytes"] > 4_000_000
    top = traced["growth_since_first"][0]
    assert "test_edge_memory.py" in top["site"], traced["growth_since_first"][:3]
    assert top["bytes_diff"] > 3_900_000
    assert top["blocks_diff"] >= 400


async def test_the_client_objects_gauge_counts_streams_and_drops_when_they_end() -> None:
    # The gauge counts the process's clients: measured from what other tests left.
    gc.collect()
    base = live_client_objects()
    async with edge(None) as (url, registry):
        assert registry.get_sample_value("crm_events_client_objects") == base
        async with aiohttp.ClientSession() as session:
            streams = [await session.get(url + "/crm-events") for _ in range(3)]
            try:
                assert [s.status for s in streams] == [200, 200, 200]
                assert registry.get_sample_value("crm_events_client_objects") == base + 3
            finally:
                for s in streams:
                    s.close()

        def released() -> bool:
            gc.collect()
            return registry.get_sample_value("crm_events_client_objects") == base

        await eventually(released, 5, "client objects released after their streams ended")


def test_a_wrong_mode_fails_at_start_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="CRM_EVENTS_MEMORY_DIAGNOSTICS"):
        EdgeSettings.from_env({**BASE_ENV, "CRM_EVENTS_MEMORY_DIAGNOSTICS": "heapy"})
    assert (
        EdgeSettings.from_env(
            {**BASE_ENV, "CRM_EVENTS_MEMORY_DIAGNOSTICS": "TraceMalloc"}
        ).memory_diagnostics
        == "tracemalloc"
    )
    with pytest.raises(ValueError, match="mode"):
        MemoryDiagnostics("heapy")  # type: ignore[arg-type]


def test_obmalloc_figures_point_stderr_back_where_it_was() -> None:
    before = os.fstat(2)
    figures = obmalloc_figures()
    after = os.fstat(2)
    assert figures["arena_bytes"] > 0
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def scheduled_coroutines() -> set[str]:
    return {getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks()}


class Cyclic:
    """An object in a reference cycle: only a collection frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_scheduled_full_collections_free_cycles_and_are_measured() -> None:
    # The automatic collector off: only the edge's schedule may free the cycles below.
    gc.disable()
    try:
        async with edge(None, GC_FULL_INTERVAL_S="1") as (_, registry):
            assert "collect_periodically" in scheduled_coroutines()
            probe = weakref.ref(Cyclic())
            for _ in range(999):
                Cyclic()
            assert probe() is not None
            await eventually(lambda: probe() is None, 10, "the scheduled collection")
            count = registry.get_sample_value("crm_events_gc_full_collection_seconds_count")
            assert count is not None and count >= 1
            total = registry.get_sample_value("crm_events_gc_full_collection_seconds_sum")
            assert total is not None and 0 < total < 5
            found = registry.get_sample_value("crm_events_gc_unreachable_objects_total")
            assert found is not None and found >= 1000  # the 1,000 Cyclic objects
        assert "collect_periodically" not in scheduled_coroutines()  # ended with the app
    finally:
        gc.enable()


def test_the_collection_interval_is_checked_at_start() -> None:
    assert EdgeSettings.from_env(BASE_ENV).gc_full_interval_s == 60.0
    assert (
        EdgeSettings.from_env({**BASE_ENV, "CRM_EVENTS_GC_FULL_INTERVAL_S": "0"}).gc_full_interval_s
        == 0
    )
    for bad in ("0.5", "-1", "3601", "soon"):
        with pytest.raises(SettingsError, match="CRM_EVENTS_GC_FULL_INTERVAL_S"):
            EdgeSettings.from_env({**BASE_ENV, "CRM_EVENTS_GC_FULL_INTERVAL_S": bad})


async def test_with_the_interval_at_0_nothing_is_scheduled() -> None:
    async with edge(None, GC_FULL_INTERVAL_S="0"):
        assert "collect_periodically" not in scheduled_coroutines()
