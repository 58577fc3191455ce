"""Waiting on conditions with deadlines (never a fixed sleep and hope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.02


async def eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    timeout: float,
    what: str,
) -> T:
    """Call ``probe`` until it returns something truthy; fail with ``what`` at the deadline.

    Exceptions from the probe count as "not yet" until the deadline, then are re-raised."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last_error = None
        except AssertionError:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        await asyncio.sleep(POLL_S)


def eventually_sync(probe: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
            last_error = None
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(POLL_S)
