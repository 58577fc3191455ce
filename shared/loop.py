"""The event loop the services run on.

uvloop (libuv, transports in C) is the default: the edge spends most of its time in
transport writes, reads and accepts, which cost several times less there than in the
pure-Python selector transports. ``asyncio`` remains selectable for debugging.
"""

from __future__ import annotations

import asyncio

import uvloop

EVENT_LOOPS = ("uvloop", "asyncio")


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
