"""A small SSE client for tests and benchmarks: parses frames per the WHATWG rules that
matter here (id, event, data, retry, comments) from an aiohttp response; and the checks on
cursors (the SSE ids) that tests share."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from shared.cursor import Cursor, decode_cursor


@dataclass(slots=True)
class Frame:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def cursor(self) -> Cursor:
        """The frame's id, decoded (every data and reset frame carries one)."""
        assert self.id is not None, f"a {self.event} frame without an id"
        return decode_cursor(self.id)


def cursor_text(epoch: int, *positions: int | None) -> str:
    """A cursor's text, e.g. ``cursor_text(1, 5, None, 7)``."""
    return Cursor(epoch, tuple(positions)).encode().decode()


def assert_positions_never_go_back(cursors: Iterable[Cursor]) -> None:
    """No partition's position ever decreases from one cursor to the next (a position that
    appears never disappears), within one epoch."""
    previous: Cursor | None = None
    for n, cursor in enumerate(cursors):
        if previous is not None and previous.epoch == cursor.epoch:
            for p, before in enumerate(previous.positions):
                now = cursor.position(p)
                assert before is None or (now is not None and now >= before), (
                    f"cursor {n}: partition {p} went back from {before} to {now}"
                )
        previous = cursor


def assert_cursors_never_go_back(frames: Iterable[Frame]) -> None:
    """``assert_positions_never_go_back`` over the ids of ``frames`` (frames without one
    are left out)."""
    assert_positions_never_go_back(f.cursor for f in frames if f.id is not None)


def assert_per_partition_exactly_once(
    deliveries: Iterable[tuple[int, int]], expected: dict[int, list[int]], name: str = ""
) -> None:
    """``deliveries``: (partition, offset) in the order received. Each partition's offsets
    must be exactly ``expected[partition]``: every one once, in order. ``name`` (a client's)
    starts each failure message."""
    who = f"{name}: " if name else ""
    got: dict[int, list[int]] = defaultdict(list)
    for partition, offset in deliveries:
        got[partition].append(offset)
    for partition in set(got) | set(expected):
        offsets = got.get(partition, [])
        want = expected.get(partition, [])
        dupes = len(offsets) - len(set(offsets))
        assert not dupes, f"{who}partition {partition}: {dupes} events arrived twice"
        missing = sorted(set(want) - set(offsets))
        assert not missing, (
            f"{who}partition {partition}: {len(missing)} missing, e.g. {missing[:5]}"
        )
        extra = sorted(set(offsets) - set(want))
        assert not extra, f"{who}partition {partition}: unexpected {extra[:5]}"
        assert offsets == sorted(offsets), f"{who}partition {partition}: out of order"


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

    @property
    def resets(self) -> list[Frame]:
        return [f for f in self.received if f.event == "reset"]

    @property
    def last_id(self) -> str | None:
        """The id a browser would send as Last-Event-ID on reconnect."""
        for frame in reversed(self.received):
            if frame.id is not None:
                return frame.id
        return None

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
