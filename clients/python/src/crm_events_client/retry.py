"""What counts as a transient failure, waiting before the next attempt, and reading an
error answer's body (bounded: it only has to name the error)."""

from __future__ import annotations

import asyncio

import aiohttp

from .backoff import Backoff
from .errors import Unavailable

MAX_ERROR_BODY = 64 * 1024
"""The most of an error answer's body read (the product's JSON errors are a few hundred
bytes; a proxy's page is cut)."""

NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
"""A refused or lost connection, a timeout: retried."""


async def pause(
    backoff: Backoff, attempts: int | None, floor_s: float | None, cause: BaseException
) -> None:
    """Wait before the next attempt, or give up with ``Unavailable`` when ``attempts``
    consecutive ones have failed (None: never give up)."""
    if attempts is not None and backoff.failures + 1 >= attempts:
        raise Unavailable(f"giving up after {attempts} attempts: {cause}", cause) from cause
    await asyncio.sleep(backoff.next_delay_s(floor_s))


async def read_error_body(
    resp: aiohttp.ClientResponse, timeout_s: float, limit: int = MAX_ERROR_BODY
) -> bytes:
    """Up to ``limit`` bytes of an error answer, within ``timeout_s``: a server that sends
    the status and then stalls (or streams without end) gets no more than that. What
    arrived by then is enough to name the error; the status alone decides otherwise."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while size < limit:
                chunk = await resp.content.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
        pass
    return b"".join(chunks)
