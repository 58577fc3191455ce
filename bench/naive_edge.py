"""The naive baseline of scenario A: the textbook aiohttp-sse server.

It reads the same Redis pub/sub channels as the edge (``<prefix>:{pN}:live``, one per
partition, one message per ingest batch of that partition, a line per event that starts
with its offset and ends with its JSON envelope) and, for every event, loops
over the clients and awaits ``EventSourceResponse.send`` for each: the event is decoded and
encoded once per client, and one slow socket write delays every client after it. No resume,
no filter, no bounded buffers. Its SSE id is ``<partition>-<offset>`` (no cursor: nothing
can resume from it). It exists only to show what the edge's design buys.

Run: ``python -m bench.naive_edge`` with ``CRM_EVENTS_REDIS_URL``, ``CRM_EVENTS_REDIS_PREFIX``
and ``CRM_EVENTS_EDGE_PORT`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from redis.asyncio import Redis

from shared.contract import RedisKeys

CLIENTS = web.AppKey("clients", set[EventSourceResponse])
READY = web.AppKey("ready", asyncio.Event)


async def stream(request: web.Request) -> web.StreamResponse:
    response = EventSourceResponse(sep="\n")
    await response.prepare(request)
    clients = request.app[CLIENTS]
    clients.add(response)
    try:
        await response.wait()
    finally:
        clients.discard(response)
    return response


async def healthz(request: web.Request) -> web.Response:
    ready = request.app[READY].is_set()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def fan_out(app: web.Application, redis: Redis, keys: RedisKeys) -> None:
    pubsub = redis.pubsub()
    # Every partition's channel, however many the topic has.
    await pubsub.psubscribe(f"{keys.prefix}:{{p*}}:live")
    app[READY].set()
    async for message in pubsub.listen():
        if message["type"] != "pmessage":
            continue
        partition = keys.live_partition(message["channel"])
        for line in message["data"].split(b"\n"):
            # ``<offset> <pv> <type> <ts> <match> <envelope>``: the JSON envelope ends the line.
            id_b = b"%d-%s" % (partition, line[: line.index(b" ")])
            envelope = line[line.index(b"{") :]
            clients: set[EventSourceResponse] = app[CLIENTS]
            for client in list(clients):
                # Per client: decode, frame, encode, await the write.
                with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                    await client.send(envelope.decode(), id=id_b.decode())


def create_app() -> web.Application:
    app = web.Application()
    app[CLIENTS] = set()
    app[READY] = asyncio.Event()
    url = os.environ.get("CRM_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = os.environ.get("CRM_EVENTS_REDIS_PREFIX", "crm-events")

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(url)
        task = asyncio.create_task(fan_out(app, redis, RedisKeys(prefix)))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/crm-events", stream)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    port = int(os.environ.get("CRM_EVENTS_EDGE_PORT", "9031"))
    web.run_app(create_app(), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
