"""The task supervisor (shared/tasks.py): a task that ends on its own is reported, marked
unhealthy and restarted with growing backoff; stopping cancels it and never swallows the
cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from shared.tasks import Supervisor
from tests.waiting import eventually


class Gate:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.opened = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self.opened.wait()
        self.opened.clear()


def restarts(registry: CollectorRegistry, task: str) -> float:
    value = registry.get_sample_value("crm_events_task_restarts_total", {"task": task})
    assert value is not None, "the counter is exported from the start"
    return value


async def test_a_crash_is_logged_once_marks_unhealthy_and_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    gate = Gate()
    sup = Supervisor(registry, backoff_initial_s=1.0, backoff_max_s=3.0, sleep=gate)
    runs: list[int] = []
    crash = asyncio.Event()

    async def work() -> None:
        runs.append(1)
        await crash.wait()
        crash.clear()
        raise ValueError("bad input")

    task = sup.add("worker", work)
    assert restarts(registry, "worker") == 0
    with caplog.at_level(logging.INFO, logger="shared.tasks"):
        sup.start()
        await eventually(lambda: runs, 2, "the first run")
        assert task.healthy and sup.failed == []
        crash.set()
        await eventually(lambda: gate.delays, 2, "the restart delay")
        assert not task.healthy and sup.failed == ["worker"]
        assert task.last_error == "ValueError: bad input"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        gate.opened.set()
        await eventually(lambda: len(runs) == 2, 2, "the restart")
        assert task.healthy and restarts(registry, "worker") == 1
        # A second crash waits longer (jittered, within [d/2, d] of a doubling step).
        crash.set()
        await eventually(lambda: len(gate.delays) == 2, 2, "the second delay")
        assert 0.5 <= gate.delays[0] <= 1.0 and 1.0 <= gate.delays[1] <= 2.0
        gate.opened.set()
        await eventually(lambda: len(runs) == 3, 2, "the second restart")
    await sup.stop()
    assert restarts(registry, "worker") == 2


async def test_a_task_that_returns_is_restarted_too() -> None:
    registry = CollectorRegistry()
    gate = Gate()
    gate.opened.set()
    sup = Supervisor(registry, sleep=gate)
    runs: list[int] = []

    async def work() -> None:
        runs.append(1)
        if len(runs) > 1:
            await asyncio.Event().wait()

    task = sup.add("quits", work)
    sup.start()
    await eventually(lambda: len(runs) == 2, 2, "a restart after the return")
    assert task.last_error == "returned" and task.healthy
    await sup.stop()


async def test_stop_cancels_the_task_runs_its_cleanup_and_does_not_restart() -> None:
    sup = Supervisor(CollectorRegistry())
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = sup.add("long", work)
    sup.start()
    await asyncio.wait_for(started.wait(), 2)
    await sup.stop()
    assert cleaned.is_set() and not task.healthy and task.crashes == 0


async def test_cancelling_the_owner_propagates() -> None:
    """The cancellation of whoever awaits ``stop`` (or the lifecycle) is not swallowed."""
    sup = Supervisor(CollectorRegistry())

    async def work() -> None:
        await asyncio.Event().wait()

    sup.add("long", work)

    async def owner() -> None:
        sup.start()
        await asyncio.Event().wait()

    running = asyncio.create_task(owner())
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await sup.stop()


async def test_a_task_cancelled_by_someone_else_is_restarted() -> None:
    gate = Gate()
    gate.opened.set()
    sup = Supervisor(CollectorRegistry(), sleep=gate)
    runs: list[asyncio.Task[None] | None] = []

    async def work() -> None:
        runs.append(asyncio.current_task())
        await asyncio.Event().wait()

    task = sup.add("victim", work)
    sup.start()
    await eventually(lambda: runs, 2, "the first run")
    victim = runs[0]
    assert victim is not None
    victim.cancel()
    await eventually(lambda: len(runs) == 2, 2, "the restart")
    assert task.last_error == "cancelled"
    await sup.stop()


def test_names_are_unique() -> None:
    sup = Supervisor(CollectorRegistry())

    async def work() -> None:
        return None

    sup.add("a", work)
    with pytest.raises(ValueError, match="already supervised"):
        sup.add("a", work)
