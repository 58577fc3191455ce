"""Long-lived background tasks that are watched: a task that ends unexpectedly (an exception
other than cancellation, or returning at all) makes its process not ready and is restarted
with jittered exponential backoff.

Without this, a bug or an input nobody foresaw ends a task such as the edge's subscription
silently: the process keeps answering ``/readyz`` 200 while doing nothing. Here each crash
is logged once with its traceback, counted in ``crm_events_task_restarts_total{task}``, and
``/readyz`` names the task until it runs again.

Tasks are started and stopped with the aiohttp app (``Supervisor.lifecycle`` goes into
``cleanup_ctx``). Cancellation is never swallowed: stopping the supervisor cancels every
task and waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]
Sleep = Callable[[float], Awaitable[None]]

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
STOP_CANCELS = 10
STOP_CANCEL_WAIT_S = 1.0
"""A stopping task gets this many cancels, this long apart (see ``Supervised._cancel``)."""
STABLE_AFTER_S = 60.0
"""A task that ran this long before crashing starts its backoff over (an isolated crash
restarts quickly; a crash loop slows down to ``BACKOFF_MAX_S``)."""


def task_restarts_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "crm_events_task_restarts",
        "Background tasks restarted after they ended unexpectedly (a crash or a return), "
        "by task name.",
        ["task"],
        registry=registry,
    )


class Supervised:
    """One named task, restarted whenever it ends on its own."""

    def __init__(
        self,
        name: str,
        factory: TaskFactory,
        restarts: Counter,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self._factory = factory
        self._restarts = restarts
        self._initial = backoff_initial_s
        self._max = max(backoff_max_s, backoff_initial_s)
        self._sleep = sleep
        self._runner: asyncio.Task[None] | None = None
        self.healthy = False
        """True while the task runs; False from a crash until it is running again."""
        self.crashes = 0
        self.last_error: str | None = None
        restarts.labels(task=name)  # exported as 0 from the start, so rate() works

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self.healthy = False
        if runner is None:
            return
        me = asyncio.current_task()
        # Counted before the wait: a caller already being cancelled (e.g. cleanup running in a
        # cancelled main task) still stops every task; only a cancellation of this wait counts.
        cancels_before = me.cancelling() if me is not None else 0
        runner.cancel()
        # Wait for the task's own cleanup; a stop that is itself cancelled still propagates.
        try:
            await runner
        except asyncio.CancelledError:
            if me is not None and me.cancelling() > cancels_before:
                raise

    async def _watch(self) -> None:
        delay = self._initial
        while True:
            started = time.monotonic()
            task: asyncio.Task[None] | None = None
            try:
                # Inside the try: a factory that raises, or returns no coroutine, is a crash.
                task = asyncio.create_task(self._factory(), name=self.name)
                self.healthy = True
                await asyncio.shield(task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if task is not None and (me is None or me.cancelling() or not task.done()):
                    # Our own stop (the shield keeps the task alive for exactly this): cancel
                    # the task, wait for its cleanup, and propagate.
                    await self._cancel(task)
                    raise
                # The task was cancelled by someone else while we were not: it ended.
                self.last_error = "cancelled"
                log.error("background task was cancelled; restarting", extra={"task": self.name})
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "background task crashed; restarting",
                    exc_info=exc,
                    extra={"task": self.name, "error": self.last_error},
                )
            else:
                self.last_error = "returned"
                log.error(
                    "background task ended unexpectedly; restarting", extra={"task": self.name}
                )
            self.healthy = False
            self.crashes += 1
            # Counted when the crash is seen, so a stop during the backoff does not lose it.
            self._restarts.labels(task=self.name).inc()
            if time.monotonic() - started >= STABLE_AFTER_S:
                delay = self._initial
            # Jittered within [step/2, step] (half jitter: the wait still grows with the
            # step), so replicas that crashed together on the same bad input do not restart
            # in lockstep.
            wait = delay * (0.5 + random.random() / 2)
            log.info(
                "restarting background task", extra={"task": self.name, "in_s": round(wait, 2)}
            )
            await self._sleep(wait)
            delay = min(delay * 2, self._max)

    async def _cancel(self, task: asyncio.Task[None]) -> None:
        """Cancel the task and wait for its cleanup. On Python 3.11 a cancel that arrives
        just as an ``asyncio.wait_for`` inside the task completes (redis-py sends commands
        under one) is swallowed and the task runs on: it is cancelled again, a bounded
        number of times, so that a stop (SIGTERM) always ends."""
        for attempt in range(1, STOP_CANCELS + 1):
            task.cancel()
            try:
                await asyncio.wait([task], timeout=STOP_CANCEL_WAIT_S)
            except asyncio.CancelledError:
                # This stop is itself cancelled: as ``await task`` would, pass the cancel on
                # and let the task's cleanup end before propagating.
                task.cancel()
                await asyncio.wait([task], timeout=STOP_CANCEL_WAIT_S)
                raise
            if task.done():
                break
            log.warning(
                "background task ignored a cancel; cancelling again",
                extra={"task": self.name, "attempt": attempt},
            )
        else:
            log.error(
                "background task did not stop; leaving it behind",
                extra={"task": self.name, "cancels": STOP_CANCELS},
            )
            return
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A cleanup that fails (e.g. closing a client whose server is down) is logged,
            # not raised: the stop goes on either way.
            log.error(
                "background task failed while stopping",
                exc_info=exc,
                extra={"task": self.name, "error": f"{type(exc).__name__}: {exc}"},
            )


class Supervisor:
    """The supervised tasks of one process, started and stopped with its aiohttp app."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._restarts = task_restarts_counter(registry)
        self._initial = backoff_initial_s
        self._max = backoff_max_s
        self._sleep = sleep
        self.tasks: dict[str, Supervised] = {}

    def add(self, name: str, factory: TaskFactory) -> Supervised:
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        task = Supervised(
            name,
            factory,
            self._restarts,
            backoff_initial_s=self._initial,
            backoff_max_s=self._max,
            sleep=self._sleep,
        )
        self.tasks[name] = task
        return task

    def start(self) -> None:
        for task in self.tasks.values():
            task.start()

    async def stop(self) -> None:
        """Stop every task, last added first; one that fails to stop is logged and the others
        are stopped all the same (a cancellation of this stop still propagates)."""
        for task in reversed(self.tasks.values()):
            try:
                await task.stop()
            except Exception as exc:
                log.error(
                    "background task failed to stop cleanly",
                    exc_info=exc,
                    extra={"task": task.name, "error": f"{type(exc).__name__}: {exc}"},
                )

    @property
    def failed(self) -> list[str]:
        """Names of the tasks that are not running (for ``/readyz``)."""
        return [name for name, task in self.tasks.items() if not task.healthy]

    async def lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: tasks start with the app and are stopped with it."""
        self.start()
        try:
            yield
        finally:
            await self.stop()
