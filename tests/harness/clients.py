"""Clients that behave like browsers under faults, for the fault tests and benchmarks.

``ResumingClient`` reconnects after every error or end of stream, sending the last id it
saw as ``Last-Event-ID``, as EventSource does. ``StalledClient`` opens a stream and never
reads, so the server's buffers fill up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from shared.cursor import decode_cursor
from tests.sse_client import assert_positions_never_go_back, frames


@dataclass
class ResumingClient:
    url: str
    retry_s: float = 0.25
    """Reconnect delay, as the server's ``retry:`` hint tells EventSource."""
    name: str = ""
    ids: list[str] = field(default_factory=list)
    datas: list[str] = field(default_factory=list)
    resets: list[dict[str, Any]] = field(default_factory=list)
    reset_positions: list[int] = field(default_factory=list)
    """Index in ``ids`` at which each reset arrived."""
    nodes: list[str] = field(default_factory=list)
    connects: int = 0
    failures: int = 0
    last_id: str | None = None
    resume_times_s: list[float] = field(default_factory=list)
    """Per reconnect: from losing the stream to the new stream being open (the server has
    checked the position; the missed events follow at once)."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> ResumingClient:
        self._task = asyncio.create_task(self._run(session))
        return self

    async def _run(self, session: aiohttp.ClientSession) -> None:
        lost_at: float | None = None
        while not self._stop.is_set():
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            comments: list[str] = []
            try:
                async with session.get(
                    self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=5)
                ) as resp:
                    if resp.status != 200:
                        self.failures += 1
                    else:
                        self.connects += 1
                        if lost_at is not None:
                            self.resume_times_s.append(time.monotonic() - lost_at)
                            lost_at = None
                        async for frame in frames(resp, comments):
                            if frame.event == "reset":
                                self.resets.append(json.loads(frame.data))
                                self.reset_positions.append(len(self.ids))
                            else:
                                self.ids.append(frame.id or "")
                                self.datas.append(frame.data)
                            if frame.id:
                                self.last_id = frame.id
                        self.nodes += [
                            c.removeprefix("node ") for c in comments if c.startswith("node ")
                        ]
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                self.failures += 1
            if lost_at is None:
                lost_at = time.monotonic()
            # EventSource waits the retry delay before it reconnects.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.retry_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def seqs(self) -> list[int]:
        return [json.loads(d)["event"]["Seq"] for d in self.datas]

    def check(self, expected: set[int]) -> dict[str, Any]:
        """Exactly once and in order, except where a reset announced a gap.

        Returns a summary; raises AssertionError with the first violation."""
        envelopes = [json.loads(d) for d in self.datas]
        seqs = [e["event"]["Seq"] for e in envelopes]
        dupes = len(seqs) - len(set(seqs))
        assert not dupes, f"{self.name}: {dupes} events arrived twice"
        # Within one connection and across reconnects (each resumes from the last id), no
        # partition's position goes back; each event's id stands right after it.
        cursors = [decode_cursor(i) for i in self.ids]
        try:
            assert_positions_never_go_back(cursors)
        except AssertionError as exc:
            raise AssertionError(f"{self.name}: {exc}") from None
        by_partition: dict[int, list[int]] = defaultdict(list)
        for e, cursor in zip(envelopes, cursors, strict=True):
            assert cursor.position(e["partition"]) == e["offset"] + 1, (
                f"{self.name}: the id of partition {e['partition']} offset {e['offset']} "
                "is not the position after it"
            )
            by_partition[e["partition"]].append(e["offset"])
        for partition, offsets in by_partition.items():
            assert offsets == sorted(offsets), f"{self.name}: partition {partition} out of order"
        missing = expected - set(seqs)
        if missing:
            assert self.resets, (
                f"{self.name}: {len(missing)} events missing without a reset, "
                f"e.g. {sorted(missing)[:5]}"
            )
        return {
            "events": len(seqs),
            "missing_after_reset": len(missing),
            "resets": len(self.resets),
        }


class StalledClient:
    """Sends a stream request and never reads the response."""

    def __init__(self, host: str, port: int, path: str = "/crm-events") -> None:
        self.sock = socket.socket()
        # A tiny receive window: the server's buffers fill after little data.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    def close(self) -> None:
        self.sock.close()
