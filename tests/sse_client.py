"""A small SSE client for tests and benchmarks: parses frames per the WHATWG rules that
matter here (id, event, data, retry, comments) from an aiohttp response."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(slots=True)
class Frame:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def frames(
    response: aiohttp.ClientResponse, comments: list[str] | None = None
) -> AsyncIterator[Frame]:
    """Yield each dispatched event; comment lines go to ``comments`` when given.

    Reads whole chunks and splits on the blank line that ends each event, which costs far
    less per frame than reading line by line (the tests run many clients in one process)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        if b"\n\n" not in buffer:
            continue
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            frame = _parse_block(block.decode("utf-8"), comments)
            if frame is not None:
                yield frame


def _parse_block(block: str, comments: list[str] | None) -> Frame | None:
    event_id: str | None = None
    event = "message"
    data: list[str] = []
    for raw in block.split("\n"):
        line = raw.rstrip("\r")
        if line.startswith(":"):
            if comments is not None:
                comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    return Frame(event_id, event, "\n".join(data))


@dataclass
class Collector:
    """Reads one SSE stream in the background, keeping every frame."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    received: list[Frame] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    status: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> Collector:
        self._task = asyncio.create_task(self._run(session))
        return self

    async def _run(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(
                self.url, headers=self.headers, timeout=aiohttp.ClientTimeout(total=None)
            ) as resp:
                self.status = resp.status
                async for frame in frames(resp, self.comments):
                    self.received.append(frame)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            self.ended.set()

    @property
    def node(self) -> str | None:
        """The edge that served the stream (it names itself in a comment at the start)."""
        for comment in self.comments:
            if comment.startswith("node "):
                return comment.removeprefix("node ")
        return None

    @property
    def data_frames(self) -> list[Frame]:
        return [f for f in self.received if f.event == "message"]

    async def wait_for(self, predicate: Any, timeout: float, what: str = "condition") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} on {self.url}; "
                    f"got {len(self.received)} frames"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
