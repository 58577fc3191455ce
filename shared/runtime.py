"""Process-wide runtime tuning shared by the services' entry points."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Freeze what start-up allocated and collect less often.

    An edge holds thousands of connections, each a few dozen long-lived objects with
    reference cycles (aiohttp's protocol, transport, request and response point at each
    other). With the default thresholds, full collections kept traversing all of them while
    a reconnect storm was being accepted: a sixth of the edge's CPU in a 10,000-client storm
    (py-spy); a quarter less CPU once tuned. Frozen start-up objects (modules, settings, the
    app) are never traversed again; cycles are still collected, in larger batches."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


DEFAULT_GC_FULL_INTERVAL_S = 60.0
"""Seconds between the edge's scheduled full collections (CRM_EVENTS_GC_FULL_INTERVAL_S)."""


async def collect_periodically(interval_s: float, on_collect: Callable[[float, int], None]) -> None:
    """A full collection every ``interval_s``, reported as (seconds it took, unreachable
    objects it found), until cancelled.

    The thresholds above make CPython's own full collections rare: the third generation is
    examined only after about 100 million net allocations *and* once it has grown by a
    quarter. Each closed connection leaves its aiohttp cycles (protocol, transport, request,
    response, the cancelled handler's exception, traceback and frames) in the old
    generations, so under reconnect churn that garbage piled up between full collections
    for ever longer stretches as the heap grew, and every pile set a new high-water mark of
    arenas that the small-object allocator cannot hand back: RSS grew in steps (issue 18).
    On a timer, the pile is at most one interval of churn and the pause is predictable (a
    full pass over the edge's tracked objects: tens of milliseconds, measured in
    crm_events_gc_full_collection_seconds)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            started = time.perf_counter()
            found = gc.collect()
            on_collect(time.perf_counter() - started, found)
        except Exception:
            # Nothing may end the schedule: it would stop for the process's life.
            log.exception("a scheduled full collection failed")
