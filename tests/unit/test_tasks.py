"""The task supervisor (shared/tasks.py): a task that ends on its own is reported, marked
unhealthy and restarted with growing backoff; stopping cancels it and never swallows the
cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

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


async def test_stop_goes_on_when_a_tasks_cleanup_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A task whose cleanup fails (e.g. closing a consumer while Kafka is down) is logged;
    the other tasks are stopped all the same and ``stop`` returns, so the app's later
    cleanup runs."""
    sup = Supervisor(CollectorRegistry())
    started: list[str] = []
    cleaned: list[str] = []

    def worker(name: str, *, cleanup_fails: bool) -> Callable[[], Coroutine[Any, Any, None]]:
        async def work() -> None:
            started.append(name)
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append(name)
                if cleanup_fails:
                    raise ConnectionError("broker unreachable")

        return work

    first = sup.add("first", worker("first", cleanup_fails=False))
    failing = sup.add("failing", worker("failing", cleanup_fails=True))  # stopped first
    sup.start()
    await eventually(lambda: len(started) == 2, 2, "both tasks running")
    with caplog.at_level(logging.ERROR, logger="shared.tasks"):
        await sup.stop()

    assert sorted(cleaned) == ["failing", "first"]
    assert not first.healthy and not failing.healthy
    assert failing.crashes == 0, "a failed cleanup during a stop is not a crash"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and "broker unreachable" in str(logged[0].exc_info)


async def test_supervisor_stop_stops_every_task_even_if_one_fails_to_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever makes one task's stop fail, the supervisor logs it and stops the rest."""

    async def broken_sleep(_delay: float) -> None:
        raise RuntimeError("no clock")

    sup = Supervisor(CollectorRegistry(), sleep=broken_sleep)
    cleaned = asyncio.Event()
    started = asyncio.Event()

    async def long() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    async def crashes() -> None:
        raise ValueError("bad input")

    sup.add("long", long)
    crashing = sup.add("crashes", crashes)  # stopped first; its watcher died on the sleep
    sup.start()
    await asyncio.wait_for(started.wait(), 2)
    await eventually(lambda: crashing.crashes == 1, 2, "the crash")
    with caplog.at_level(logging.ERROR, logger="shared.tasks"):
        await sup.stop()

    assert cleaned.is_set()
    assert any(
        r.getMessage() == "background task failed to stop cleanly" and "no clock" in str(r.exc_info)
        for r in caplog.records
    )


async def test_stop_propagates_only_its_own_cancellation() -> None:
    """A stop that is itself cancelled raises CancelledError; a stop run by a task that was
    cancelled earlier (aiohttp runs cleanup in its cancelled main task) stops everything."""
    release = asyncio.Event()
    running = asyncio.Event()
    cleaning = asyncio.Event()
    cleaned: list[str] = []

    async def slow_cleanup() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            try:
                await release.wait()
            finally:
                cleaned.append("slow")

    async def quick() -> None:
        await asyncio.Event().wait()

    # 1. Cancelled while stopping: the cancellation reaches the caller.
    sup = Supervisor(CollectorRegistry())
    sup.add("slow", slow_cleanup)
    sup.start()
    await asyncio.wait_for(running.wait(), 2)
    stopper = asyncio.create_task(sup.stop())
    await asyncio.wait_for(cleaning.wait(), 2)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert cleaned == ["slow"]

    # 2. Cancelled before stopping (the cancellation already delivered): every task stops.
    cleaning.clear()
    release.set()
    sup = Supervisor(CollectorRegistry())
    a = sup.add("a", quick)
    b = sup.add("b", slow_cleanup)
    outcome: list[str] = []

    async def owner() -> None:
        sup.start()
        try:
            await asyncio.Event().wait()
        finally:
            await sup.stop()
            outcome.append("stopped")

    running.clear()
    owning = asyncio.create_task(owner())
    await asyncio.wait_for(running.wait(), 2)
    owning.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owning
    assert outcome == ["stopped"] and cleaned == ["slow", "slow"]
    assert a._runner is None and b._runner is None


@pytest.mark.parametrize(
    "failure",
    [pytest.param("raises", id="factory-raises"), pytest.param("none", id="no-coroutine")],
)
async def test_a_factory_that_fails_when_called_counts_as_a_crash(failure: str) -> None:
    registry = CollectorRegistry()
    gate = Gate()
    sup = Supervisor(registry, sleep=gate)
    calls: list[int] = []
    running = asyncio.Event()

    async def work() -> None:
        running.set()
        await asyncio.Event().wait()

    def factory() -> Coroutine[Any, Any, None]:
        calls.append(1)
        if len(calls) == 1:
            if failure == "raises":
                raise RuntimeError("cannot build")
            return None  # type: ignore[return-value]
        return work()

    task = sup.add("flaky", factory)
    sup.start()
    await eventually(lambda: gate.delays, 2, "the restart delay after the failed call")
    assert not task.healthy and sup.failed == ["flaky"]
    assert task.last_error is not None and task.crashes == 1
    assert restarts(registry, "flaky") == 1
    gate.opened.set()
    await asyncio.wait_for(running.wait(), 2)
    assert task.healthy
    await sup.stop()


async def test_a_crash_is_counted_when_seen_even_if_stopped_during_the_backoff() -> None:
    registry = CollectorRegistry()
    gate = Gate()  # never opened: the stop comes during the backoff
    sup = Supervisor(registry, sleep=gate)

    async def work() -> None:
        raise ValueError("bad input")

    sup.add("worker", work)
    sup.start()
    await eventually(lambda: gate.delays, 2, "the restart delay")
    assert restarts(registry, "worker") == 1
    await sup.stop()
    assert restarts(registry, "worker") == 1


async def test_stop_cancels_again_a_task_that_swallowed_the_cancel(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As Python 3.11's wait_for does when the cancel lands just as what it awaited completes
    # (redis-py sends commands under one): the task goes on as if nothing happened.
    monkeypatch.setattr("shared.tasks.STOP_CANCEL_WAIT_S", 0.05)
    sup = Supervisor(CollectorRegistry())
    started = asyncio.Event()
    swallowed: list[int] = []

    async def work() -> None:
        started.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(1)

    task = sup.add("stubborn", work)
    sup.start()
    await asyncio.wait_for(started.wait(), 2)
    with caplog.at_level(logging.WARNING, logger="shared.tasks"):
        await asyncio.wait_for(sup.stop(), 5)
    assert swallowed == [1] and not task.healthy and task.crashes == 0
    assert "background task ignored a cancel; cancelling again" in caplog.text


async def test_stop_ends_even_if_a_task_never_stops(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shared.tasks.STOP_CANCEL_WAIT_S", 0.02)
    monkeypatch.setattr("shared.tasks.STOP_CANCELS", 3)
    sup = Supervisor(CollectorRegistry())
    started = asyncio.Event()
    release = asyncio.Event()
    ignored: list[int] = []

    async def work() -> None:
        started.set()
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                ignored.append(1)

    sup.add("immortal", work)
    sup.start()
    await asyncio.wait_for(started.wait(), 2)
    with caplog.at_level(logging.WARNING, logger="shared.tasks"):
        await asyncio.wait_for(sup.stop(), 5)
    assert len(ignored) == 3
    assert "background task did not stop; leaving it behind" in caplog.text
    release.set()
